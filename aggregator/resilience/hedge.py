"""Hedged calls: when an attempt has no answer after `hedge_after`, send one identical request more.

A jittery upstream sets the tail of every aggregate that includes it; a second request sent once
the first is late usually answers before the first would have (Dean & Barroso, "The Tail at
Scale"). The first good answer (`ok`) wins and the other attempt is cancelled; a failure that
lands first waits for the other attempt, so a hedge can also save a call from a failure.

What a hedge may cost is bounded by the protections a retry has, since it is extra load of the
same kind: it takes a slot of the upstream's bulkhead and one retry from its retry budget, and
it is not sent while the breaker is not closed. A hedge any of these refuse is simply not sent
(`refused`) and the first attempt goes on alone. Only idempotent calls are hedged
(`UpstreamConfig.is_idempotent`: every call is a GET today).

`hedge_after` is seconds (`0.25`) or a percentile of this source's own recent latency (`"p95"`:
the answered attempts of this worker, the last `LATENCY_WINDOW` of them). Until
`MIN_SAMPLES` attempts have answered a percentile is unknown and no hedge is sent.

Cancelling the loser: its task is cancelled exactly once and awaited (its connection goes back
to the pool or is closed before the call returns); a further cancel of ours (a deadline, a client
that left) never reaches the attempts a second time, for the reason `fanout.cancelled_once`
gives: a second cancel interrupts httpx's clean-up and leaves a connection "in use" for good.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aggregator.models import HedgeOutcome, SourceResult

if TYPE_CHECKING:
    from aggregator.config import UpstreamConfig
    from aggregator.resilience.breaker import CircuitBreaker
    from aggregator.resilience.budget import RetryBudget
    from aggregator.resilience.bulkhead import Bulkhead

#: Answered attempts kept per upstream for a percentile `hedge_after`.
LATENCY_WINDOW = 256
#: Answered attempts needed before a percentile `hedge_after` is trusted.
MIN_SAMPLES = 20

_PERCENTILE = re.compile(r"p(\d{1,2}(?:\.\d{1,2})?)")

Attempt = Callable[[float], Awaitable[SourceResult]]


def parse_hedge_after(value: object) -> float | str | None:
    """Check `hedge_after`: seconds in (0, 300], or `"pNN"` with 50 <= NN < 100 (decimals
    allowed: `"p99.9"`). Returns seconds as a float or the percentile's text; ValueError with a
    one-line reason otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        percentile(value)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError('must be seconds (a number) or a percentile such as "p95"')
    if math.isnan(value) or not 0 < value <= 300:
        raise ValueError(f"{value!r} is not a number of seconds in (0, 300]")
    return float(value)


def percentile(text: str) -> float:
    """`"p95"` -> 95.0; ValueError (one line) for anything else or outside [50, 100)."""
    match = _PERCENTILE.fullmatch(text)
    if match is None:
        raise ValueError(f'{text!r} is neither seconds nor a percentile such as "p95" or "p99.9"')
    value = float(match.group(1))
    if not 50 <= value < 100:
        raise ValueError(f"{text!r}: the percentile must be at least p50 and below p100")
    return value


class Latencies:
    """The last `window` answered attempts' seconds, and a percentile of them."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self._seconds: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds.append(seconds)

    def percentile(self, p: float) -> float | None:
        """The `p`th percentile (nearest rank), or None with fewer than MIN_SAMPLES."""
        with self._lock:
            if len(self._seconds) < MIN_SAMPLES:
                return None
            ordered = sorted(self._seconds)
        rank = max(0, math.ceil(p / 100 * len(ordered)) - 1)
        return ordered[rank]


class Hedger:
    """One upstream's hedging: when to send the hedge, whether it may be sent, who won."""

    def __init__(
        self,
        hedge_after: float | str,
        *,
        bulkhead: Bulkhead,
        budget: RetryBudget,
        breaker: CircuitBreaker,
    ) -> None:
        self._fixed = hedge_after if not isinstance(hedge_after, str) else None
        self._percentile = percentile(hedge_after) if isinstance(hedge_after, str) else None
        self.latencies = Latencies()
        self._bulkhead = bulkhead
        self._budget = budget
        self._breaker = breaker

    @classmethod
    def build(
        cls,
        upstream: UpstreamConfig,
        *,
        bulkhead: Bulkhead,
        budget: RetryBudget,
        breaker: CircuitBreaker,
    ) -> Hedger | None:
        """The upstream's hedger, or None when it does not hedge (unset, or not idempotent)."""
        if upstream.hedge_after is None or not upstream.is_idempotent:
            return None
        return cls(upstream.hedge_after, bulkhead=bulkhead, budget=budget, breaker=breaker)

    def delay(self) -> float | None:
        """Seconds after which the hedge goes out (None: not yet known, so no hedge)."""
        if self._fixed is not None:
            return self._fixed
        assert self._percentile is not None
        return self.latencies.percentile(self._percentile)

    def wrap(self, attempt: Attempt) -> Attempt:
        """`attempt` with a hedge sent when it is late (same signature, never raises more)."""

        async def hedged(seconds: float) -> SourceResult:
            return await self.run(attempt, seconds)

        return hedged

    async def run(self, attempt: Attempt, seconds: float) -> SourceResult:
        """One attempt of `seconds`, hedged once if it has not answered after `delay()`."""
        began = time.perf_counter()
        delay = self.delay()
        if delay is None or delay >= seconds:
            return self._timed(await attempt(seconds), began)
        first = asyncio.create_task(_awaited(attempt(seconds)))
        tasks = [first]
        try:
            done, _ = await asyncio.wait(tasks, timeout=delay)
            if done:
                return self._timed(first.result(), began)
            if not self._admit():
                await asyncio.wait(tasks)
                return _flag(self._timed(first.result(), began), "refused")
            second = asyncio.create_task(_awaited(attempt(seconds - delay)))
            second.add_done_callback(lambda _: self._bulkhead.leave())
            tasks.append(second)
            winner, outcome = await _race(first, second)
        except asyncio.CancelledError:
            await _cancel_once(tasks)
            raise
        return _flag(self._timed(winner, began), outcome)

    def _admit(self) -> bool:
        """May a hedge go out now? Takes a bulkhead slot and a retry from the budget if so."""
        if self._breaker.state != "closed" or not self._bulkhead.try_enter():
            return False
        if not self._budget.try_retry():
            self._bulkhead.leave()
            return False
        return True

    def _timed(self, result: SourceResult, began: float) -> SourceResult:
        if result.ok:
            self.latencies.add(time.perf_counter() - began)
        return result


async def _awaited(call: Awaitable[SourceResult]) -> SourceResult:
    return await call


async def _race(
    first: asyncio.Task[SourceResult], second: asyncio.Task[SourceResult]
) -> tuple[SourceResult, HedgeOutcome]:
    """The first `ok` result of the two (the other cancelled, once, and awaited)."""
    pending = {first, second}
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in (first, second):  # (both may land in one step: the first attempt wins ties)
            if task in done and task.result().ok:
                await _cancel_once(list(pending))
                return task.result(), "first_won" if task is first else "hedge_won"
    return first.result(), "both_failed"


async def _cancel_once(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel each unfinished task once and wait for its clean-up, however often we are
    cancelled meanwhile (held in `_closing` so an abandoned clean-up still completes)."""
    for task in tasks:
        if not task.done() and not task.cancelling():
            task.cancel()
            _closing.add(task)
            task.add_done_callback(_closing.discard)
    if tasks:
        await asyncio.wait(tasks)


def _flag(result: SourceResult, outcome: HedgeOutcome) -> SourceResult:
    return dataclasses.replace(result, hedge=outcome)


#: Attempts cancelled by a hedge whose clean-up nobody waits for any more.
_closing: set[asyncio.Task[Any]] = set()
