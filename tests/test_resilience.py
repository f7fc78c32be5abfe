"""Resilience mechanisms on a fake clock: retry budget, backoff, breaker, bulkhead, the guard."""

from __future__ import annotations

import asyncio
import logging
from itertools import pairwise
from typing import Any

import httpx
import pytest
import respx
from tenacity import RetryCallState, Retrying

from aggregator.config import UpstreamConfig, parse_config
from aggregator.errors import ConfigError, UpstreamCircuitOpenError, UpstreamOverloadedError
from aggregator.merge import merge
from aggregator.models import SourceResult, SourceStatus
from aggregator.resilience import (
    Bulkhead,
    CircuitBreaker,
    Guards,
    RetryBudget,
    UpstreamGuard,
    is_retriable,
    is_upstream_failure,
    with_fallback,
)
from aggregator.resilience.retries import _Backoff
from aggregator.twins.upstream_sync import fetch_sync
from aggregator.upstream import fetch

BASE = "http://upstream.test"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def sleep_sync(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)


def result(status: SourceStatus = "ok", code: int | None = None) -> SourceResult:
    return SourceResult(name="up", status=status, ms=1.0, upstream_status=code)


def upstream(**extra: Any) -> UpstreamConfig:
    return UpstreamConfig.model_validate({"url": f"{BASE}/x", **extra})


def guard(clock: FakeClock, **extra: Any) -> UpstreamGuard:
    return UpstreamGuard(
        "up", upstream(**extra), clock=clock, sleep=clock.sleep, sleep_sync=clock.sleep_sync
    )


class Script:
    """An attempt that answers from a list (the last answer repeats) and records its time."""

    def __init__(self, clock: FakeClock, *answers: SourceResult, takes: float = 0.01) -> None:
        self.clock = clock
        self.answers = list(answers)
        self.takes = takes
        self.given: list[float] = []

    async def __call__(self, seconds: float) -> SourceResult:
        return self.sync(seconds)

    def sync(self, seconds: float) -> SourceResult:
        self.given.append(seconds)
        self.clock.advance(min(self.takes, seconds))  # a real attempt is cut at `seconds`
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


# -- classification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "retriable", "failure"),
    [
        (result("connect"), True, True),
        (result("http_status", 502), True, True),
        (result("http_status", 503), True, True),
        (result("http_status", 504), True, True),
        (result("http_status", 500), False, True),
        (result("http_status", 429), False, True),
        (result("http_status", 404), False, False),
        (result("timeout"), False, True),
        (result("invalid_json"), False, False),
        (result("validation"), False, False),
        (result("ok"), False, False),
    ],
)
def test_what_is_retried_and_what_trips_the_breaker(
    outcome: SourceResult, retriable: bool, failure: bool
) -> None:
    assert (is_retriable(outcome), is_upstream_failure(outcome)) == (retriable, failure)


# -- retry budget --------------------------------------------------------------------------


def test_budget_allows_the_reserve_with_no_traffic() -> None:
    budget = RetryBudget(0.2, clock=FakeClock())
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]


def test_budget_allows_ratio_of_calls_plus_reserve() -> None:
    budget = RetryBudget(0.2, clock=FakeClock())
    for _ in range(100):
        budget.record_call()
    granted = sum(budget.try_retry() for _ in range(100))
    assert granted == 23  # 0.2 x 100 + 3
    assert budget.totals() == (100, 23)


def test_budget_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, window=10.0, buckets=10, clock=clock)
    for _ in range(50):
        budget.record_call()
    assert sum(budget.try_retry() for _ in range(50)) == 13
    clock.advance(5)
    for _ in range(50):
        budget.record_call()
    assert budget.totals() == (100, 13)
    assert sum(budget.try_retry() for _ in range(50)) == 10  # 0.2 x 100 + 3 - 13
    clock.advance(5.5)  # the first batch has left the window, the second has not
    assert budget.totals() == (50, 10)
    assert sum(budget.try_retry() for _ in range(50)) == 3
    clock.advance(10)
    assert budget.totals() == (0, 0)


def test_budget_ratio_zero_leaves_only_the_reserve() -> None:
    budget = RetryBudget(0.0, reserve=3, clock=FakeClock())
    for _ in range(1000):
        budget.record_call()
    assert sum(budget.try_retry() for _ in range(10)) == 3


# -- backoff ---------------------------------------------------------------------------------


def retry_state(attempt: int) -> RetryCallState:
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return state


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
def test_backoff_is_full_jitter_within_exponential_bounds(attempt: int) -> None:
    bound = 0.05 * 2 ** (attempt - 1)
    waits = [_Backoff(0.05, cap=10)(retry_state(attempt)) for _ in range(2000)]
    assert all(0 <= w <= bound for w in waits)
    # full jitter: the whole range is used, not a fixed delay plus a little noise
    assert min(waits) < 0.1 * bound and max(waits) > 0.9 * bound


def test_backoff_is_capped_and_drawn_once_per_attempt() -> None:
    backoff = _Backoff(1.0, cap=2.0)
    assert all(backoff(retry_state(n)) <= 2.0 for n in range(1, 10))
    state = retry_state(3)
    assert backoff(state) == backoff(state)  # `stop` and the sleep see the same value


# -- circuit breaker ---------------------------------------------------------------------------


def state(breaker: CircuitBreaker) -> str:
    """The breaker's state, read afresh (mypy would keep an earlier comparison's narrowing)."""
    return breaker.state


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(3, 5.0, clock=clock)
    for failed in (True, True, False, True, True):  # a success resets the count
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, failed=failed)
    assert state(breaker) == "closed"
    permit = breaker.acquire()
    assert permit is not None
    breaker.record(permit, failed=True)
    assert state(breaker) == "open"
    assert breaker.acquire() is None


def test_breaker_half_open_single_probe_closes_on_success() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    first = breaker.acquire()
    assert first is not None
    breaker.record(first, failed=True)
    clock.advance(4.9)
    assert breaker.acquire() is None
    clock.advance(0.2)
    probe = breaker.acquire()
    assert probe is not None and probe.probe
    assert state(breaker) == "half_open"
    assert breaker.acquire() is None  # one probe at a time
    breaker.record(probe, failed=False)
    assert state(breaker) == "closed"
    assert breaker.acquire() is not None


def test_breaker_reopens_on_probe_failure_for_another_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 5.0, clock=clock)
    for _ in range(2):
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, failed=True)
    clock.advance(5)
    probe = breaker.acquire()
    assert probe is not None
    clock.advance(1)
    breaker.record(probe, failed=True)
    assert state(breaker) == "open"
    clock.advance(4.5)
    assert breaker.acquire() is None  # the cool-down restarted at the probe's failure
    clock.advance(0.6)
    assert breaker.acquire() is not None


def test_breaker_abandoned_probe_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    permit = breaker.acquire()
    assert permit is not None
    breaker.record(permit, failed=True)
    clock.advance(1)
    probe = breaker.acquire()
    assert probe is not None
    breaker.release(probe)
    assert state(breaker) == "half_open"
    assert breaker.acquire() is not None


def test_breaker_with_zero_failures_never_opens() -> None:
    breaker = CircuitBreaker(0, 1.0, clock=FakeClock())
    for _ in range(100):
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, failed=True)
    assert state(breaker) == "closed"


# -- bulkhead ----------------------------------------------------------------------------------


def test_bulkhead_refuses_beyond_its_limit_and_recovers() -> None:
    bulkhead = Bulkhead(2)
    assert [bulkhead.try_enter() for _ in range(3)] == [True, True, False]
    bulkhead.leave()
    assert bulkhead.try_enter()
    assert bulkhead.in_flight == 2


def test_bulkhead_without_limit_never_refuses() -> None:
    bulkhead = Bulkhead(None)
    assert all(bulkhead.try_enter() for _ in range(10_000))


# -- the guard: retries, time, budget, breaker, bulkhead together ----------------------------


async def test_guard_retries_retriable_failures_until_success() -> None:
    clock = FakeClock()
    attempt = Script(clock, result("http_status", 503), result("connect"), result("ok"))

    outcome = await guard(clock, retries=2).call(attempt)

    assert isinstance(outcome, SourceResult) and outcome.ok
    assert len(attempt.given) == 3
    assert len(clock.slept) == 2
    assert clock.slept[0] <= 0.05 and clock.slept[1] <= 0.1


@pytest.mark.parametrize(
    "failure",
    [
        result("http_status", 404),
        result("http_status", 500),
        result("timeout"),
        result("validation"),
    ],
)
async def test_guard_does_not_retry_other_failures(failure: SourceResult) -> None:
    clock = FakeClock()
    attempt = Script(clock, failure)

    outcome = await guard(clock, retries=3).call(attempt)

    assert outcome is failure and len(attempt.given) == 1


async def test_guard_gives_up_after_retries_with_the_real_error_kind() -> None:
    clock = FakeClock()
    attempt = Script(clock, result("http_status", 503))

    outcome = await guard(clock, retries=2).call(attempt)

    assert isinstance(outcome, SourceResult) and outcome.status == "http_status"
    assert len(attempt.given) == 3


async def test_every_attempt_stays_inside_the_source_timeout() -> None:
    clock = FakeClock()
    started = clock.now
    # each failed attempt takes 0.3 s of a 1 s timeout: retries share what is left
    attempt = Script(clock, result("connect"), takes=0.3)

    await guard(clock, timeout=1.0, retries=5).call(attempt)

    assert 2 <= len(attempt.given) <= 3
    assert attempt.given[0] == 1.0
    assert all(later <= earlier - 0.3 for earlier, later in pairwise(attempt.given))
    assert clock.now - started <= 1.0 + 1e-9
    assert attempt.given[-1] >= 0.25  # no attempt starts with less than a quarter left


async def test_no_retry_starts_that_could_not_finish_before_the_deadline() -> None:
    clock = FakeClock()
    attempt = Script(clock, result("http_status", 503))

    await guard(clock, timeout=2.0, retries=3).call(attempt, deadline=clock.now + 0.3)

    assert len(attempt.given) == 1  # 0.3 s left is less than a quarter of the 2 s timeout


async def test_budget_bounds_the_traffic_a_dead_upstream_sees() -> None:
    clock = FakeClock()
    dead = guard(clock, retries=2, breaker_failures=0)
    attempt = Script(clock, result("http_status", 503), takes=0.001)

    for _ in range(500):
        await dead.call(attempt)
        clock.advance(0.01)  # 100 calls per second, sustained

    assert len(attempt.given) <= 1.2 * 500 + 3
    assert len(attempt.given) > 500  # retries did happen, within the budget


async def test_open_breaker_refuses_without_calling_and_a_probe_closes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aggregator.resilience")
    clock = FakeClock()
    flaky = guard(clock, retries=0, breaker_failures=3, breaker_cooldown=5.0)
    attempt = Script(clock, result("timeout"))
    for _ in range(3):
        await flaky.call(attempt)

    refused = await flaky.call(attempt)

    assert isinstance(refused, UpstreamCircuitOpenError) and refused.kind == "circuit_open"
    assert len(attempt.given) == 3
    clock.advance(5)
    attempt.answers = [result("ok")]
    probe = await flaky.call(attempt)
    assert isinstance(probe, SourceResult) and probe.ok
    assert state(flaky.breaker) == "closed"
    assert [r.getMessage() for r in caplog.records] == [
        "upstream up: circuit opened (timeout); calls refused for 5 s",
        "upstream up: circuit closed, calls flow again",
    ]


async def test_a_retried_call_that_succeeds_is_a_success_for_the_breaker() -> None:
    clock = FakeClock()
    g = guard(clock, retries=1, breaker_failures=2)
    for _ in range(5):
        await g.call(Script(clock, result("connect"), result("ok")))
    assert g.breaker.state == "closed"


async def test_bulkhead_refuses_at_once_and_releases_after_calls_and_cancellations() -> None:
    clock = FakeClock()
    g = guard(clock, max_concurrency=2)
    release = asyncio.Event()

    async def slow(seconds: float) -> SourceResult:
        await release.wait()
        return result("ok")

    running = [asyncio.create_task(g.call(slow)) for _ in range(2)]
    await asyncio.sleep(0)
    refused = await g.call(slow)
    assert isinstance(refused, UpstreamOverloadedError) and refused.kind == "overloaded"

    running[0].cancel()
    await asyncio.gather(running[0], return_exceptions=True)
    assert g.bulkhead.in_flight == 1
    release.set()
    await running[1]
    assert g.bulkhead.in_flight == 0
    assert isinstance(await g.call(slow), SourceResult)


async def test_cancelled_probe_lets_the_next_call_probe() -> None:
    clock = FakeClock()
    g = guard(clock, retries=0, breaker_failures=1, breaker_cooldown=1.0)
    await g.call(Script(clock, result("connect")))
    clock.advance(1)

    async def hang(seconds: float) -> SourceResult:
        await asyncio.sleep(10)
        return result("ok")

    probe = asyncio.create_task(g.call(hang))
    await asyncio.sleep(0)
    assert isinstance(await g.call(hang), UpstreamCircuitOpenError)
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)

    outcome = await g.call(Script(clock, result("ok")))
    assert isinstance(outcome, SourceResult) and outcome.ok


def test_sync_call_follows_the_same_policy() -> None:
    clock = FakeClock()
    g = guard(clock, retries=2, breaker_failures=2)
    attempt = Script(clock, result("http_status", 502))

    first = g.call_sync(attempt.sync)
    second = g.call_sync(attempt.sync)
    third = g.call_sync(attempt.sync)

    assert isinstance(first, SourceResult) and first.status == "http_status"
    assert isinstance(second, SourceResult)
    assert isinstance(third, UpstreamCircuitOpenError)
    assert len(attempt.given) == 6


def test_guards_are_per_upstream() -> None:
    config = parse_config(
        f"""
[upstreams.a]
url = "{BASE}/a"
[upstreams.b]
url = "{BASE}/b"
max_concurrency = 1
[aggregates.x]
path = "/x"
sources = ["a", "b"]
""",
        "t",
    )
    guards = Guards(config.upstreams)
    assert guards["b"].bulkhead.try_enter() and not guards["b"].bulkhead.try_enter()
    assert guards["a"].bulkhead.try_enter()
    assert guards.get("missing") is None


# -- through fetch, on a real httpx client (respx intercepts its transport) -----------------


@pytest.mark.respx(base_url=BASE)
async def test_fetch_retries_a_503_then_succeeds(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    route = respx_mock.get("/x").mock(
        side_effect=[httpx.Response(503), httpx.Response(503), httpx.Response(200, json={"a": 1})]
    )
    up = upstream(retries=2, retry_backoff=0.01)

    outcome = await fetch(httpx_client, "up", up, {}, max_body=1000, guard=UpstreamGuard("up", up))

    assert (outcome.status, outcome.data, route.call_count) == ("ok", {"a": 1}, 3)


@pytest.mark.respx(base_url=BASE)
async def test_fetch_retries_connect_errors_but_not_a_404(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    up = upstream(retries=2, retry_backoff=0.01)
    g = UpstreamGuard("up", up)
    route = respx_mock.get("/x").mock(side_effect=httpx.ConnectError("refused"))
    assert (await fetch(httpx_client, "up", up, {}, max_body=1000, guard=g)).status == "connect"
    assert route.call_count == 3

    route.reset()
    route.mock(side_effect=None, return_value=httpx.Response(404))
    outcome = await fetch(httpx_client, "up", up, {}, max_body=1000, guard=g)
    assert (outcome.status, outcome.upstream_status, route.call_count) == ("http_status", 404, 1)


@pytest.mark.respx(base_url=BASE)
async def test_fetch_reports_refusals_as_error_kinds(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    route = respx_mock.get("/x").mock(return_value=httpx.Response(500))
    up = upstream(retries=0, breaker_failures=1)
    g = UpstreamGuard("up", up)
    await fetch(httpx_client, "up", up, {}, max_body=1000, guard=g)

    outcome = await fetch(httpx_client, "up", up, {}, max_body=1000, guard=g)

    assert outcome.status == "circuit_open" and "circuit open" in (outcome.detail or "")
    assert route.call_count == 1


@pytest.mark.respx(base_url=BASE)
def test_fetch_sync_shares_the_policy(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.get("/x").mock(
        side_effect=[httpx.Response(502), httpx.Response(200, json={"a": 1})]
    )
    up = upstream(retries=1, retry_backoff=0.01)

    with httpx.Client() as client:
        outcome = fetch_sync(client, "up", up, {}, max_body=1000, guard=UpstreamGuard("up", up))

    assert (outcome.status, outcome.data, route.call_count) == ("ok", {"a": 1}, 2)


# -- config and fallback -------------------------------------------------------------------


def test_resilience_defaults() -> None:
    up = upstream()
    assert (up.retries, up.retry_budget, up.breaker_failures, up.max_concurrency) == (
        2,
        0.2,
        5,
        None,
    )
    assert up.fallback is None and up.fallback_data is None


def fallback_config(fallback: str, schema: str = "aggregator.demo.models:Profile") -> str:
    return f"""
[upstreams.p]
url = "{BASE}/p"
schema = "{schema}"
fallback = {fallback}
[aggregates.a]
path = "/a"
sources = ["p"]
"""


def test_fallback_is_validated_by_the_schema_at_load() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            fallback_config('{ user_id = "x", name = "A", city = "B", plan = "free" }'), "f"
        )
    assert "upstreams.p.fallback.user_id" in str(info.value)
    assert "aggregator.demo.models:Profile" in str(info.value)


def test_fallback_is_stored_as_a_live_answer_would_be() -> None:
    config = parse_config(
        fallback_config('{ user_id = 7, name = "A", city = "B", plan = "free" }'), "f"
    )
    assert config.upstreams["p"].fallback_data == {
        "user_id": 7,
        "name": "A",
        "city": "B",
        "plan": "free",
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [("retries", "-1"), ("retry_budget", "1.5"), ("max_concurrency", "0"), ("retries", '"2"')],
)
def test_bad_resilience_settings_stop_the_load(key: str, value: str) -> None:
    text = f'[upstreams.p]\nurl = "{BASE}/p"\n{key} = {value}\n'
    text += '[aggregates.a]\npath = "/a"\nsources = ["p"]\n'
    with pytest.raises(ConfigError, match=f"upstreams.p.{key}"):
        parse_config(text, "f")


def test_fallback_keeps_the_error_and_serves_the_data() -> None:
    up = upstream(fallback={"note": "static"})
    failed = SourceResult(name="p", status="circuit_open", ms=0.1, detail="circuit open")

    served = with_fallback(failed, up)
    envelope, status = merge({"p": served}, required=["p"])

    assert status == 200
    body = envelope.model_dump(exclude_none=True)
    assert body["data"] == {"p": {"note": "static"}}
    assert body["errors"]["p"]["kind"] == "circuit_open"
    assert body["sources"]["p"] == {"status": "circuit_open", "ms": 0.1, "fallback": True}
    assert body["complete"] is False
    ok = SourceResult(name="p", status="ok", ms=1.0, data={"live": True})
    assert with_fallback(ok, up) is ok
    assert "fallback" not in merge({"p": ok}, [])[0].model_dump(exclude_none=True)["sources"]["p"]
