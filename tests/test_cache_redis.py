"""The cache on real Redis: JSON entries, degrading to BYPASS, and single-flight across workers.

Outages use a private `redis-server` this module starts on a free port, then kills or pauses
(SIGSTOP: it still accepts TCP connections but never answers). Cross-process tests use the shared
Redis on 127.0.0.1:6379 (`.ci/run` makes sure it answers) under a key prefix unique to the test,
and touch no other keys.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import PrivateRedis, reset_demo
from tests.test_cache_backends import (
    GARBAGE,
    QUERY,
    SERVICES,
    assert_our_format,
    burst,
    cache_of,
    cached_config,
    cold_burst_over_the_wire,
    entry_key,
    garbage,
    hits_from_every_worker,
    loop_lag,
    one_source_config,
    serving,
    upstream_calls,
    wait_for_workers,
)

pytestmark = pytest.mark.integration

SHARED_REDIS = ("127.0.0.1", 6379)


@pytest.fixture
def shared_redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex}:"
    host, port = SHARED_REDIS
    client = redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.fail(f"no Redis answers on {host}:{port} ({exc!r}); .ci/run starts one")
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def redis_settings(server: PrivateRedis, **settings: Any) -> dict[str, Any]:
    prefix = f"test-{uuid.uuid4().hex}:"
    base = {"cache_type": "redis", "cache_redis_url": server.url, "cache_key_prefix": prefix}
    return base | settings


def url_for(i: int) -> str:
    """A distinct key per `i`, so no in-process (near) cache can answer for Redis."""
    return f"/api/five?city=Paris&user_id={i}"


# -- what is stored -----------------------------------------------------------------------------


async def test_redis_entries_are_our_json_never_pickle(demo, write_config, private_redis):
    config = write_config(cached_config(demo.url, delay=0.05))
    settings = redis_settings(private_redis)
    async with serving(config, **settings) as (adapter, client):
        first = await client.get(f"/api/five?{QUERY}")
        name = settings["cache_key_prefix"] + entry_key(adapter)
    with private_redis.client() as raw_client:
        raw = raw_client.get(name)
        names = raw_client.keys("*")
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    assert isinstance(raw, bytes)
    assert_our_format(raw, first)
    assert names and all(n.startswith(settings["cache_key_prefix"].encode()) for n in names)


@pytest.mark.parametrize("kind", GARBAGE)
async def test_a_corrupted_redis_entry_is_a_miss_then_refilled(
    demo, write_config, private_redis, tmp_path, kind
):
    config = write_config(cached_config(demo.url, delay=0.05))
    settings = redis_settings(private_redis)
    tripwire = tmp_path / "unpickled"
    async with serving(config, **settings) as (adapter, client):
        name = settings["cache_key_prefix"] + entry_key(adapter)
        with private_redis.client() as raw_client:
            raw_client.set(name, garbage(kind, tripwire), ex=60)
            first = await client.get(f"/api/five?{QUERY}")
            second = await client.get(f"/api/five?{QUERY}")
            raw = raw_client.get(name)
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
    assert isinstance(raw, bytes)
    assert_our_format(raw, first)  # the garbage was replaced
    assert not tripwire.exists(), "the cache unpickled what it read"


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
    print(f"\nredis {outage}: 8 requests took {', '.join(f'{t:.2f}' for t in took)} s")
    assert set(states) == {"BYPASS"}
    assert failures >= 8  # each request met the outage itself
    assert max(took) < 2.0  # redis-py's defaults would stall about a minute when paused


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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


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
        clock = FakeClock()
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


async def test_a_stalled_redis_never_blocks_the_event_loop(
    demo, write_config, private_redis, monkeypatch
):
    # SIGSTOP: connections are accepted, nothing is ever answered; each cache call waits out
    # cache_timeout (0.5 s here) in a thread. Made on the loop, one call would stall it 0.5 s.
    # One source per request keeps the CPU work of 50 uncached fan-outs out of the measurement.
    config = write_config(one_source_config(demo.url))
    settings = redis_settings(private_redis, cache_timeout=0.5, cache_retry_after=0)
    async with serving(config, **settings) as (adapter, client):
        await client.get("/api/one?city=Oslo")  # connections and imports warm
        redis_client = cache_of(adapter).store.backend._write_client
        on_loop: list[str] = []
        real = redis_client.execute_command

        def execute_command(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                on_loop.append(str(args[0]))
            return real(*args, **kwargs)

        monkeypatch.setattr(redis_client, "execute_command", execute_command)
        private_redis.pause()
        gc.collect()  # a full collection is a pause of its own; not what this test measures
        async with loop_lag() as lag:
            started = time.perf_counter()
            responses = await burst(client, "/api/one?city=Paris", 50)
            elapsed = time.perf_counter() - started
        failures = cache_of(adapter).store.failures
    print(
        f"\nredis paused, cache_timeout 0.5 s, 50 concurrent: worst loop lag "
        f"{lag.worst * 1000:.1f} ms ({lag.ticks} ticks in {elapsed:.2f} s, {failures} failures)"
    )
    assert all(r.status_code == 200 for r in responses)
    assert {r.headers["x-cache"] for r in responses} == {"BYPASS"}
    assert failures >= 50 and on_loop == []
    assert elapsed < 5.0
    assert lag.ticks > 20
    assert lag.worst < 0.25  # a single cache call on the loop would be >= 0.5 s


@pytest.mark.parametrize("outage", ["killed", "paused"])
def test_hypercorn_serves_through_a_redis_outage(serve, demo, write_config, private_redis, outage):
    config = write_config(cached_config(demo.url, delay=0.05))
    prefix = f"test-{uuid.uuid4().hex}:"
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
    print(f"\nhypercorn, redis {outage}: {', '.join(f'{t:.2f}' for t in took)} s")
    assert set(states) == {"BYPASS"}
    assert max(took) < 2.0
    server.stop()
    log = server.log()
    assert "Traceback" not in log
    assert log.count("serving uncached") == 1  # logged once, not per request


# -- single-flight across processes -------------------------------------------------------------


async def test_redis_single_flight_across_two_workers(
    serve, demo, write_config, shared_redis_prefix
):
    host, port = SHARED_REDIS
    config = write_config(cached_config(demo.url, delay=0.3))
    server = serve(
        config,
        workers=2,
        cache_type="redis",
        cache_redis_url=f"redis://{host}:{port}/0",
        cache_key_prefix=shared_redis_prefix,
    )
    workers = wait_for_workers(server, 2)
    reset_demo(demo)

    responses, per_worker = await cold_burst_over_the_wire(server, 100)
    calls = upstream_calls(demo)
    seen = hits_from_every_worker(server, workers)

    print(
        f"\nredis cache, 2 workers, 100 concurrent cold requests (per worker {per_worker}):"
        f" upstream calls {calls}; afterwards {seen}"
    )
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert set(per_worker) == workers  # both workers took part in the burst
    assert calls == dict.fromkeys(SERVICES, 1)  # once in total, not once per process
    assert upstream_calls(demo) == calls
    for pid, states in seen.items():
        assert states and set(states) == {"HIT"}, (pid, seen)
