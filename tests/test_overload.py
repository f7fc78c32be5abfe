"""The in-flight limit (503 + Retry-After instead of a queue) and the lifespan's drain."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from aggregator import create_app
from aggregator.config import load_config
from aggregator.engine import engine_of
from aggregator.openapi import build_openapi
from aggregator.routes import ALWAYS_ANSWERED, METRICS, STATUS
from aggregator.serving import ASGIAdapter
from aggregator.serving.answers import overload_answer
from aggregator.settings import Settings
from tests.support.demo import demo_stats, reset_demo

#: An upstream nothing calls in the unit tests (port 9: discard; never reached).
_IDLE_CONFIG = """
[upstreams.idle]
url = "http://127.0.0.1:9/idle"

[aggregates.idle]
path = "/api/idle"
sources = ["idle"]
"""


def _held(config: Path, **settings: Any) -> tuple[ASGIAdapter, asyncio.Event]:
    """The real app plus `/held`, which stays in flight until the returned event is set."""
    app = create_app(Settings(config=config, **settings))
    release = asyncio.Event()

    @app.get("/held")
    async def held() -> dict[str, bool]:
        await release.wait()
        return {"released": True}

    return ASGIAdapter(app, Settings(config=config, **settings)), release


def _client(adapter: ASGIAdapter) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's ASGI types
    return httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30)


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_requests_over_the_limit_get_503_at_once_and_service_recovers(write_config, caplog):
    adapter, release = _held(write_config(_IDLE_CONFIG), max_in_flight=2)
    caplog.set_level(logging.WARNING, logger="aggregator.adapter")
    async with adapter.lifespan(), _client(adapter) as client:
        holders = [asyncio.create_task(client.get("/held")) for _ in range(2)]
        await _until(lambda: adapter.in_flight == 2)

        refused = [await client.get("/held"), await client.get("/api/idle")]
        probes = [await client.get(p) for p in ("/healthz", "/readyz", STATUS, METRICS)]
        head = await client.head("/held")

        release.set()
        done = await asyncio.gather(*holders)
        after = await client.get("/held")

    for r in refused:
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/json"
        assert r.headers["cache-control"] == "no-store"
        assert r.json() == {
            "error": "Service Unavailable",
            "message": "overloaded: 2 requests already in flight in this worker; retry after 1 s",
            "retry_after": 1,
        }
    assert (head.status_code, head.content) == (503, b"")
    # All answered at the limit (/metrics by its own 404: no admin token in this test).
    assert [p.status_code for p in probes] == [200, 200, 200, 404]
    assert [r.status_code for r in done] == [200, 200]
    assert after.status_code == 200  # recovered as soon as the load dropped
    assert adapter.in_flight == 0
    warnings = [r for r in caplog.records if "refusing requests with 503" in r.message]
    assert len(warnings) == 1  # three refusals, one log line per interval


def test_the_503_is_in_the_openapi_document(write_config):
    config = load_config(write_config(_IDLE_CONFIG))
    document = build_openapi(config, sync_prefixes=("/sync",))
    validate(document)
    answer = overload_answer(Settings(max_in_flight=8))
    for path in ("/api/idle", "/sync/api/idle"):
        response = document["paths"][path]["get"]["responses"]["503"]
        assert response["headers"]["Retry-After"]["required"] is True
        schema = {**response["content"]["application/json"]["schema"], **document}
        jsonschema.Draft202012Validator(schema).validate(json.loads(answer.body))


async def test_retry_after_is_a_setting(write_config):
    adapter, release = _held(write_config(_IDLE_CONFIG), max_in_flight=1, overload_retry_after=7)
    async with adapter.lifespan(), _client(adapter) as client:
        holder = asyncio.create_task(client.get("/held"))
        await _until(lambda: adapter.in_flight == 1)
        refused = await client.get("/held")
        release.set()
        await holder
    assert refused.headers["retry-after"] == "7"
    assert refused.json()["retry_after"] == 7


async def test_zero_means_no_limit(write_config):
    adapter, release = _held(write_config(_IDLE_CONFIG), max_in_flight=0)
    async with adapter.lifespan(), _client(adapter) as client:
        holders = [asyncio.create_task(client.get("/held")) for _ in range(20)]
        await _until(lambda: adapter.in_flight == 20)
        release.set()
        done = await asyncio.gather(*holders)
    assert [r.status_code for r in done] == [200] * 20


def test_monitoring_paths_are_the_real_routes():
    assert {METRICS, STATUS, "/healthz", "/readyz"} == ALWAYS_ANSWERED


def test_the_default_limit_is_sized_for_one_worker():
    settings = Settings()
    assert settings.max_in_flight == 1024
    assert settings.overload_retry_after == 1


@pytest.mark.integration
async def test_fresh_cache_hits_are_answered_at_the_limit(demo, write_config):
    config = write_config(
        _IDLE_CONFIG
        + f"""
[upstreams.weather]
url = "{demo.url}/weather/{{city}}?delay=0"
schema = "aggregator.demo.models:Weather"

[aggregates.weather]
path = "/api/weather"
sources = ["weather"]
cache_ttl = 60
params = {{ city = "str" }}
"""
    )
    adapter, release = _held(config, max_in_flight=1)
    async with adapter.lifespan(), _client(adapter) as client:
        filled = await client.get("/api/weather", params={"city": "Oslo"})
        holder = asyncio.create_task(client.get("/held"))
        await _until(lambda: adapter.in_flight == 1)
        hit = await client.get("/api/weather", params={"city": "Oslo"})
        miss = await client.get("/api/weather", params={"city": "Lima"})
        release.set()
        await holder
    assert filled.headers["x-cache"] == "MISS"
    assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")  # the fast path, uncounted
    assert miss.status_code == 503  # a miss needs Flask and a fan-out: refused


@pytest.mark.integration
async def test_shutdown_waits_for_in_flight_fan_outs_before_closing_the_client(demo, write_config):
    config = write_config(
        f"""
[upstreams.slow]
url = "{demo.url}/profile/{{user_id}}?delay=1"
timeout = 5
schema = "aggregator.demo.models:Profile"

[aggregates.slow]
path = "/api/slow"
sources = ["slow"]
required = ["slow"]
deadline = 3
params = {{ user_id = "int" }}
"""
    )
    settings = Settings(config=config)
    adapter = ASGIAdapter(create_app(settings), settings)
    await adapter.startup()
    async with _client(adapter) as client:
        request = asyncio.create_task(client.get("/api/slow", params={"user_id": "7"}))
        await _until(lambda: adapter.in_flight == 1)
        started = time.perf_counter()
        await adapter.shutdown()  # as a server would send lifespan.shutdown mid-request
        waited = time.perf_counter() - started
        r = await request
    assert r.status_code == 200, r.text  # not cut: the client was closed after it finished
    assert r.json()["complete"] is True
    assert 0.5 < waited < 3.0  # waited for the ~1 s call, within the deadline + 1 s bound
    assert engine_of(adapter.app).clients.shared() is None  # and then closed


@pytest.mark.integration
async def test_overload_on_real_hypercorn_refuses_fast_and_recovers(serve, demo, write_config):
    latency = 2.0
    config = write_config(
        f"""
[upstreams.slow]
url = "{demo.url}/profile/{{user_id}}?delay={latency}"
timeout = 5
schema = "aggregator.demo.models:Profile"

[aggregates.slow]
path = "/api/slow"
sources = ["slow"]
deadline = 4
params = {{ user_id = "int" }}
"""
    )
    server = serve(config, max_in_flight="4")
    url = f"{server.url}/api/slow?user_id=7"
    reset_demo(demo)
    leftover = demo_stats(demo)["in_flight"]  # calls other tests abandoned, still sleeping
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:

        async def timed(path: str) -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            response = await client.get(path)
            return response, time.perf_counter() - started

        burst = asyncio.gather(*[timed(url) for _ in range(16)])
        await asyncio.sleep(0.5)
        health, _ = await timed(f"{server.url}/healthz")
        answers = await burst
        after = [await client.get(url) for _ in range(2)]

    ok = [t for r, t in answers if r.status_code == 200]
    refused = [(r, t) for r, t in answers if r.status_code == 503]
    seen = (
        f"limit 4, 16 concurrent requests of a {latency:g} s source: {len(ok)} x 200 "
        f"(slowest {max(ok, default=0):.2f} s), {len(refused)} x 503 (slowest "
        f"{max((t for _, t in refused), default=0):.3f} s)"
    )
    assert len(ok) + len(refused) == 16, seen
    assert 4 <= len(ok) <= 6 and len(refused) >= 10, seen  # 4 admitted (+ stragglers after)
    assert all(t < latency / 2 for _, t in refused), seen  # refused at once, not queued
    assert all(r.headers["retry-after"] == "1" for r, _ in refused)
    assert all(r.json()["error"] == "Service Unavailable" for r, _ in refused)
    assert health.status_code == 200  # probes answered at the limit
    assert [r.status_code for r in after] == [200, 200]  # recovered once the burst ended
    assert demo_stats(demo)["max_in_flight"] <= leftover + 4  # the upstream never saw the excess
    assert "Traceback" not in server.log()
