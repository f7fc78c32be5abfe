"""Liveness and readiness: /healthz stays cheap; /readyz names the part that is not ready."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from aggregator.config import parse_config
from aggregator.errors import ConfigError
from tests.support.configs import cached_config
from tests.support.paths import ROOT
from tests.support.redis import new_prefix
from tests.support.servers import serving


def test_healthz_is_liveness_only(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ok"}


def test_readyz_without_a_lifespan_names_the_client(client):
    # Flask's test client: config and cache are there, but no server loop opened a client.
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.get_json()
    assert body["error"] == "Service Unavailable"
    assert body["failed"] == ["client"]
    assert "client: not open" in body["message"]
    assert body["checks"]["config"]["ok"] is True
    assert body["checks"]["cache"] == {"ok": True, "detail": "in-process memory"}
    assert r.headers["Cache-Control"] == "no-store"


async def test_readyz_is_ready_between_startup_and_shutdown(config_path):
    async with serving(config_path) as (adapter, client):
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ready"
        assert {name: c["ok"] for name, c in body["checks"].items()} == {
            "config": True,
            "client": True,
            "cache": True,
        }
        assert "1 aggregates, 5 upstreams" in body["checks"]["config"]["detail"]
        await adapter.shutdown()
        after = await client.get("/readyz")
        await adapter.startup()  # so the context manager's shutdown has something to close
    assert after.status_code == 503
    assert after.json()["failed"] == ["client"]


async def test_readyz_fails_on_a_dead_cache_directory(demo, write_config, tmp_path):
    cache_dir = tmp_path / "cache"
    config = write_config(cached_config(demo.url))
    async with serving(config, cache_type="filesystem", cache_dir=cache_dir) as (_, client):
        assert (await client.get("/readyz")).status_code == 200
        shutil.rmtree(cache_dir)
        cache_dir.write_text("not a directory")  # as root, permissions alone would not stop us
        r = await client.get("/readyz")
        # The aggregates still answer, uncached: not ready is not dead.
        served = await client.get("/api/five?city=Paris&user_id=7")
    assert r.status_code == 503
    body = r.json()
    assert body["failed"] == ["cache"]
    assert body["message"].startswith("not ready: cache: backend unreachable")
    assert served.status_code == 200
    assert served.headers["x-cache"] == "BYPASS"


@pytest.mark.integration
@pytest.mark.parametrize("outage", ["killed", "paused"])
async def test_readyz_reports_a_redis_outage_within_the_cache_timeout(
    demo, write_config, private_redis, outage
):
    config = write_config(cached_config(demo.url))
    settings = {
        "cache_type": "redis",
        "cache_redis_url": private_redis.url,
        "cache_key_prefix": new_prefix(),
        "cache_timeout": 0.3,
    }
    async with serving(config, **settings) as (_, client):
        assert (await client.get("/readyz")).json()["checks"]["cache"] == {
            "ok": True,
            "detail": "redis PING answered",
        }
        private_redis.begin_outage(outage)
        started = time.perf_counter()
        down = await client.get("/readyz")
        took = time.perf_counter() - started
        # The probe is not silenced by the cool-down its own failure started.
        again = await client.get("/readyz")
        private_redis.end_outage(outage)
        back = await client.get("/readyz")
    assert down.status_code == 503 and again.status_code == 503
    assert down.json()["failed"] == ["cache"]
    assert took < 1.5  # bounded by cache_timeout, not redis-py's defaults
    assert back.status_code == 200, back.text


@pytest.mark.integration
def test_readyz_over_hypercorn_sees_the_server_loop_client(serve, config_path):
    server = serve(config_path)
    r = httpx.get(f"{server.url}/readyz", trust_env=False, timeout=10)
    assert r.status_code == 200, r.text
    client = r.json()["checks"]["client"]
    assert client["ok"] is True
    assert client["detail"].startswith("open; upstream connections: 0 in use, ")
    head = httpx.head(f"{server.url}/readyz", trust_env=False, timeout=10)
    assert head.status_code == 200


def test_readyz_is_a_reserved_path():
    text = cached_config("http://127.0.0.1:1").replace('path = "/api/five"', 'path = "/readyz"')
    with pytest.raises(ConfigError, match="aggregates.five.path: /readyz is reserved"):
        parse_config(text, "t.toml")


def test_dockerfile_checks_liveness_and_points_routing_at_readiness():
    text = (ROOT / "Dockerfile").read_text()
    start = text.index("\nHEALTHCHECK") + 1  # the instruction, not a comment naming it
    healthcheck = text[start : text.index("\n", text.index("CMD", start))]  # its own CMD line
    assert "/healthz" in healthcheck
    assert "/readyz" not in healthcheck  # a Redis outage must not restart every replica
    assert "readinessProbe" in text and "/readyz" in text
