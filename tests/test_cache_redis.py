"""The cache on real Redis degrades to BYPASS during an outage, quickly, logs it once per
interval, and is used again after `cache_retry_after`.

Outages use a private `redis-server` (tests/support/redis.py) on a free port, killed or paused
(SIGSTOP: it still accepts TCP connections but never answers). What Redis stores, corrupted
entries, a stalled Redis and single-flight across workers are tested on every backend in
test_cache_backends.py.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from tests.support.cache import cache_of, entry_key
from tests.support.configs import cached_config, url_for
from tests.support.fake_cache import Clock
from tests.support.redis import new_prefix, redis_settings
from tests.support.servers import serving

pytestmark = pytest.mark.integration

# -- degrade, never fail ------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["killed", "paused"])
async def test_every_request_during_a_redis_outage_is_a_quick_bypass(
    demo, write_config, private_redis, outage
):
    # cache_retry_after=0: every request really tries the sick Redis (no cool-down to hide in).
    config = write_config(cached_config(demo.url, delay=0.05))
    settings = redis_settings(private_redis, cache_retry_after=0)
    async with serving(config, **settings) as (adapter, client):
        warm = await client.get(url_for(0))
        assert warm.headers["x-cache"] == "MISS"
        private_redis.begin_outage(outage)
        took, states = [], []
        for i in range(1, 9):
            started = time.perf_counter()
            r = await client.get(url_for(i))
            took.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
            assert r.json()["complete"] is True
            states.append(r.headers["x-cache"])
        failures = cache_of(adapter).store.failures
    took_text = f"redis {outage}: 8 requests took {', '.join(f'{t:.2f}' for t in took)} s"
    assert set(states) == {"BYPASS"}
    assert failures >= 8  # each request met the outage itself
    assert max(took) < 2.0, took_text  # redis-py's defaults would stall ~a minute when paused


@pytest.mark.parametrize("outage", ["killed", "paused"])
async def test_after_an_outage_the_cache_is_used_again_after_retry_after(
    demo, write_config, private_redis, outage
):
    retry_after = 1.5  # long enough to restart Redis within it on a busy machine
    config = write_config(cached_config(demo.url, delay=0.05))
    settings = redis_settings(private_redis, cache_retry_after=retry_after)
    async with serving(config, **settings) as (adapter, client):
        private_redis.begin_outage(outage)
        down = await client.get(url_for(1))
        failed_at = time.monotonic()
        private_redis.end_outage(outage)
        cooling = await client.get(url_for(2))  # Redis is back, but we do not try it yet
        failures = cache_of(adapter).store.failures
        await asyncio.sleep(max(0.0, failed_at + retry_after + 0.1 - time.monotonic()))
        back = await client.get(url_for(3))
        again = await client.get(url_for(3))
        name = settings["cache_key_prefix"] + entry_key(adapter, "city=Paris&user_id=3")
    with private_redis.client() as raw_client:
        stored = raw_client.get(name)
    assert [r.status_code for r in (down, cooling, back, again)] == [200] * 4
    assert down.headers["x-cache"] == "BYPASS"
    assert cooling.headers["x-cache"] == "BYPASS" and failures == 1
    assert back.headers["x-cache"] == "MISS"
    assert again.headers["x-cache"] == "HIT"
    assert isinstance(stored, bytes) and stored.endswith(back.content)


async def test_a_redis_outage_is_logged_once_per_interval(
    demo, write_config, private_redis, caplog, monkeypatch
):
    # caplog sees `aggregator` records either way: through the root logger, or (once an entry
    # point has made the logger non-propagating) through the handler pytest attaches to it.
    caplog.set_level(logging.WARNING)
    config = write_config(cached_config(demo.url, delay=0.02))
    settings = redis_settings(private_redis, cache_retry_after=0, cache_log_interval=30)
    async with serving(config, **settings) as (adapter, client):
        store = cache_of(adapter).store
        clock = Clock()
        monkeypatch.setattr(store, "_clock", clock)  # the store's interval clock, not the TTLs'
        private_redis.kill()
        first = [await client.get(url_for(i)) for i in range(20)]
        failures = store.failures
        clock.now += 29.0
        still_first = await client.get(url_for(100))
        clock.now += 1.0
        before_second = store.failures
        second = await client.get(url_for(101))  # its first failure starts a new interval
    warnings = [r for r in caplog.records if r.name.startswith("aggregator.cache")]
    messages = [r.getMessage() for r in warnings]
    assert {r.headers["x-cache"] for r in [*first, still_first, second]} == {"BYPASS"}
    assert failures >= 20  # every request met the outage (no cool-down)
    assert len(warnings) == 2, messages  # one per 30 s interval, not one per request
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert "more since the last report" not in messages[0]
    # the second line accounts for every failure since the first
    assert f"({before_second - 1} more since the last report)" in messages[1], messages


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_hypercorn_serves_through_a_redis_outage(serve, demo, write_config, private_redis, outage):
    config = write_config(cached_config(demo.url, delay=0.05))
    prefix = new_prefix()
    settings = {"cache_redis_url": private_redis.url, "cache_key_prefix": prefix}
    server = serve(config, cache_type="redis", **settings)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as client:
        assert client.get(url_for(0)).headers["x-cache"] == "MISS"
        assert client.get(url_for(0)).headers["x-cache"] == "HIT"
        private_redis.begin_outage(outage)
        took, states = [], []
        for i in range(1, 6):
            started = time.perf_counter()
            r = client.get(url_for(i))
            took.append(time.perf_counter() - started)
            assert r.status_code == 200, r.text
            states.append(r.headers["x-cache"])
        if outage == "paused":
            private_redis.resume()
            time.sleep(1.2)  # the default cache_retry_after is 1 s
            after = [client.get(url_for(100)).headers["x-cache"] for _ in range(2)]
            assert after == ["MISS", "HIT"]
    assert set(states) == {"BYPASS"}
    assert max(took) < 2.0, f"hypercorn, redis {outage}: {', '.join(f'{t:.2f}' for t in took)} s"
    server.stop()
    log = server.log()
    assert "Traceback" not in log
    assert log.count("serving uncached") == 1  # logged once, not per request
