"""Client headers reach an upstream only when that upstream allow-lists them (issue 6, row 12).

What the demo upstreams received is read from the demo itself (`/_requests`) and from its echo
service, which answers with the headers it got.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from aggregator import create_app
from aggregator.cache.entries import aggregate_key
from aggregator.cache.privacy import caller_from_asgi
from aggregator.config import parse_config
from aggregator.demo.process import DemoProcess
from aggregator.errors import ConfigError
from aggregator.forwarding import NEVER_FORWARDED
from aggregator.openapi import build_openapi
from aggregator.settings import Settings
from tests.support.demo import received, reset_demo
from tests.support.servers import Server

SECRET = "Bearer user-secret-7f3a"
COOKIE = "session=cookie-secret-91b2"

FORWARD_CONFIG = """
[upstreams.echo]
url = "{demo}/echo/fwd"
timeout = 3.0
forward_headers = ["Accept-Language", "X-Tenant"]
headers = {{ X-Api-Key = "static-key" }}

[upstreams.creds]
url = "{demo}/echo/creds"
timeout = 3.0
forward_headers = ["Authorization", "Cookie"]
forward_credentials = true

[upstreams.plain]
url = "{demo}/echo/plain"
timeout = 3.0

[upstreams.weather]
url = "{demo}/weather/{{city}}"
timeout = 3.0
schema = "aggregator.demo.models:Weather"

[upstreams.tenanted]
url = "{demo}/echo/tenanted"
timeout = 3.0
forward_headers = ["X-Tenant"]
cache_ttl = 60

[aggregates.fwd]
path = "/api/fwd"
sources = ["echo", "plain", "weather"]
params = {{ city = "str" }}
cache_ttl = 30

[aggregates.creds]
path = "/api/creds"
sources = ["creds", "plain"]
cache_ttl = 30

[aggregates.src]
path = "/api/src"
sources = ["tenanted"]

[aggregates.percred]
path = "/api/percred"
sources = ["creds"]
cache_ttl = 30
cache_vary = ["Authorization"]
"""


def forward_config(demo_url: str) -> str:
    return FORWARD_CONFIG.format(demo=demo_url)


@pytest.fixture
def config_file(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    return write_config(forward_config(demo.url))


@pytest.fixture
def server_config(config_file: Path) -> Path:
    """What conftest's `server` serves here."""
    return config_file


def one_upstream(extra: str) -> str:
    upstream = f'[upstreams.x]\nurl = "http://u.test/x"\n{extra}\n'
    return upstream + '[aggregates.a]\npath = "/a"\nsources = ["x"]\n'


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.toml")
    return str(caught.value)


# -- config (unit) --------------------------------------------------------------------------------


def test_nothing_is_forwarded_by_default() -> None:
    config = parse_config(one_upstream(""), "t.toml")
    assert config.upstreams["x"].forward_headers == []
    assert config.forwarded_anywhere == frozenset()


@pytest.mark.parametrize("name", [n.title() for n in sorted(NEVER_FORWARDED)])
def test_hop_by_hop_and_other_unforwardable_headers_are_refused(name: str) -> None:
    # ...even with the credentials opt-in: that flag unlocks Authorization and Cookie only.
    error = config_error(one_upstream(f'forward_headers = ["{name}"]\nforward_credentials = true'))
    assert f"upstreams.x.forward_headers: {name} is never forwarded (" in error


@pytest.mark.parametrize("name", ["Authorization", "Cookie", "cookie"])
def test_credentials_need_the_explicit_opt_in(name: str) -> None:
    error = config_error(one_upstream(f'forward_headers = ["{name}"]'))
    assert f"upstreams.x: forward_headers: {name} carries the client's credentials" in error
    assert "forward_credentials = true" in error
    allowed = parse_config(
        one_upstream(f'forward_headers = ["{name}"]\nforward_credentials = true'), "t.toml"
    )
    assert allowed.upstreams["x"].forwarded == ((name, name.lower()),)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        pytest.param(
            'forward_headers = ["Bad Header"]', "'Bad Header' is not a header name", id="space"
        ),
        pytest.param(
            'forward_headers = ["X_Tenant"]', "'X_Tenant' is not a header name", id="underscore"
        ),
        pytest.param('forward_headers = [""]', "'' is not a header name", id="empty"),
        pytest.param('forward_headers = ["X-A", "x-a"]', "x-a is listed twice", id="twice"),
        pytest.param(
            'forward_headers = ["X-Tenant"]\nheaders = { x-tenant = "fixed" }',
            "X-Tenant is also a configured header",
            id="clash-with-static",
        ),
        pytest.param(
            'headers = { X-Request-ID = "fixed" }',
            "X-Request-ID is set per request",
            id="static-request-id",
        ),
        pytest.param(
            'forward_headers = "X-Tenant"', "Input should be a valid list", id="not-a-list"
        ),
    ],
)
def test_bad_forward_headers_are_readable_errors(extra: str, says: str) -> None:
    assert says in config_error(one_upstream(extra))


# -- cache keys (unit) ----------------------------------------------------------------------------


def test_forwarded_headers_join_the_cache_vary_of_their_aggregates(config_file: Path) -> None:
    text = config_file.read_text().replace(
        'path = "/api/creds"', 'path = "/api/creds"\ncache_vary = ["X-Team", "Authorization"]'
    )
    config = parse_config(text, "t.toml")
    assert config.vary_by("fwd") == ("accept-language", "x-tenant")
    assert config.vary_by("src") == ("x-tenant",)
    assert config.vary_by("creds") == ("x-team", "authorization", "cookie")  # declared first
    assert config.aggregates["creds"].cache_vary == ["x-team", "authorization"]


def test_keys_hold_a_digest_of_forwarded_values_never_the_values(config_file: Path) -> None:
    config = parse_config(config_file.read_text(), "t.toml")
    vary = tuple(h.encode() for h in config.vary_by("creds"))
    params = {"city": "Paris"}

    def key(*headers: tuple[bytes, bytes]) -> str:
        return aggregate_key("creds", params, caller_from_asgi(headers, vary).vary)

    keys = {
        key((b"authorization", SECRET.encode())),
        key((b"authorization", SECRET.encode()), (b"cookie", b"a=1")),
        key((b"authorization", b"Bearer other")),
        key((b"cookie", b"a=1")),
    }
    assert len(keys) == 4 and aggregate_key("creds", params) not in keys
    assert not any(SECRET.split()[1] in k or "a=1" in k for k in keys)
    # Without any of them (or with others only) a request has the plain key, as `warm` fills.
    assert key() == key((b"x-other", b"1")) == aggregate_key("creds", params)


def test_purging_one_entry_of_a_varying_aggregate_purges_all_of_it(config_file: Path) -> None:
    app = create_app(Settings(config=config_file, admin_token=SecretStr("t" * 32)))
    client = app.test_client()
    assert client.get("/api/fwd?city=Paris").headers["X-Cache"] == "MISS"
    assert client.get("/api/fwd?city=Paris").headers["X-Cache"] == "HIT"
    response = client.post(
        "/admin/purge",
        json={"aggregate": "fwd", "params": {"city": "Paris"}},
        headers={"Authorization": "Bearer " + "t" * 32},
    )
    assert response.json == {"purged": ["aggregate fwd"]}
    assert client.get("/api/fwd?city=Paris").headers["X-Cache"] == "MISS"


# -- real Hypercorn -------------------------------------------------------------------------------

HOSTILE = {
    "Accept-Language": "fr-CH",
    "X-Tenant": "acme",
    "Cookie": COOKIE,
    "Authorization": SECRET,
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
    "X-Other": "not-allow-listed",
    "Referer": "https://dashboard.example/secret-page",
    "User-Agent": "dashboard/1.0",
    "X-Forwarded-For": "10.0.0.1",
}


def _echoed(body: dict[str, Any], source: str) -> dict[str, str]:
    headers: dict[str, str] = body["data"][source]["headers"]
    return headers


@pytest.mark.integration
def test_only_allow_listed_headers_reach_upstreams(demo: DemoProcess, server: Server) -> None:
    reset_demo(demo)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        answers = [
            client.get(f"{prefix}/api/fwd?city=Paris", headers=HOSTILE)
            for prefix in ("", "/sync", "/sync-pool")
        ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        echo, plain = _echoed(answer.json(), "echo"), _echoed(answer.json(), "plain")
        assert echo["accept-language"] == "fr-CH" and echo["x-tenant"] == "acme"
        assert echo["x-api-key"] == "static-key"  # configured headers still go
        assert echo["x-request-id"] == answer.headers["x-request-id"]
        forwarded_names = {"accept-language", "x-tenant"}
        assert not forwarded_names & plain.keys()
    seen = received(demo)
    assert {r["raw_path"].split("/")[1] for r in seen} == {"echo", "weather"}
    for request in seen:
        headers = request["headers"]
        assert headers["user-agent"].startswith("python-httpx/"), headers
        for name, value in HOSTILE.items():
            if name not in ("Accept-Language", "X-Tenant"):
                assert value not in headers.values(), (name, request)
        assert "cookie" not in headers and "authorization" not in headers
        if request["raw_path"] != "/echo/fwd":
            assert "x-tenant" not in headers and "accept-language" not in headers


@pytest.mark.integration
def test_credentials_reach_only_the_upstream_that_opts_in(
    demo: DemoProcess, server: Server
) -> None:
    reset_demo(demo)
    answer = httpx.get(
        f"{server.url}/api/creds",
        trust_env=False,
        headers=[("Authorization", SECRET), ("Cookie", COOKIE), ("Cookie", "theme=dark")],
    )
    creds, plain = _echoed(answer.json(), "creds"), _echoed(answer.json(), "plain")
    assert creds["authorization"] == SECRET
    assert creds["cookie"] == f"{COOKIE}; theme=dark"  # repeated cookies joined as one
    assert "authorization" not in plain and "cookie" not in plain


@pytest.mark.integration
def test_forwarded_values_key_the_aggregate_cache(demo: DemoProcess, server: Server) -> None:
    def get(path: str, **headers: str) -> tuple[str, dict[str, Any]]:
        answer = httpx.get(f"{server.url}{path}", trust_env=False, headers=headers)
        assert answer.status_code == 200, answer.text
        return answer.headers["x-cache"], answer.json()

    def tenant(body: dict[str, Any]) -> str | None:
        return _echoed(body, "echo").get("x-tenant")

    steps = [
        get("/api/fwd?city=Oslo", **{"X-Tenant": "a"}),
        get("/api/fwd?city=Oslo", **{"X-Tenant": "b"}),
        get("/api/fwd?city=Oslo", **{"X-Tenant": "a"}),
        get("/api/fwd?city=Oslo"),
        get("/api/fwd?city=Oslo", **{"X-Other": "ignored"}),
    ]
    assert [(how, tenant(body)) for how, body in steps] == [
        ("MISS", "a"),
        ("MISS", "b"),  # never a's answer
        ("HIT", "a"),
        ("MISS", None),
        ("HIT", None),  # a header nobody forwards does not split the cache
    ]
    vary = httpx.get(f"{server.url}/api/fwd?city=Oslo", trust_env=False).headers["vary"]
    assert vary == "accept-language, x-tenant"
    # Forwarding credentials does not lift the rule: without cache_vary they bypass the cache...
    bypassed = [get("/api/creds", Authorization=f"Bearer {user}") for user in ("one", "two")]
    assert [how for how, _ in bypassed] == ["BYPASS", "BYPASS"]
    assert [_echoed(b, "creds")["authorization"] for _, b in bypassed] == [
        "Bearer one",
        "Bearer two",
    ]
    # ...with it, each credential has its own entries.
    user1 = get("/api/percred", Authorization="Bearer one")
    user2 = get("/api/percred", Authorization="Bearer two")
    again = get("/api/percred", Authorization="Bearer one")
    assert (user1[0], user2[0], again[0]) == ("MISS", "MISS", "HIT")
    assert _echoed(user2[1], "creds")["authorization"] == "Bearer two"
    assert _echoed(again[1], "creds")["authorization"] == "Bearer one"


@pytest.mark.integration
def test_forwarded_values_key_the_source_cache(demo: DemoProcess, server: Server) -> None:
    reset_demo(demo)

    def tenant_seen(value: str) -> tuple[str, str | None]:
        answer = httpx.get(f"{server.url}/api/src", trust_env=False, headers={"X-Tenant": value})
        source = answer.json()["sources"]["tenanted"]["cache"]
        return source, _echoed(answer.json(), "tenanted").get("x-tenant")

    assert [tenant_seen(t) for t in ("a", "b", "a", "b")] == [
        ("miss", "a"),
        ("miss", "b"),
        ("hit", "a"),
        ("hit", "b"),
    ]
    assert len(received(demo, "echo")) == 2


@pytest.mark.integration
async def test_an_admin_warm_never_forwards_the_admin_token(
    demo: DemoProcess, config_file: Path, serve: Callable[..., Server], tmp_path: Path
) -> None:
    token = "admin-token-" + "z" * 32
    server = serve(
        config_file, admin_token=token, cache_type="filesystem", cache_dir=str(tmp_path / "c")
    )
    reset_demo(demo)
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as client:
        warmed = await client.post(
            "/admin/warm",
            json={"aggregate": "creds"},
            headers={"Authorization": f"Bearer {token}", "Cookie": COOKIE},
        )
        assert warmed.status_code == 200, warmed.text
        hit = await client.get("/api/creds")  # what a request without credentials gets
        await asyncio.sleep(0)
    assert hit.headers["x-cache"] == "HIT"
    for request in received(demo):
        assert token not in str(request["headers"]) and COOKIE not in str(request["headers"])


def test_the_openapi_document_lists_forwarded_headers_and_request_ids(config_file: Path) -> None:
    config = parse_config(config_file.read_text(), str(config_file))
    document = build_openapi(config)
    operation = document["paths"]["/api/fwd"]["get"]
    headers = [p["name"] for p in operation["parameters"] if p["in"] == "header"]
    assert headers == ["If-None-Match", "Accept-Language", "X-Tenant", "X-Request-ID"]
    creds = document["paths"]["/api/creds"]["get"]["parameters"]
    assert {p["name"] for p in creds} == {
        "If-None-Match",
        "Authorization",
        "Cookie",
        "X-Request-ID",
    }
    for path, item in document["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                assert response["headers"]["X-Request-ID"]["required"], (path, method, status)
