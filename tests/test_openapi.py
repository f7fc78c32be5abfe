"""/openapi.json is a valid OpenAPI 3.1 contract that real answers keep; /docs is self-contained."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from aggregator import create_app
from aggregator.config import default_config_text, parse_config
from aggregator.engine import engine_of
from aggregator.openapi import build_openapi
from aggregator.settings import Settings
from tests.support.openapi import response_validator

TWO_AGGREGATES = """
[upstreams.weather]
url = "http://127.0.0.1:9/weather/{city}"
schema = "aggregator.demo.models:Weather"

[upstreams.raw]
url = "http://127.0.0.1:9/raw?n={n}&on={on}"

[aggregates.one]
path = "/api/one"
sources = ["weather"]
params = { city = "str" }

[aggregates.two]
path = "/v2/two"
sources = ["weather", "raw"]
required = ["weather"]

[aggregates.two.params]
city = "str"
n = { type = "int", default = 3 }
on = { type = "bool", default = true }
x = { type = "float", default = 0.5 }
"""


def demo_document() -> dict[str, Any]:
    return build_openapi(
        parse_config(default_config_text(), "demo"), sync_prefixes=("/sync", "/sync-pool")
    )


def test_the_demo_document_is_valid_openapi_3_1():
    document = demo_document()
    assert document["openapi"] == "3.1.0"
    validate(document)  # raises with the offending path


def test_every_aggregate_appears_with_its_parameters_and_twins():
    config = parse_config(TWO_AGGREGATES, "t")
    document = build_openapi(config, sync_prefixes=("/sync", "/sync-pool"))
    validate(document)
    paths = document["paths"]
    for name, agg in config.aggregates.items():
        operation = paths[agg.path]["get"]
        assert operation["operationId"] == f"aggregate_{name}"
        query = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
        assert list(query) == list(agg.params)
        for twin in (f"/sync{agg.path}", f"/sync-pool{agg.path}"):
            assert paths[twin]["get"]["tags"] == ["benchmark"]
            assert paths[twin]["get"]["x-benchmark"] is True
    query = {p["name"]: p for p in paths["/v2/two"]["get"]["parameters"]}
    assert query["city"]["required"] is True
    assert query["city"]["schema"] == {"type": "string", "maxLength": 1024, "minLength": 1}
    assert query["n"]["required"] is False
    empty = {"const": "", "description": "Empty: the default."}
    n = query["n"]["schema"]
    assert n["default"] == 3 and n["anyOf"][1] == empty and n["anyOf"][0]["type"] == "integer"
    assert query["on"]["schema"] == {"anyOf": [{"type": "boolean"}, empty], "default": True}
    assert query["x"]["schema"] == {"anyOf": [{"type": "number"}, empty], "default": 0.5}
    assert set(paths["/v2/two"]["get"]["responses"]) >= {"200", "304", "400", "413", "502", "504"}
    # The sources' own pydantic models, under the envelope's `data`.
    schemas = document["components"]["schemas"]
    data = schemas["Envelope_two"]["properties"]["data"]["properties"]
    assert data["weather"] == {"$ref": "#/components/schemas/Weather"}
    assert "temperature_c" in schemas["Weather"]["properties"]
    assert "$ref" not in data["raw"]  # no schema: any JSON
    assert {"/healthz", "/readyz", "/admin/purge", "/admin/warm"} <= set(paths)
    assert paths["/admin/purge"]["post"]["security"] == [{"adminToken": []}]
    scheme = document["components"]["securitySchemes"]["adminToken"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}


def test_openapi_json_is_served_and_matches_the_config(client, config_path):
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    document = r.get_json()
    validate(document)
    assert "/api/five" in document["paths"] and "/sync-pool/api/five" in document["paths"]


def test_the_schema_rejects_a_wrong_envelope():
    validator = response_validator(demo_document(), "/api/dashboard", 200)
    good: dict[str, Any] = {
        "data": {
            "profile": {"user_id": 7, "name": "Ken", "city": "Oslo", "plan": "free"},
        },
        "errors": {"news": {"kind": "timeout", "detail": "late"}},
        "sources": {
            name: {"status": "ok", "ms": 1.0}
            for name in ("weather", "stocks", "news", "profile", "recommendations")
        },
        "complete": False,
    }
    validator.validate(good)
    for bad in (
        {**good, "data": {"profile": {**good["data"]["profile"], "plan": "gold"}}},
        {**good, "data": {}},  # the required source is missing from a 200
        {**good, "errors": {"nope": {"kind": "timeout", "detail": "x"}}},
        {**good, "extra": 1},
    ):
        assert not validator.is_valid(bad), bad


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


GRAPH = """
[upstreams.profile]
url = "http://127.0.0.1:9/profile/{user_id}"
schema = "aggregator.demo.models:Profile"

[upstreams.weather]
url = "http://127.0.0.1:9/weather/{profile.city}?units={units}"
schema = "aggregator.demo.models:Weather"

[aggregates.pw]
path = "/api/pw"
sources = ["profile", "weather"]
params = { user_id = "int", units = { type = "str", default = "metric" } }
"""


def test_a_graph_documents_its_parameters_only_and_the_dependency_kind():
    document = build_openapi(parse_config(GRAPH, "graph"))
    validate(document)
    operation = document["paths"]["/api/pw"]["get"]

    queried = [p["name"] for p in operation["parameters"] if p["in"] == "query"]
    assert queried == ["user_id", "units"]  # {profile.city} is an answer's field, no parameter
    assert "weather after profile" in operation["description"]
    validator = response_validator(document, "/api/pw", 200)
    validator.validate(
        {
            "data": {"profile": {"user_id": 7, "name": "Ken", "city": "Oslo", "plan": "free"}},
            "errors": {
                "weather": {"kind": "dependency", "detail": "needs profile.city: ..."},
            },
            "sources": {
                "profile": {"status": "ok", "ms": 50.2, "started": 0.1},
                "weather": {"status": "dependency", "ms": 0.0, "started": 50.4},
            },
            "complete": False,
        }
    )
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(
            {
                "data": {"profile": {"user_id": 7, "name": "Ken", "city": "Oslo", "plan": "free"}},
                "errors": {"weather": {"kind": "needs-a-city", "detail": "x"}},
                "sources": {s: {"status": "ok", "ms": 1.0} for s in ("profile", "weather")},
                "complete": False,
            }
        )


def test_docs_page_uses_only_local_assets(client):
    r = client.get("/docs", follow_redirects=True)
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    parser = _Assets()
    parser.feed(html)
    assert any(u.endswith("swagger-ui-bundle.js") for u in parser.urls)
    for url in parser.urls:
        assert url.startswith("/") and not url.startswith("//"), url  # no CDN, no scheme
        with client.get(url) as asset:  # a file response: close it
            assert asset.status_code == 200, url
    assert '"url": "/openapi.json"' in html
    assert '"validatorUrl": null' in html  # the validator badge would call an outside service
    with client.get("/docs/no-such-asset.js") as missing:
        assert missing.status_code == 404
        assert missing.get_json()["error"] == "Not Found"


def test_admin_body_params_follow_the_document(app):
    settings = Settings(config=engine_of(app).settings.config, admin_token="t" * 32)
    client = create_app(settings).test_client()
    auth = {"Authorization": "Bearer " + "t" * 32}

    def purge(params: dict[str, Any]) -> Any:
        return client.post(
            "/admin/purge", json={"aggregate": "five", "params": params}, headers=auth
        )

    # JSON's 7.0 is the integer 7 (the document says integer); the query text "07" too.
    for user_id in (7, 7.0, "07"):
        r = purge({"city": "Paris", "user_id": user_id})
        assert r.status_code == 200, r.get_json()
        assert r.get_json()["purged"] == ["agg:five:city=Paris&user_id=7"]
    for params, field in (
        ({"city": False, "user_id": 7}, "params.city"),
        ({"city": 5, "user_id": 7}, "params.city"),
        ({"city": "Paris", "user_id": True}, "params.user_id"),
        ({"city": "Paris", "user_id": 7.5}, "params.user_id"),
    ):
        r = purge(params)
        assert r.status_code == 400, params
        assert r.get_json()["field"] == field


@pytest.mark.integration
def test_real_demo_answers_validate_against_the_document(serve, demo):
    server = serve(None, demo_url=demo.url)
    document = httpx.get(f"{server.url}/openapi.json", trust_env=False).json()
    validate(document)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as http:
        complete = http.get("/api/dashboard", params={"city": "Paris", "user_id": 7})
        partial = http.get("/api/dashboard", params={"city": "Oslo", "user_id": 7, "reco_delay": 2})
        twin = http.get("/sync-pool/api/dashboard", params={"city": "Rome", "user_id": 8})
        bad = http.get("/api/dashboard", params={"city": "Paris", "user_id": "x"})
        ready = http.get("/readyz")
        healthy = http.get("/healthz")
    assert complete.json()["complete"] is True
    assert partial.json()["errors"]["recommendations"]["kind"] == "timeout"
    for path, response in (
        ("/api/dashboard", complete),
        ("/api/dashboard", partial),
        ("/sync-pool/api/dashboard", twin),
        ("/api/dashboard", bad),
        ("/readyz", ready),
        ("/healthz", healthy),
    ):
        validator = response_validator(document, path, response.status_code)
        validator.validate(response.json())


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
    serve: Callable[..., Any], demo: Any, tmp_path: Path
) -> None:
    """Property-based run, bounded: every check, 20 examples per operation, on real Hypercorn."""
    token = "schemathesis-" + "x" * 32
    server = serve(None, demo_url=demo.url, admin_token=token)
    cli = Path(sys.executable).with_name("schemathesis")
    command = [
        str(cli),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "20",
        "--header",
        f"Authorization: Bearer {token}",
        "--request-timeout",
        "10",
        "--seed",
        "7",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    # In tmp_path: schemathesis keeps its example database in ./.schemathesis
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=280, check=False, cwd=tmp_path
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "No issues found" in output, output[-3000:]
    server.stop()
    assert "Traceback" not in server.log()
