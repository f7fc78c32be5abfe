"""Shared resilience state on a real Redis: fleet-wide breakers and limits, and failing open.

Several `SharedState`s in one process stand for several workers: they share only Redis, as
workers on different hosts would. The shared Redis (127.0.0.1:6379) is used under a prefix of
each test's own; the fail-open tests kill or pause a private redis-server. Waits are polls with
generous deadlines; bounds on counts are generous too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from aggregator.config import UpstreamConfig
from aggregator.errors import ConfigError, UpstreamOverloadedError
from aggregator.models import SourceResult
from aggregator.resilience import UpstreamGuard
from aggregator.resilience.fleet import SharedCircuitBreaker
from aggregator.resilience.shared import SharedState, build_shared
from aggregator.settings import Settings
from tests.support.redis import SHARED_REDIS_URL, PrivateRedis
from tests.support.servers import serving

FAILED = SourceResult(name="up", status="http_status", ms=1.0, upstream_status=503)
OK = SourceResult(name="up", status="ok", ms=1.0)


def settings(prefix: str, url: str = SHARED_REDIS_URL, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "cache_type": "redis",
        "cache_redis_url": url,
        "cache_key_prefix": prefix,
        "shared_resilience": "redis",
        "shared_resilience_interval": 0.05,
        "shared_resilience_timeout": 0.2,  # loopback answers in well under 1 ms; CI is busy
    }
    return Settings(**(values | extra))


def upstream(**extra: Any) -> UpstreamConfig:
    base = {"url": "http://upstream.test/x", "breaker_failures": 3, "breaker_cooldown": 0.5}
    return UpstreamConfig.model_validate(base | extra)


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def workers(shared_redis_prefix: str) -> AsyncIterator[Callable[..., SharedState]]:
    """Factory: a started SharedState on the shared Redis (one per simulated worker)."""
    async with AsyncExitStack() as stack:

        def make(**extra: Any) -> SharedState:
            state = SharedState(settings(shared_redis_prefix, **extra))
            stack.push_async_callback(state.stop)
            return state

        yield make


async def started(state: SharedState, name: str = "up", **extra: Any) -> SharedCircuitBreaker:
    breaker = state.breaker(name, upstream(**extra))
    await state.start()
    assert state.healthy
    return breaker


def fail(breaker: SharedCircuitBreaker) -> bool:
    """One call that fails, if permitted; whether it was."""
    permit = breaker.acquire()
    if permit is None:
        return False
    breaker.record(permit, failed=True)
    return True


async def test_a_trip_by_one_worker_opens_the_circuit_of_every_worker(
    workers: Callable[..., SharedState],
) -> None:
    a, b = await started(workers()), await started(workers())
    for _ in range(3):  # worker a alone fails three times: its breaker opens the fleet's
        assert fail(a)
    await until(lambda: b.state == "open")
    assert b.acquire() is None  # b never saw a failure and still refuses
    assert a.state == "open"


async def test_failures_of_several_workers_add_up_fleet_wide(
    workers: Callable[..., SharedState],
) -> None:
    a, b = await started(workers()), await started(workers())
    assert fail(a) and fail(b)
    await asyncio.sleep(0.2)  # reported, and not yet enough
    assert a.state == b.state == "closed"
    assert fail(a)  # the third failure of the fleet; neither worker saw three alone
    await until(lambda: a.state == "open" and b.state == "open")


async def test_one_probe_per_cooldown_for_the_whole_fleet(
    workers: Callable[..., SharedState],
) -> None:
    breakers = [await started(workers()) for _ in range(4)]
    for _ in range(3):
        assert fail(breakers[0])
    await until(lambda: all(b.state == "open" for b in breakers))
    # Every worker asks all the time; the upstream stays dead, so every probe fails.
    probes = 0
    ends = time.monotonic() + 1.6  # cool-down 0.5 s: at most 3 cool-downs end in this window
    while time.monotonic() < ends:
        for breaker in breakers:
            probes += fail(breaker)
        await asyncio.sleep(0.01)
    # Per worker it would be 4 workers x 3 cool-downs = 12; one fleet allows 1 per cool-down.
    assert 1 <= probes <= 4, probes


async def test_a_successful_probe_closes_the_circuit_fleet_wide(
    workers: Callable[..., SharedState],
) -> None:
    a, b = await started(workers()), await started(workers())
    for _ in range(3):
        assert fail(a)
    await until(lambda: b.state == "open")
    permits: list[tuple[SharedCircuitBreaker, Any]] = []

    def probe() -> bool:
        for breaker in (a, b):
            permit = breaker.acquire()
            if permit is not None:
                permits.append((breaker, permit))
                return True
        return False

    await until(probe)
    prober, permit = permits[0]
    assert permit.probe and prober.state == "half_open"
    prober.record(permit, failed=False)
    await until(lambda: a.state == "closed" and b.state == "closed")
    assert a.acquire() is not None and b.acquire() is not None


async def test_the_fleet_limit_counts_every_workers_calls_and_frees_released_slots(
    workers: Callable[..., SharedState],
) -> None:
    a, b = workers(), workers()
    await a.start()
    await b.start()
    first, second = await a.lease("up", 2, 10), await b.lease("up", 2, 10)
    assert first and second
    assert await b.lease("up", 2, 10) is None  # two in flight across the fleet: full
    a.report("release", "up", first)
    await until(lambda: not a._events)
    deadline = time.monotonic() + 5
    while (third := await b.lease("up", 2, 10)) is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert third


async def test_a_lease_of_a_killed_worker_expires(workers: Callable[..., SharedState]) -> None:
    a = workers()
    await a.start()
    assert await a.lease("up", 1, 0.3)  # never released: its worker "died"
    assert await a.lease("up", 1, 0.3) is None
    await asyncio.sleep(0.5)
    assert await a.lease("up", 1, 0.3)


async def test_the_guard_refuses_past_the_fleet_limit_without_calling(
    workers: Callable[..., SharedState],
) -> None:
    states = [workers(), workers()]
    for state in states:
        await state.start()
    up = upstream(max_concurrency=1, breaker_failures=0)
    guards = [UpstreamGuard("up", up, shared=state) for state in states]
    gate = asyncio.Event()
    calls = 0

    async def attempt(timeout: float) -> SourceResult:
        nonlocal calls
        calls += 1
        await gate.wait()
        return OK

    first = asyncio.create_task(guards[0].call(attempt))
    await until(lambda: calls == 1)
    refused = await guards[1].call(attempt)  # another worker: its own bulkhead has room
    assert isinstance(refused, UpstreamOverloadedError) and calls == 1
    assert guards[1].bulkhead.in_flight == 0  # the local slot was given back
    gate.set()
    assert await first == OK


@pytest.mark.parametrize("outage", ["killed", "paused"])
async def test_redis_down_fails_open_to_the_local_state_and_comes_back(
    private_redis: PrivateRedis, outage: str, caplog: pytest.LogCaptureFixture
) -> None:
    health: list[bool] = []
    state = SharedState(settings("t:", private_redis.url), on_health=health.append)
    breaker = await started(state)
    try:
        with caplog.at_level(logging.INFO, logger="aggregator.resilience.shared"):
            private_redis.begin_outage(outage)
            await until(lambda: not state.healthy)
            began = time.monotonic()
            assert await state.lease("up", 1, 10) == ""  # not enforced: never refused
            assert breaker.acquire() is not None  # the local breaker decides
            assert time.monotonic() - began < 2.0  # bounded by the command timeout
            for _ in range(3):
                assert fail(breaker)
            assert breaker.state == "open" and breaker.acquire() is None  # locally
            await asyncio.sleep(0.3)  # several failed polls: still one line
            private_redis.end_outage(outage)
            await until(lambda: state.healthy, timeout=10)
        downs = [r for r in caplog.records if r.levelno == logging.WARNING]
        ups = [r for r in caplog.records if r.levelno == logging.INFO]
        assert len(downs) == 1 and len(ups) == 1, caplog.text
        assert health == [True, False, True]
        assert state.status()["healthy"] and state.status()["failures"] >= 1
    finally:
        await state.stop()


async def test_a_redis_never_reached_starts_failing_open(tmp_path: Path) -> None:
    dead = PrivateRedis(tmp_path)  # a free port nobody listens on
    state = SharedState(settings("t:", dead.url))
    breaker = state.breaker("up", upstream())
    began = time.monotonic()
    await state.start()
    try:
        assert time.monotonic() - began < 2.0
        assert not state.healthy and state.status()["state"] == "down"
        assert breaker.acquire() is not None
    finally:
        await state.stop()


def test_shared_state_needs_a_redis_cache() -> None:
    with pytest.raises(ConfigError, match="AGGREGATOR_CACHE_TYPE"):
        build_shared(Settings(shared_resilience="redis", cache_type="filesystem"))
    assert build_shared(Settings()) is None


async def test_status_and_metrics_show_the_shared_state(
    shared_redis_prefix: str, write_config: Callable[[str], Path]
) -> None:
    config = write_config(
        '[upstreams.up]\nurl = "http://upstream.test/x"\n\n'
        '[aggregates.one]\npath = "/api/one"\nsources = ["up"]\n'
    )
    values = settings(shared_redis_prefix).model_dump(exclude={"config"})
    async with serving(config, **(values | {"metrics": "public"})) as (_, client):
        status = (await client.get("/status")).json()
        metrics = (await client.get("/metrics")).text
    assert status["shared"] == {"mode": "redis", "state": "up", "healthy": True, "failures": 0}
    assert "aggregator_shared_resilience_up 1.0" in metrics


async def test_reports_from_a_pool_thread_reach_the_fleet(
    workers: Callable[..., SharedState],
) -> None:
    a, b = await started(workers()), await started(workers())  # a's calls are sync twins'
    for _ in range(3):
        assert await asyncio.to_thread(fail, a)
    await until(lambda: b.state == "open")
