"""Hedged calls through `fetch` on a real httpx client (respx answers after scripted delays):
when the hedge goes out, who wins, that the loser is cancelled once and awaited, and that a
hedge costs a bulkhead slot and a retry from the budget (and is not sent when refused)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import respx

from aggregator.config import UpstreamConfig, parse_config
from aggregator.errors import ConfigError
from aggregator.merge import merge
from aggregator.models import SourceResult
from aggregator.resilience import UpstreamGuard
from aggregator.resilience.hedge import MIN_SAMPLES
from aggregator.upstream import fetch

BASE = "http://upstream.test"

pytestmark = pytest.mark.timeout(30)


def upstream(**extra: Any) -> UpstreamConfig:
    return UpstreamConfig.model_validate({"url": f"{BASE}/x", "retries": 0, **extra})


class Upstream:
    """respx side effect: call k waits `delays[k]` seconds (the last repeats), then answers
    `statuses[k]`; records calls that were cancelled and calls in flight."""

    def __init__(self, *delays: float, statuses: tuple[int, ...] = (200,)) -> None:
        self.delays = list(delays)
        self.statuses = list(statuses)
        self.calls = 0
        self.cancelled = 0
        self.in_flight = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        k = self.calls
        self.calls += 1
        self.in_flight += 1
        try:
            await asyncio.sleep(self.delays[min(k, len(self.delays) - 1)])
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        status = self.statuses[min(k, len(self.statuses) - 1)]
        return httpx.Response(status, json={"call": k})


async def call(client: httpx.AsyncClient, up: UpstreamConfig, guard: UpstreamGuard) -> SourceResult:
    return await fetch(client, "up", up, {}, max_body=10_000, guard=guard)


@pytest.mark.respx(base_url=BASE)
async def test_a_late_answer_is_hedged_and_the_hedge_wins(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(1.0, 0.01)
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.05, timeout=3)
    guard = UpstreamGuard("up", up)

    started = time.perf_counter()
    result = await call(httpx_client, up, guard)
    took = time.perf_counter() - started

    assert (result.status, result.data, result.hedge) == ("ok", {"call": 1}, "hedge_won")
    assert took < 0.5  # not the first attempt's 1 s
    # The loser was cancelled and awaited before fetch returned: nothing is still out.
    assert (script.calls, script.cancelled, script.in_flight) == (2, 1, 0)
    assert guard.bulkhead.in_flight == 0
    assert guard.budget.totals() == (1, 1)  # one call, and the hedge taken as a retry
    info = merge({"up": result}, [])[0].sources["up"]
    assert (info.hedged, info.hedge_winner) == (True, "hedge")


@pytest.mark.respx(base_url=BASE)
async def test_the_first_attempt_can_still_win_after_a_hedge_was_sent(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(0.15, 1.0)
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.05, timeout=3)

    result = await call(httpx_client, up, UpstreamGuard("up", up))

    assert (result.data, result.hedge) == ({"call": 0}, "first_won")
    assert (script.calls, script.cancelled, script.in_flight) == (2, 1, 0)
    info = merge({"up": result}, [])[0].sources["up"]
    assert (info.hedged, info.hedge_winner) == (True, "first")


@pytest.mark.respx(base_url=BASE)
async def test_an_answer_before_hedge_after_sends_no_hedge(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(0.01)
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.2, timeout=3)
    guard = UpstreamGuard("up", up)

    result = await call(httpx_client, up, guard)

    assert (result.status, result.hedge, script.calls) == ("ok", None, 1)
    assert guard.budget.totals() == (1, 0)
    assert merge({"up": result}, [])[0].sources["up"].hedged is None


@pytest.mark.respx(base_url=BASE)
async def test_a_failure_first_waits_for_the_hedge(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    # The first attempt fails (a 404: not retried) after the hedge went out; the hedge answers.
    script = Upstream(0.1, 0.2, statuses=(404, 200))
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.05, timeout=3)

    result = await call(httpx_client, up, UpstreamGuard("up", up))

    assert (result.status, result.data, result.hedge) == ("ok", {"call": 1}, "hedge_won")
    assert (script.calls, script.cancelled) == (2, 0)


@pytest.mark.respx(base_url=BASE)
async def test_both_failing_reports_the_first_attempts_error(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(0.1, 0.0, statuses=(404, 500))
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.05, timeout=3)

    result = await call(httpx_client, up, UpstreamGuard("up", up))

    assert (result.status, result.upstream_status, result.hedge) == (
        "http_status",
        404,
        "both_failed",
    )
    assert merge({"up": result}, [])[0].sources["up"].hedge_winner is None


@pytest.mark.respx(base_url=BASE)
async def test_a_hedge_the_budget_refuses_is_not_sent(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(0.2, 0.0)
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.05, timeout=3, retry_budget=0)
    guard = UpstreamGuard("up", up)
    while guard.budget.try_retry():  # spend the reserve: no retry (so no hedge) is left
        pass

    result = await call(httpx_client, up, guard)

    assert (result.status, result.data, result.hedge) == ("ok", {"call": 0}, "refused")
    assert script.calls == 1
    assert guard.bulkhead.in_flight == 0
    assert merge({"up": result}, [])[0].sources["up"].hedged is None


@pytest.mark.respx(base_url=BASE)
async def test_a_hedge_the_bulkhead_refuses_is_not_sent_and_takes_no_budget(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(0.2, 0.0)
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.05, timeout=3, max_concurrency=1)  # the call itself fills it
    guard = UpstreamGuard("up", up)

    result = await call(httpx_client, up, guard)

    assert (result.hedge, script.calls) == ("refused", 1)
    assert guard.budget.totals() == (1, 0)
    assert guard.bulkhead.in_flight == 0


@pytest.mark.respx(base_url=BASE)
async def test_a_hedge_holds_a_bulkhead_slot_while_it_is_out(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(0.3, 0.3)
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.05, timeout=3, max_concurrency=2)
    guard = UpstreamGuard("up", up)

    task = asyncio.create_task(call(httpx_client, up, guard))
    await asyncio.sleep(0.15)
    assert (guard.bulkhead.in_flight, script.in_flight) == (2, 2)
    # A third call now finds the bulkhead full: the hedge counted.
    refused = await call(httpx_client, up, guard)
    assert refused.status == "overloaded"
    await task
    assert guard.bulkhead.in_flight == 0


@pytest.mark.respx(base_url=BASE, assert_all_called=False)  # (respx counts answered calls)
async def test_a_call_cancelled_mid_race_cancels_both_attempts_once(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(5.0)
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.05, timeout=10)
    guard = UpstreamGuard("up", up)

    task = asyncio.create_task(call(httpx_client, up, guard))
    await asyncio.sleep(0.15)
    assert script.in_flight == 2
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()  # a second cancel (a deadline and a leaving client) must not reach them again
    with pytest.raises(asyncio.CancelledError):
        await task

    assert (script.calls, script.cancelled, script.in_flight) == (2, 2, 0)
    assert guard.bulkhead.in_flight == 0


@pytest.mark.respx(base_url=BASE)
async def test_a_percentile_waits_for_enough_answers_then_hedges_past_it(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(*([0.01] * MIN_SAMPLES), 1.0, 0.01)
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after="p90", timeout=3, retry_budget=1)
    guard = UpstreamGuard("up", up)

    for _ in range(MIN_SAMPLES):  # unknown percentile so far: never hedged
        assert (await call(httpx_client, up, guard)).hedge is None
    assert script.calls == MIN_SAMPLES
    delay = guard.hedger.delay() if guard.hedger else None
    assert delay is not None and delay < 0.2

    result = await call(httpx_client, up, guard)  # 1 s late: hedged at ~p90 of 10 ms answers
    assert (result.hedge, result.data) == ("hedge_won", {"call": MIN_SAMPLES + 1})


@pytest.mark.respx(base_url=BASE)
async def test_a_call_that_is_not_idempotent_is_never_hedged(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    script = Upstream(0.2, 0.0)
    respx_mock.get("/x").mock(side_effect=script)
    up = upstream(hedge_after=0.05, timeout=3, idempotent=False)
    guard = UpstreamGuard("up", up)

    result = await call(httpx_client, up, guard)

    assert guard.hedger is None
    assert (result.hedge, script.calls) == (None, 1)


_CONFIG = """
[upstreams.up]
url = "http://127.0.0.1:1/x"
timeout = 1.0
{extra}

[aggregates.a]
path = "/a"
sources = ["up"]
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('hedge_after = "p40"', "upstreams.up.hedge_after: 'p40': the percentile must be at least"),
        ('hedge_after = "soon"', "upstreams.up.hedge_after: 'soon' is neither seconds nor a"),
        ("hedge_after = 0", "upstreams.up.hedge_after: 0 is not a number of seconds"),
        ("hedge_after = 1.5", "hedge_after (1.5 s) must be shorter than timeout (1 s)"),
        ("hedge_after = true", "upstreams.up.hedge_after"),
        ('idempotent = "yes"', "upstreams.up.idempotent"),
    ],
)
def test_hedge_after_is_checked_at_load_with_a_one_line_error(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_CONFIG.format(extra=extra), "t.toml")
    lines = [p for p in caught.value.problems if "hedge_after" in p or "idempotent" in p]
    assert len(lines) == 1 and message in lines[0] and "\n" not in lines[0], caught.value


@pytest.mark.parametrize("value", ["0.25", '"p95"', '"p99.9"', '"p50"'])
def test_hedge_after_accepts_seconds_and_percentiles(value: str) -> None:
    config = parse_config(_CONFIG.format(extra=f"hedge_after = {value}"), "t.toml")
    assert config.upstreams["up"].hedge_after is not None
