"""Purging: the admin endpoint (token, body, effects) and `aggregator cache purge`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask.testing import FlaskClient
from pydantic import SecretStr

from aggregator import create_app, create_asgi_app
from aggregator.demo.process import DemoProcess, free_port
from aggregator.ops import cli
from aggregator.settings import Settings

# The CLI's logging set-up would outlive CliRunner's stderr (conftest.no_log_handlers).
pytestmark = pytest.mark.usefixtures("no_log_handlers")

TOKEN = "s3cret-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PARIS = {"city": "Paris", "user_id": "7"}
OSLO = {"city": "Oslo", "user_id": "7"}


def purge_config(base_url: str) -> str:
    """`board` (weather, news, profile) and `portfolio` (stocks, profile), both cached 60 s."""
    return f"""
[upstreams.weather]
url = "{base_url}/weather/{{city}}?delay=0"
timeout = 3.0
schema = "aggregator.demo.models:Weather"

[upstreams.news]
url = "{base_url}/news?topic={{topic}}&delay=0"
timeout = 3.0
schema = "aggregator.demo.models:News"

[upstreams.profile]
url = "{base_url}/profile/{{user_id}}?delay=0"
timeout = 3.0
schema = "aggregator.demo.models:Profile"

[upstreams.stocks]
url = "{base_url}/stocks/{{user_id}}?delay=0"
timeout = 3.0
schema = "aggregator.demo.models:Stocks"

[aggregates.board]
path = "/api/board"
sources = ["weather", "news", "profile"]
cache_ttl = 60
params = {{ city = "str", user_id = "int", topic = {{ type = "str", default = "general" }} }}

[aggregates.portfolio]
path = "/api/portfolio"
sources = ["stocks", "profile"]
cache_ttl = 60
params = {{ user_id = "int" }}
"""


@pytest.fixture
def offline_config(write_config: Callable[[str], Path]) -> Path:
    """The purge config with upstreams nobody calls: purging never reaches an upstream."""
    return write_config(purge_config("http://127.0.0.1:9"))


@pytest.fixture
def demo_config(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    return write_config(purge_config(demo.url))


@pytest.fixture
def admin(offline_config: Path) -> FlaskClient:
    return create_app(Settings(config=offline_config, admin_token=SecretStr(TOKEN))).test_client()


def x_cache(client: FlaskClient, path: str, query: dict[str, str]) -> str:
    response = client.get(path, query_string=query)
    assert response.status_code == 200, response.json
    return response.headers["X-Cache"]


def fill(client: FlaskClient, path: str, query: dict[str, str]) -> None:
    """Request until cached: the first answer is a MISS, the next one a HIT."""
    x_cache(client, path, query)
    assert x_cache(client, path, query) == "HIT"


# -- the endpoint: token -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "headers", "says"),
    [
        pytest.param(TOKEN, {}, "Authorization: Bearer", id="missing-header"),
        pytest.param(TOKEN, {"Authorization": f"Basic {TOKEN}"}, "Bearer", id="wrong-scheme"),
        pytest.param(TOKEN, {"Authorization": "Bearer"}, "Bearer", id="scheme-without-token"),
        pytest.param(TOKEN, {"Authorization": "Bearer "}, "Bearer", id="empty-token"),
        pytest.param(TOKEN, {"Authorization": TOKEN}, "Bearer", id="token-without-scheme"),
        pytest.param(
            TOKEN, {"Authorization": "Bearer " + "x" * len(TOKEN)}, "wrong", id="wrong-same-length"
        ),
        pytest.param(TOKEN, {"Authorization": f"Bearer {TOKEN}x"}, "wrong", id="token-plus-one"),
        pytest.param(TOKEN, {"Authorization": f"Bearer {TOKEN[:-1]}"}, "wrong", id="prefix"),
    ],
)
def test_purge_refuses_without_the_admin_token(offline_config, caplog, token, headers, says):
    caplog.set_level(logging.DEBUG, logger="aggregator")
    secret = None if token is None else SecretStr(token)
    client = create_app(Settings(config=offline_config, admin_token=secret)).test_client()

    response = client.post("/admin/purge", json={"aggregate": "board"}, headers=headers)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json is not None
    assert response.json["error"] == "Unauthorized"
    assert says in response.json["message"]
    assert "admin request refused" in caplog.text
    assert TOKEN not in response.get_data(as_text=True)
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(f"Bearer {TOKEN}", id="bearer"),
        pytest.param(f"bearer {TOKEN}", id="scheme-is-case-insensitive"),
        pytest.param(f"  Bearer   {TOKEN} ", id="extra-spaces"),
    ],
)
def test_purge_accepts_the_admin_token(admin, caplog, authorization):
    caplog.set_level(logging.DEBUG, logger="aggregator")

    response = admin.post(
        "/admin/purge", json={"aggregate": "board"}, headers={"Authorization": authorization}
    )

    assert response.status_code == 200, response.json
    assert response.json == {"purged": ["aggregate board"]}
    assert "admin purge: aggregate board" in caplog.text
    assert TOKEN not in caplog.text


# -- the endpoint: body ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        pytest.param(b"aggregate=board", "body", "JSON object", id="not-json"),
        pytest.param(b"", "body", "JSON object", id="empty"),
        pytest.param(b'["board"]', "body", "JSON object", id="array"),
        pytest.param(b"{}", "body", "aggregate", id="no-target"),
        pytest.param(b'{"aggregate": "board", "purge": 1}', "purge", "unknown key", id="extra-key"),
        pytest.param(b'{"aggregate": 5}', "aggregate", "string", id="aggregate-not-a-string"),
        pytest.param(b'{"aggregate": ""}', "aggregate", "string", id="aggregate-empty"),
        pytest.param(b'{"upstream": ["weather"]}', "upstream", "string", id="upstream-list"),
        pytest.param(b'{"aggregate": "board", "params": 1}', "params", "object", id="params-int"),
        pytest.param(b'{"params": {"user_id": 7}}', "params", "aggregate", id="params-alone"),
        pytest.param(
            b'{"aggregate": "board", "params": {"city": "Paris", "user_id": "seven"}}',
            "params.user_id",
            "must be an integer",
            id="bad-param-value",
        ),
        pytest.param(
            b'{"aggregate": "board", "params": {"city": "Paris", "user_id": 7.5}}',
            "params.user_id",
            "must be an integer",
            id="float-for-int",
        ),
        pytest.param(
            b'{"aggregate": "board", "params": {"city": null, "user_id": 7}}',
            "params.city",
            "string, number or boolean",
            id="null-param",
        ),
        pytest.param(
            b'{"aggregate": "board", "params": {"city": {"name": "Paris"}, "user_id": 7}}',
            "params.city",
            "string, number or boolean",
            id="object-param",
        ),
        pytest.param(
            b'{"aggregate": "board", "params": {"user_id": 7}}',
            "params.city",
            "missing",
            id="missing-param",
        ),
        pytest.param(
            b'{"aggregate": "board", "params": {"city": "Paris", "user_id": 7, "topik": "x"}}',
            "params.topik",
            "unknown parameter",
            id="unknown-param",
        ),
    ],
)
def test_purge_rejects_a_bad_body_naming_the_field(admin, body, field, says):
    response = admin.post(
        "/admin/purge", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )

    assert response.status_code == 400, response.json
    assert response.json is not None
    assert response.json["error"] == "Bad Request"
    assert response.json["field"] == field
    assert says in response.json["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"aggregate": "nope"}, "aggregate", id="aggregate"),
        pytest.param({"upstream": "nope"}, "upstream", id="upstream"),
        pytest.param({"aggregate": "nope", "params": {"a": 1}}, "aggregate", id="with-params"),
    ],
)
def test_purge_of_an_unknown_name_is_404(admin, body, field):
    response = admin.post("/admin/purge", json=body, headers=AUTH)

    assert response.status_code == 404
    assert response.json is not None
    assert response.json["field"] == field
    assert "nope" in response.json["message"]
    assert "known:" in response.json["message"]


def test_purge_answers_503_when_the_cache_backend_is_unreachable(offline_config):
    settings = Settings(
        config=offline_config,
        admin_token=SecretStr(TOKEN),
        cache_type="redis",
        cache_redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nobody listens there
    )
    client = create_app(settings).test_client()

    response = client.post("/admin/purge", json={"upstream": "weather"}, headers=AUTH)

    assert response.status_code == 503
    assert response.json is not None
    assert response.json["error"] == "Service Unavailable"
    assert "unreachable" in response.json["message"]


def test_purge_is_post_only(admin):
    response = admin.get("/admin/purge", headers=AUTH)

    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == {"OPTIONS", "POST"}


@pytest.mark.parametrize("mode", ["loop", "threads", "serial"])
async def test_purge_is_served_by_the_asgi_stack(offline_config, mode):
    settings = Settings(config=offline_config, admin_token=SecretStr(TOKEN), mode=mode)
    adapter = create_asgi_app(settings)
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's ASGI types
    async with adapter.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        ok = await c.post("/admin/purge", json={"upstream": "weather"}, headers=AUTH)
        refused = await c.post("/admin/purge", json={"upstream": "weather"})

    assert ok.status_code == 200, ok.text
    assert ok.json() == {"purged": ["upstream weather", "aggregate board"]}
    assert refused.status_code == 401


# -- the endpoint: effects ---------------------------------------------------------------------


@pytest.mark.integration
def test_purging_an_aggregate_makes_every_entry_of_it_miss(demo_config):
    client = create_app(Settings(config=demo_config, admin_token=SecretStr(TOKEN))).test_client()
    fill(client, "/api/board", PARIS)
    fill(client, "/api/board", OSLO)
    fill(client, "/api/portfolio", {"user_id": "7"})

    response = client.post("/admin/purge", json={"aggregate": "board"}, headers=AUTH)

    assert response.status_code == 200, response.json
    assert response.json == {"purged": ["aggregate board"]}
    assert x_cache(client, "/api/board", PARIS) == "MISS"
    assert x_cache(client, "/api/board", OSLO) == "MISS"
    assert x_cache(client, "/api/portfolio", {"user_id": "7"}) == "HIT"
    assert x_cache(client, "/api/board", PARIS) == "HIT"  # refilled after the purge


@pytest.mark.integration
@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"city": "Paris", "user_id": 7}, id="typed"),
        pytest.param({"city": "Paris", "user_id": "07"}, id="as-in-a-query"),
        pytest.param({"user_id": 7, "city": "Paris", "topic": "general"}, id="default-given"),
        pytest.param({"city": "Paris", "user_id": 7, "topic": ""}, id="empty-means-default"),
    ],
)
def test_purging_one_param_set_leaves_the_others_cached(demo_config, params):
    client = create_app(Settings(config=demo_config, admin_token=SecretStr(TOKEN))).test_client()
    fill(client, "/api/board", PARIS)
    fill(client, "/api/board", OSLO)

    response = client.post(
        "/admin/purge", json={"aggregate": "board", "params": params}, headers=AUTH
    )

    assert response.status_code == 200, response.json
    assert response.json is not None
    assert len(response.json["purged"]) == 1
    assert x_cache(client, "/api/board", PARIS) == "MISS"
    assert x_cache(client, "/api/board", OSLO) == "HIT"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("upstream", "missed", "kept"),
    [
        pytest.param("weather", ["board"], ["portfolio"], id="weather"),
        pytest.param("stocks", ["portfolio"], ["board"], id="stocks"),
        pytest.param("profile", ["board", "portfolio"], [], id="shared-profile"),
    ],
)
def test_purging_an_upstream_misses_every_aggregate_built_from_it(
    demo_config, upstream, missed, kept
):
    client = create_app(Settings(config=demo_config, admin_token=SecretStr(TOKEN))).test_client()
    queries = {"board": PARIS, "portfolio": {"user_id": "7"}}
    for name, query in queries.items():
        fill(client, f"/api/{name}", query)

    response = client.post("/admin/purge", json={"upstream": upstream}, headers=AUTH)

    assert response.status_code == 200, response.json
    assert response.json == {
        "purged": [f"upstream {upstream}", *(f"aggregate {name}" for name in missed)]
    }
    for name in missed:
        assert x_cache(client, f"/api/{name}", queries[name]) == "MISS", name
    for name in kept:
        assert x_cache(client, f"/api/{name}", queries[name]) == "HIT", name


# -- the CLI -----------------------------------------------------------------------------------


@pytest.fixture
def shared_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A FileSystemCache that the filling app and the CLI both open, through the same settings."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("AGGREGATOR_CACHE_TYPE", "filesystem")
    monkeypatch.setenv("AGGREGATOR_CACHE_DIR", str(cache_dir))
    # Another process's purge reaches a server's near cache within cache_local_ttl; the CLI is
    # another process, and "the next request misses" should not wait for that.
    monkeypatch.setenv("AGGREGATOR_CACHE_LOCAL_TTL", "0")
    return cache_dir


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "says", "kept"),
    [
        pytest.param(["board"], "purged aggregate board", [], id="aggregate"),
        pytest.param(
            ["board", "--param", "user_id=07", "--param", "city=Paris"],
            "purged agg:board:",
            [("board", OSLO), ("portfolio", {"user_id": "7"})],
            id="one-entry",
        ),
        pytest.param(
            ["--upstream", "weather"],
            "purged upstream weather, aggregate board",
            [("portfolio", {"user_id": "7"})],
            id="upstream",
        ),
    ],
)
def test_cli_purge_makes_the_next_request_miss(runner, shared_cache, demo_config, args, says, kept):
    client = create_app(Settings(config=demo_config)).test_client()
    fill(client, "/api/board", PARIS)
    fill(client, "/api/board", OSLO)
    fill(client, "/api/portfolio", {"user_id": "7"})

    result = runner.invoke(cli.main, ["cache", "purge", *args, "--config", str(demo_config)])

    assert result.exit_code == 0, result.output
    assert result.output.startswith(says)
    assert result.output.endswith("(filesystem cache)\n")
    assert result.output.count("\n") == 1
    assert x_cache(client, "/api/board", PARIS) == "MISS"
    for name, query in kept:
        assert x_cache(client, f"/api/{name}", query) == "HIT", name


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param([], "AGGREGATE, --upstream NAME, or both", id="no-target"),
        pytest.param(["--param", "user_id=7"], "--param needs an AGGREGATE", id="param-alone"),
        pytest.param(["nope"], "unknown aggregate 'nope'", id="unknown-aggregate"),
        pytest.param(["--upstream", "nope"], "unknown upstream 'nope'", id="unknown-upstream"),
        pytest.param(["board", "--param", "user_id"], "NAME=VALUE", id="param-without-equals"),
        pytest.param(["board", "--param", "=7"], "NAME=VALUE", id="param-without-name"),
        pytest.param(
            ["board", "--param", "user_id=7", "--param", "user_id=8"],
            "user_id: given more than once",
            id="param-twice",
        ),
        pytest.param(
            ["board", "--param", "city=Paris", "--param", "user_id=seven"],
            "user_id: must be an integer",
            id="bad-param-value",
        ),
        pytest.param(
            ["board", "--param", "user_id=7"],
            "city: required str parameter is missing",
            id="missing-param",
        ),
        pytest.param(
            ["portfolio", "--param", "user_id=7", "--param", "city=Paris"],
            "city: unknown parameter",
            id="unknown-param",
        ),
    ],
)
def test_cli_purge_usage_errors_exit_2_naming_the_field(
    runner, shared_cache, offline_config, args, says
):
    result = runner.invoke(cli.main, ["cache", "purge", *args, "--config", str(offline_config)])

    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output
    assert not shared_cache.exists()  # refused before the cache was even opened


@pytest.mark.parametrize("cache_type", ["simple", "null"])
def test_cli_purge_refuses_a_per_process_cache(runner, monkeypatch, offline_config, cache_type):
    monkeypatch.setenv("AGGREGATOR_CACHE_TYPE", cache_type)
    purges: list[Any] = []
    monkeypatch.setattr("aggregator.ops.purge.purge_cache", lambda *a, **kw: purges.append((a, kw)))

    result = runner.invoke(cli.main, ["cache", "purge", "board", "--config", str(offline_config)])

    assert result.exit_code == 2, result.output
    assert f"cache_type={cache_type!r}" in result.output
    assert "POST /admin/purge" in result.output
    assert purges == []


def test_cli_purge_exits_1_when_the_cache_backend_is_unreachable(
    runner, monkeypatch, offline_config
):
    monkeypatch.setenv("AGGREGATOR_CACHE_TYPE", "redis")
    monkeypatch.setenv("AGGREGATOR_CACHE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")

    result = runner.invoke(cli.main, ["cache", "purge", "board", "--config", str(offline_config)])

    assert result.exit_code == 1, result.output
    assert "the redis cache is unreachable" in result.output
    assert "Traceback" not in result.output


def test_cli_purge_exits_1_for_an_unusable_config(runner, shared_cache, tmp_path):
    result = runner.invoke(
        cli.main, ["cache", "purge", "board", "--config", str(tmp_path / "missing.toml")]
    )

    assert result.exit_code == 1, result.output
    assert "cannot read the file" in result.output


def test_cli_purge_passes_typed_params_to_the_library(
    runner, monkeypatch, shared_cache, offline_config
):
    calls: list[dict[str, Any]] = []

    def fake_purge_cache(settings: Settings, config: Any, **kwargs: Any) -> list[str]:
        calls.append({"cache_type": settings.cache_type, **kwargs})
        return ["entry"]

    monkeypatch.setattr("aggregator.ops.purge.purge_cache", fake_purge_cache)
    args = ["board", "--param", "user_id=07", "--param", "city=Paris", "--upstream", "news"]

    result = runner.invoke(cli.main, ["cache", "purge", *args, "--config", str(offline_config)])

    assert result.exit_code == 0, result.output
    assert calls == [
        {
            "cache_type": "filesystem",
            "aggregate": "board",
            "params": {"city": "Paris", "user_id": 7, "topic": "general"},
            "upstream": "news",
        }
    ]
