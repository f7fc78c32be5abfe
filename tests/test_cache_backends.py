"""The cache on every real backend (SimpleCache, FileSystemCache, Redis) with the real app and
demo upstreams.

What is stored is our JSON (never pickle), a corrupted entry is a miss, a slow backend never
blocks the loop, and a cold burst fans out once (per process where the backend has no lock).
Redis outages and their logging: test_cache_redis.py; hostile faults: test_cache_faults.py.
"""

from __future__ import annotations

import asyncio
import gc
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator.serving import ASGIAdapter
from tests.support.cache import (
    GARBAGE,
    assert_our_format,
    cache_of,
    entry_key,
    garbage,
    local_raw,
    loop_lag,
    upstream_calls,
)
from tests.support.configs import QUERY, SERVICES, cached_config, one_source_config
from tests.support.demo import reset_demo
from tests.support.redis import SHARED_REDIS_URL, PrivateRedis, redis_settings
from tests.support.servers import (
    burst,
    cold_burst_over_the_wire,
    hits_from_every_worker,
    serving,
    wait_for_workers,
)

pytestmark = pytest.mark.integration  # every test here talks to the demo upstream process

BACKENDS = ["simple", "filesystem", "redis"]


def backend_settings(
    request: pytest.FixtureRequest, cache_type: str, tmp_path: Path
) -> dict[str, Any]:
    """Settings for `cache_type`: a directory of the test's own, or a private redis-server."""
    if cache_type == "redis":
        return redis_settings(request.getfixturevalue("private_redis"))
    return {"cache_type": cache_type, "cache_dir": tmp_path / "cache"}


def stored_raw(
    adapter: ASGIAdapter, settings: dict[str, Any], redis: PrivateRedis | None
) -> bytes | None:
    """The bytes the backend holds for /api/five?QUERY, as stored."""
    key = entry_key(adapter)
    if redis is None:
        return local_raw(adapter, key)
    with redis.client() as raw_client:
        raw = raw_client.get(settings["cache_key_prefix"] + key)
    assert raw is None or isinstance(raw, bytes)
    return raw


def write_raw(
    adapter: ASGIAdapter, settings: dict[str, Any], redis: PrivateRedis | None, data: bytes
) -> None:
    """Put `data` under the key of /api/five?QUERY, bypassing our serializer."""
    key = entry_key(adapter)
    backend = cache_of(adapter).store.backend
    if redis is not None:
        with redis.client() as raw_client:
            raw_client.set(settings["cache_key_prefix"] + key, data, ex=60)
    elif settings["cache_type"] == "filesystem":  # raw bytes behind a valid expiry header
        expires = struct.pack("I", int(time.time()) + 60)
        Path(backend._get_filename(key)).write_bytes(expires + data)
    else:
        backend.set(key, data, timeout=60)


# -- what is stored -----------------------------------------------------------------------------


@pytest.mark.parametrize("cache_type", BACKENDS)
async def test_entries_are_stored_as_our_json_never_pickle(
    request, demo, write_config, tmp_path, cache_type
):
    config = write_config(cached_config(demo.url, delay=0.05))
    settings = backend_settings(request, cache_type, tmp_path)
    redis = request.getfixturevalue("private_redis") if cache_type == "redis" else None
    async with serving(config, **settings) as (adapter, client):
        first = await client.get(f"/api/five?{QUERY}")
        raw = stored_raw(adapter, settings, redis)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    assert_our_format(raw, first)
    if cache_type == "filesystem":  # cachelib's own file count goes through our serializer too
        files = list(settings["cache_dir"].iterdir())
        assert len(files) >= 2
        for path in files:
            assert not path.read_bytes()[4:].startswith(b"\x80"), path
    if redis is not None:  # every key the app wrote is under its prefix
        with redis.client() as raw_client:
            names = raw_client.keys("*")
        prefix = settings["cache_key_prefix"].encode()
        assert names and all(n.startswith(prefix) for n in names), names


@pytest.mark.parametrize("kind", GARBAGE)
@pytest.mark.parametrize("cache_type", BACKENDS)
async def test_a_corrupted_entry_is_a_miss_then_refilled(
    request, demo, write_config, tmp_path, cache_type, kind
):
    config = write_config(cached_config(demo.url, delay=0.05))
    settings = backend_settings(request, cache_type, tmp_path)
    redis = request.getfixturevalue("private_redis") if cache_type == "redis" else None
    tripwire = tmp_path / "unpickled"
    async with serving(config, **settings) as (adapter, client):
        write_raw(adapter, settings, redis, garbage(kind, tripwire))
        first = await client.get(f"/api/five?{QUERY}")
        second = await client.get(f"/api/five?{QUERY}")
        raw = stored_raw(adapter, settings, redis)
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
    assert second.content == first.content
    assert_our_format(raw, first)  # the garbage was replaced
    assert not tripwire.exists(), "the cache unpickled what it read"


# -- a slow backend never blocks the event loop -------------------------------------------------


class Stalled:
    """Wraps backend methods so each call takes `stall` seconds; records where each call ran."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.calls: list[tuple[str, bool]] = []  # (method, ran on the event loop's thread)

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, threading.current_thread() is threading.main_thread()))
            time.sleep(self.stall)
            return fn(*args, **kwargs)

        return run

    def count(self, name: str) -> int:
        return sum(1 for method, _ in self.calls if method == name)

    @property
    def on_loop(self) -> list[str]:
        return [method for method, on_loop in self.calls if on_loop]


@pytest.mark.parametrize("cache_type", ["filesystem", "redis"])
async def test_a_slow_backend_never_blocks_the_event_loop(
    request, demo, write_config, tmp_path, monkeypatch, cache_type
):
    # filesystem: a slow disk (NFS, a throttled volume), every backend call takes 0.5 s.
    # redis: SIGSTOP, connections are accepted and nothing is ever answered; each cache call
    # waits out cache_timeout (0.5 s) in a thread. Made on the loop, one call would stall it
    # >= 0.5 s; off the loop, the loop stays free. One source per request keeps the CPU work of
    # 50 fan-outs out of the measurement.
    config = write_config(one_source_config(demo.url))
    redis: PrivateRedis | None = None
    if cache_type == "redis":
        redis = request.getfixturevalue("private_redis")
        settings = redis_settings(redis, cache_timeout=0.5, cache_retry_after=0)
    else:
        settings = {"cache_type": "filesystem", "cache_dir": tmp_path, "cache_timeout": 10.0}
    stalled = Stalled(0.5)
    on_loop: list[str] = []  # Redis commands sent from the loop's thread
    async with serving(config, **settings) as (adapter, client):
        backend = cache_of(adapter).store.backend
        if redis is None:
            for name in ("get_many", "set"):
                monkeypatch.setattr(backend, name, stalled.wrap(getattr(backend, name), name))
        else:
            await client.get("/api/one?city=Oslo")  # connections and imports warm
            redis_client = backend._write_client
            real = redis_client.execute_command

            def execute_command(*args: Any, **kwargs: Any) -> Any:
                if threading.current_thread() is threading.main_thread():
                    on_loop.append(str(args[0]))
                return real(*args, **kwargs)

            monkeypatch.setattr(redis_client, "execute_command", execute_command)
            redis.pause()
        gc.collect()  # a full collection is a pause of its own; not what this test measures
        async with loop_lag() as lag:
            started = time.perf_counter()
            responses = await burst(client, "/api/one?city=Paris", 50)
            elapsed = time.perf_counter() - started
        failures = cache_of(adapter).store.failures
    seen = (
        f"{cache_type}, 0.5 s per cache call, 50 concurrent: worst loop lag "
        f"{lag.worst * 1000:.1f} ms ({lag.ticks} ticks in {elapsed:.2f} s, "
        f"{len(stalled.calls)} stalled calls, {failures} failures)"
    )
    assert all(r.status_code == 200 for r in responses), seen
    if redis is None:
        assert {r.headers["x-cache"] for r in responses} <= {"MISS", "HIT"}  # slowly, it worked
        assert stalled.count("get_many") >= 50 and stalled.count("set") >= 1, seen
        assert stalled.on_loop == []
    else:
        assert {r.headers["x-cache"] for r in responses} == {"BYPASS"}
        assert failures >= 50 and on_loop == [], (seen, on_loop)
        assert elapsed < 10.0, seen  # 50 calls of 0.5 s in threads, not one after another
    assert lag.ticks > 20, seen
    assert lag.worst < 0.4, seen  # a single cache call on the loop would be >= 0.5 s


# -- a cold burst fans out once --------------------------------------------------------------------


async def test_cold_burst_fans_out_once_in_one_process(demo, write_config):
    config = write_config(cached_config(demo.url, delay=0.3))
    async with serving(config, cache_type="simple") as (_, client):
        url = f"/api/five?{QUERY}"
        await client.get("/api/five?city=Oslo&user_id=1")  # warm imports and connections
        reset_demo(demo)
        responses = await burst(client, url, 100)
        calls = upstream_calls(demo)
        after = await client.get(url)
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert calls == dict.fromkeys(SERVICES, 1), f"100 concurrent cold requests: calls {calls}"
    assert after.headers["x-cache"] == "HIT" and after.content == responses[0].content


async def test_a_miss_read_just_before_a_fill_ended_does_not_fan_out_again(
    demo, write_config, tmp_path, monkeypatch
):
    # Request B reads "miss" while A's fill is running, but its answer comes back late (a slow
    # backend, a busy pool): by then the fill has stored and left `_inflight`. B must find the
    # entry, not start a second fan-out.
    config = write_config(cached_config(demo.url, delay=0.05))
    settings = {"cache_type": "filesystem", "cache_dir": tmp_path, "cache_timeout": 5.0}
    async with serving(config, **settings) as (adapter, client):
        key = entry_key(adapter)
        backend = cache_of(adapter).store.backend
        real = backend.get_many
        lookups: list[float] = []
        lock = threading.Lock()

        def get_many(*keys: str) -> Any:
            value = real(*keys)
            with lock:
                if keys[0] == key:
                    lookups.append(time.monotonic())
                late = keys[0] == key and len(lookups) == 2
            if late:
                time.sleep(0.6)  # read before the fill stored, answered after it finished
            return value

        monkeypatch.setattr(backend, "get_many", get_many)
        await client.get("/api/five?city=Oslo&user_id=1")  # warm connections; not our key
        reset_demo(demo)
        url = f"/api/five?{QUERY}"
        a, b = await asyncio.gather(client.get(url), client.get(url))
        calls = upstream_calls(demo)
    assert a.status_code == b.status_code == 200
    assert a.content == b.content
    assert len(lookups) >= 2  # the late lookup happened
    assert calls == dict.fromkeys(SERVICES, 1)


@pytest.mark.parametrize("cache_type", ["filesystem", "redis"])
async def test_a_cold_burst_on_two_workers_fans_out_once_per_lock_scope(
    request, serve, demo, write_config, tmp_path, cache_type
):
    # The file cache has no lock across processes: at most once per worker. Redis single-flight
    # locks across processes: once in total. Redis here is the shared one, under our own prefix.
    config = write_config(cached_config(demo.url, delay=0.3))
    if cache_type == "redis":
        prefix = request.getfixturevalue("shared_redis_prefix")
        settings = {"cache_redis_url": SHARED_REDIS_URL, "cache_key_prefix": prefix}
    else:
        settings = {"cache_dir": str(tmp_path / "c")}
    server = serve(config, workers=2, cache_type=cache_type, **settings)
    workers = wait_for_workers(server, 2)
    reset_demo(demo)

    responses, per_worker = await cold_burst_over_the_wire(server, 100)
    calls = upstream_calls(demo)
    seen = hits_from_every_worker(server, workers)

    burst_seen = f"per worker {per_worker}: upstream calls {calls}; afterwards {seen}"
    assert all(r.status_code == 200 for r in responses), burst_seen
    if cache_type == "redis":
        assert len({r.content for r in responses}) == 1
        assert calls == dict.fromkeys(SERVICES, 1), burst_seen  # once, not once per process
    else:
        assert all(1 <= n <= 2 for n in calls.values()), burst_seen  # at most once per process
    assert set(per_worker) == workers, burst_seen  # both workers took part in the burst
    assert upstream_calls(demo) == calls  # and nothing was fetched again afterwards
    for pid, states in seen.items():
        assert states and set(states) == {"HIT"}, (pid, seen)
