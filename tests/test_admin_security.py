"""Admin routes are POST-only and token-only (disabled, 404 like /metrics, without a token);
debug is off in every shipped configuration; no traceback or exception text ever reaches a
response body."""

from __future__ import annotations

import tomllib
from itertools import product
from typing import Any, get_args

import httpx
import pytest
from hypercorn.config import Config
from pydantic import SecretStr

from aggregator import create_app, create_asgi_app
from aggregator.cache import backends
from aggregator.engine import engine_of
from aggregator.ops import serve as ops_serve
from aggregator.settings import CacheType, Engine, Mode, Settings
from aggregator.views import admin
from tests.support.crashing_app import SECRET, add_failing_routes
from tests.support.paths import ROOT

TOKEN = "admin-token-" + "x" * 32
ROUTES = ["/admin/purge", "/admin/warm"]
BODIES = {"/admin/purge": {"aggregate": "five"}, "/admin/warm": {"aggregate": "five"}}


# -- admin: disabled without a token, POST-only --------------------------------------------------


@pytest.fixture
def no_admin_actions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records any purge or warm the admin views start; a refused request must start none."""
    started: list[str] = []

    async def purge(*args: Any, **kwargs: Any) -> list[str]:
        started.append("purge")
        return []

    monkeypatch.setattr(admin, "purge", purge)
    return started


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("token", [None, ""], ids=["unset", "empty"])
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer "}, id="empty-bearer"),
        pytest.param({"Authorization": f"Bearer {TOKEN}"}, id="any-bearer"),
    ],
)
def test_admin_routes_are_disabled_without_a_token(
    config_path, no_admin_actions, monkeypatch, route, token, headers
):
    secret = None if token is None else SecretStr(token)
    app = create_app(Settings(config=config_path, admin_token=secret))
    warms: list[str] = []
    monkeypatch.setattr(engine_of(app).cache, "warm", lambda *a, **k: warms.append("warm"))

    response = app.test_client().post(route, json=BODIES[route], headers=headers)

    assert response.status_code == 404
    assert response.json is not None
    assert response.json["error"] == "Not Found"
    assert "field" not in response.json  # unlike an unknown aggregate's 404
    assert "disabled" in response.json["message"]
    assert "AGGREGATOR_ADMIN_TOKEN" in response.json["message"]
    assert "WWW-Authenticate" not in response.headers  # no credential would help
    assert no_admin_actions == [] and warms == []


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("token", [None, TOKEN], ids=["disabled", "enabled"])
def test_admin_routes_are_post_only(config_path, no_admin_actions, route, method, token):
    secret = None if token is None else SecretStr(token)
    client = create_app(Settings(config=config_path, admin_token=secret)).test_client()

    response = client.open(
        route, method=method, json=BODIES[route], headers={"Authorization": f"Bearer {TOKEN}"}
    )

    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == {"OPTIONS", "POST"}
    assert response.json is not None and response.json["error"] == "Method Not Allowed"
    assert no_admin_actions == []


@pytest.mark.parametrize("mode", get_args(Mode))
async def test_admin_is_disabled_through_the_asgi_stack_in_every_mode(config_path, mode):
    adapter = create_asgi_app(Settings(config=config_path, mode=mode))
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's ASGI types
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with adapter.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        answers = [await c.post(route, json=BODIES[route], headers=auth) for route in ROUTES]
    assert [r.status_code for r in answers] == [404, 404]
    assert all("disabled" in r.json()["message"] for r in answers)


@pytest.mark.integration
def test_admin_is_disabled_on_real_hypercorn_without_a_token(serve, config_path):
    server = serve(config_path)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        posts = [client.post(route, json=BODIES[route], headers=auth) for route in ROUTES]
        gets = [client.get(route, headers=auth) for route in ROUTES]
    assert [r.status_code for r in posts] == [404, 404]
    metrics = httpx.get(f"{server.url}/metrics", headers=auth, trust_env=False)
    assert metrics.status_code == 404  # the other token-guarded route answers alike
    assert [r.status_code for r in gets] == [405, 405]
    assert all(r.headers["content-type"] == "application/json" for r in posts + gets)


# -- debug is off everywhere -----------------------------------------------------------------


COMBINATIONS = list(product(get_args(Mode), get_args(Engine), get_args(CacheType)))


@pytest.mark.parametrize(("mode", "engine", "cache_type"), COMBINATIONS)
def test_debug_is_off_for_every_shipped_settings_combination(
    config_path, tmp_path, monkeypatch, mode, engine, cache_type
):
    # What an operator's shell might export; none of it may turn Flask's debug mode on.
    monkeypatch.setenv("FLASK_DEBUG", "1")
    monkeypatch.setenv("FLASK_ENV", "development")
    if cache_type == "rediscluster":
        # redis-py's cluster client asks a live node for the slot map while it is built; the
        # backend plays no part in debug mode, so stand in an offline one for it.
        offline = classmethod(lambda cls, *args: backends.NullCache())
        monkeypatch.setattr(backends.RedisClusterCache, "factory", offline)
    settings = Settings(
        config=config_path,
        mode=mode,
        engine=engine,
        cache_type=cache_type,
        cache_dir=tmp_path / "cache",
        cache_redis_nodes="127.0.0.1:1",  # the sentinel client connects lazily
    )
    app = create_app(settings)

    assert app.debug is False
    assert app.config["DEBUG"] is False
    assert not app.config["PROPAGATE_EXCEPTIONS"]
    assert not app.testing


def test_entry_points_build_apps_without_debug(config_path, monkeypatch):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    monkeypatch.setenv("AGGREGATOR_CONFIG", str(config_path))

    assert ops_serve.worker_app().app.debug is False  # what `aggregator serve`'s workers build


def test_shipped_server_configs_turn_no_debug_on():
    raw = tomllib.loads((ROOT / "hypercorn.toml").read_text())
    config = Config.from_toml(ROOT / "hypercorn.toml")
    dockerfile = (ROOT / "Dockerfile").read_text()

    assert raw.get("debug", False) is False and config.debug is False
    assert raw.get("use_reloader", False) is False and config.use_reloader is False
    assert raw.get("loglevel", "INFO").upper() != "DEBUG"
    for needle in ("FLASK_DEBUG", "--debug", "--reload", "LOG_LEVEL=DEBUG"):
        assert needle not in dockerfile, needle
    assert "debug" not in (ROOT / "asgi.py").read_text().lower()


# -- no traceback in any response body ---------------------------------------------------------


def assert_opaque_500(response: httpx.Response, *, json_body: bool = True) -> None:
    """A 500 that says nothing about what failed or where."""
    assert response.status_code == 500
    text = response.text
    for leak in (SECRET, "Traceback", 'File "', "RuntimeError", ".py", "line 3"):
        assert leak not in text, (leak, text)
    if json_body:
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {
            "error": "Internal Server Error",
            "message": response.json()["message"],
        }


@pytest.mark.parametrize("mode", get_args(Mode))
@pytest.mark.parametrize("path", ["/boom/async", "/boom/sync"])
async def test_an_exception_in_a_view_is_an_opaque_json_500_in_every_mode(
    config_path, monkeypatch, mode, path
):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    adapter = create_asgi_app(Settings(config=config_path, mode=mode))
    add_failing_routes(adapter)
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's ASGI types
    async with adapter.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.get(path)
        after = await c.get("/healthz")
    assert_opaque_500(response)
    assert after.status_code == 200


@pytest.mark.integration
@pytest.mark.parametrize("mode", get_args(Mode))
def test_no_traceback_reaches_a_body_on_real_hypercorn(serve, config_path, mode):
    server = serve(config_path, app="tests.support.crashing_app:create()", mode=mode)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        views = [client.get(path) for path in ("/boom/async", "/boom/sync")]
        # Outside Flask (the adapter's fast path, loop and threads modes): Hypercorn's own 500.
        fast = client.get("/boom/fast")
        healthy = client.get("/healthz")
    for response in views:
        assert_opaque_500(response)
    if mode == "serial":  # no fast path: Flask answers the unknown path
        assert fast.status_code == 404
    else:
        assert_opaque_500(fast, json_body=False)
        assert fast.content == b""
    assert healthy.status_code == 200
    server.stop()
    log = server.log()
    assert SECRET in log  # the detail went to the log, where operators look for it
