"""Per-upstream protection, per worker process: budgeted retries, a circuit breaker, a bulkhead.

Each upstream gets one `UpstreamGuard` per worker process (the app builds a `Guards` registry
from its config). Its state lives in that process only: with N workers an upstream sees N
breakers that open on their own, N budgets and N concurrency limits (see README, Resilience).
The state machines here are plain objects with an injected clock and no I/O, so tests drive them
on a fake clock; `upstream.fetch` supplies the attempt (one HTTP call) and `UpstreamGuard.call`
decides whether it runs, how often, and what a refusal is.

Decisions, and why:
- **Retries** only for idempotent calls (every upstream call is a GET) that failed in a way a new
  attempt can fix: `connect` and HTTP 502/503/504. A `timeout` is not retried: the attempt
  already used the time a retry would need. Every attempt runs inside the source's own
  `timeout` (the retries share it, so a retried source answers no later than before), and a
  retry starts only if, after its backoff, at least a quarter of that timeout is left before
  the source's end and the aggregate deadline: an attempt with no time to finish is only load.
  Backoff is exponential with full jitter (tenacity's `wait_random_exponential`): retry k waits
  uniform(0, base x 2^(k-1)). tenacity drives the loop; the first attempt runs before tenacity
  is involved (its per-call set-up costs ~30 us, 3% of a call's CPU, so successes skip it).
- **Retry budget**: over a sliding window (10 s in 1 s buckets) retries may be at most `ratio`
  x calls, plus a reserve of 3 so a quiet upstream still gets a retry for a rare blip. The
  reserve is per window, not "3 in flight at any moment": fast failures rarely have three
  retries out at once, so an in-flight floor would retry every call of a dead upstream (3x its
  traffic), the very thing the budget is for. A dead upstream sees at most ~(1 + ratio) x calls.
- **Circuit breaker**: `failures` consecutive failed calls (a call = one `fetch`, its retries
  included) open it; while open, calls are refused at once (`circuit_open`, the upstream is not
  contacted). After `cooldown` one probe call is let through (half-open; others are still
  refused); its success closes the breaker, its failure re-opens it for another cool-down.
  Failures are what says the upstream is unwell: `connect`, `timeout`, HTTP 5xx and 429. A 4xx
  or an unusable body comes from a live upstream and counts as a success; a call we abandon
  (deadline, client gone) says nothing and only frees the probe slot.
- **Bulkhead**: at most `max_concurrency` calls to one upstream at once (retries and backoff
  included); a call beyond it is refused at once as `overloaded` rather than queued, so a slow
  upstream cannot hold every connection and task while its siblings stay fast.
- **Fallback**: a failed source with static `fallback` data in the config is answered with it,
  flagged `fallback`, keeping its error kind in `errors` so the answer is not `complete`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, ItemsView, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_result
from tenacity import wait_random_exponential as _full_jitter

from aggregator.errors import UpstreamCircuitOpenError, UpstreamError, UpstreamOverloadedError
from aggregator.models import SourceResult

if TYPE_CHECKING:
    from aggregator.config import UpstreamConfig

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
#: One attempt: given the seconds it may take, one upstream call as a result (never raises).
AsyncAttempt = Callable[[float], Awaitable[SourceResult]]
SyncAttempt = Callable[[float], SourceResult]
BreakerState = Literal["closed", "open", "half_open"]
StateListener = Callable[[BreakerState], None]

#: Statuses a new attempt can fix (gateway trouble, a restarting or overloaded upstream).
RETRIABLE_STATUSES = frozenset({502, 503, 504})
#: A retry needs at least this share of the source's timeout left after its backoff.
MIN_ATTEMPT_SHARE = 0.25
BUDGET_WINDOW = 10.0
BUDGET_BUCKETS = 10
BUDGET_RESERVE = 3


def is_retriable(result: SourceResult) -> bool:
    """Worth another attempt: a connection failure or a gateway-type status."""
    if result.status == "connect":
        return True
    return result.status == "http_status" and result.upstream_status in RETRIABLE_STATUSES


def is_upstream_failure(result: SourceResult) -> bool:
    """Counts against the breaker: the upstream is down, slow, failing or shedding load."""
    if result.status in ("connect", "timeout"):
        return True
    status = result.upstream_status or 0
    return result.status == "http_status" and (status >= 500 or status == 429)


class RetryBudget:
    """Retries at most `ratio` x calls (plus `reserve`) over a sliding window of `window` s.

    Counts live in `buckets` slots of window/buckets seconds each, so the window slides in
    steps of one slot and memory stays constant under any traffic.
    """

    def __init__(
        self,
        ratio: float,
        *,
        reserve: int = BUDGET_RESERVE,
        window: float = BUDGET_WINDOW,
        buckets: int = BUDGET_BUCKETS,
        clock: Clock = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self._width = window / buckets
        # Each slot: [slot number it counts for, calls, retries].
        self._slots = [[-1, 0, 0] for _ in range(buckets)]
        self._clock = clock
        self._lock = threading.Lock()

    def record_call(self) -> None:
        """A first attempt went out (a refused call is none: it costs the upstream nothing)."""
        with self._lock:
            self._current()[1] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget if it has one; the caller retries only on True."""
        with self._lock:
            calls, retries = self._totals()
            if retries >= self.ratio * calls + self.reserve:
                return False
            self._current()[2] += 1
            return True

    def totals(self) -> tuple[int, int]:
        """Calls and retries in the window (for tests and logs)."""
        with self._lock:
            return self._totals()

    def _current(self) -> list[int]:
        number = int(self._clock() // self._width)
        slot = self._slots[number % len(self._slots)]
        if slot[0] != number:
            slot[:] = [number, 0, 0]
        return slot

    def _totals(self) -> tuple[int, int]:
        oldest = int(self._clock() // self._width) - len(self._slots) + 1
        live = [s for s in self._slots if s[0] >= oldest]
        return sum(s[1] for s in live), sum(s[2] for s in live)


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; `probe` marks the single half-open trial call."""

    probe: bool


_CALL = Permit(probe=False)
_PROBE = Permit(probe=True)


class CircuitBreaker:
    """closed -> (`failures` consecutive failures) -> open -> (`cooldown`) -> half-open probe.

    `failures=0` disables it (always closed). `on_change` hears every state change, under the
    breaker's lock (it must be quick and must not call back into the breaker): the metrics'
    circuit gauge.
    """

    def __init__(
        self,
        failures: int,
        cooldown: float,
        *,
        clock: Clock = time.monotonic,
        on_change: StateListener | None = None,
    ) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """Stays `open` after the cool-down until a call asks (that call becomes the probe)."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def acquire(self) -> Permit | None:
        """A permit to call, or None: refuse the call without contacting the upstream."""
        with self._lock:
            if self._state == "closed":
                return _CALL
            if self._state == "open":
                if self._clock() - self._opened_at < self.cooldown:
                    return None
                self._set("half_open")
            if self._probing:
                return None
            self._probing = True
            return _PROBE

    def record(self, permit: Permit, *, failed: bool) -> None:
        """The outcome of a permitted call."""
        with self._lock:
            if permit.probe:
                self._probing = False
            if not failed:
                self._consecutive = 0
                if self._state != "closed":
                    self._set("closed")
                return
            self._consecutive += 1
            reopen = self._state == "half_open" and permit.probe
            trip = self._state == "closed" and 0 < self.failures <= self._consecutive
            if reopen or trip:
                self._set("open")
                self._opened_at = self._clock()

    def _set(self, state: BreakerState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)

    def release(self, permit: Permit) -> None:
        """A permitted call was abandoned (cancelled): no verdict, but the probe slot is free."""
        if permit.probe:
            with self._lock:
                self._probing = False


class Bulkhead:
    """At most `limit` calls at once (None: unlimited); beyond it, refuse instead of queueing."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_enter(self) -> bool:
        with self._lock:
            if self.limit is not None and self._in_flight >= self.limit:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1


class _Backoff:
    """Full-jitter exponential waits, drawn once per attempt so `stop` and tenacity agree."""

    def __init__(self, base: float, cap: float) -> None:
        self._jitter = _full_jitter(multiplier=base, max=cap)
        self._drawn: dict[int, float] = {}

    def __call__(self, state: RetryCallState) -> float:
        number = state.attempt_number
        if number not in self._drawn:
            self._drawn[number] = self._jitter(state)
        return self._drawn[number]


_RETRIABLE = retry_if_result(is_retriable)


def _last_result(state: RetryCallState) -> SourceResult:
    """Out of retries: the last attempt's own result (its real error kind), not a RetryError."""
    assert state.outcome is not None
    result: SourceResult = state.outcome.result()
    return result


class UpstreamGuard:
    """Retries, budget, breaker and bulkhead of one upstream in this process."""

    def __init__(
        self,
        name: str,
        upstream: UpstreamConfig,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        sleep_sync: Callable[[float], None] = time.sleep,
        on_circuit_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self.timeout = upstream.timeout
        self.retries = upstream.retries
        self.backoff = upstream.retry_backoff
        self.budget = RetryBudget(upstream.retry_budget, clock=clock)
        self.breaker = CircuitBreaker(
            upstream.breaker_failures,
            upstream.breaker_cooldown,
            clock=clock,
            on_change=on_circuit_change,
        )
        self.bulkhead = Bulkhead(upstream.max_concurrency)
        self._clock = clock
        self._sleep = sleep
        self._sleep_sync = sleep_sync

    async def call(
        self, attempt: AsyncAttempt, *, deadline: float | None = None
    ) -> SourceResult | UpstreamError:
        """Run `attempt` under the guard; an error means the call was refused, not made.

        `deadline` is the aggregate's end on this guard's clock: no retry starts that could
        not finish before it (fan_out cancels whatever is still running at that point).
        """
        permit = self._admit()
        if isinstance(permit, UpstreamError):
            return permit
        try:
            end = self._clock() + self.timeout
            self.budget.record_call()
            result = await attempt(self.timeout)
            if is_retriable(result) and self.retries:
                seeded = [result]

                async def again() -> SourceResult:
                    # tenacity's first "attempt" is the one already made (see module docstring).
                    return seeded.pop() if seeded else await attempt(end - self._clock())

                stop, wait = self._plan(end, deadline)
                retrying = AsyncRetrying(
                    sleep=self._sleep,
                    stop=stop,
                    wait=wait,
                    retry=_RETRIABLE,
                    retry_error_callback=_last_result,
                )
                result = await retrying(again)
        except BaseException:
            self.breaker.release(permit)
            raise
        finally:
            self.bulkhead.leave()
        self._record(permit, result)
        return result

    def call_sync(
        self, attempt: SyncAttempt, *, deadline: float | None = None
    ) -> SourceResult | UpstreamError:
        """`call` for blocking code (the sync twins); same policy, same shared state."""
        permit = self._admit()
        if isinstance(permit, UpstreamError):
            return permit
        try:
            end = self._clock() + self.timeout
            self.budget.record_call()
            result = attempt(self.timeout)
            if is_retriable(result) and self.retries:
                seeded = [result]

                def again() -> SourceResult:
                    return seeded.pop() if seeded else attempt(end - self._clock())

                stop, wait = self._plan(end, deadline)
                retrying = Retrying(
                    sleep=self._sleep_sync,
                    stop=stop,
                    wait=wait,
                    retry=_RETRIABLE,
                    retry_error_callback=_last_result,
                )
                result = retrying(again)
        except BaseException:
            self.breaker.release(permit)
            raise
        finally:
            self.bulkhead.leave()
        self._record(permit, result)
        return result

    def _record(self, permit: Permit, result: SourceResult) -> None:
        """Tell the breaker; log its transitions (once each, not per refused call)."""
        before = self.breaker.state
        self.breaker.record(permit, failed=is_upstream_failure(result))
        after = self.breaker.state
        if after == "open" and before != "open":
            logger.warning(
                "upstream %s: circuit opened (%s); calls refused for %g s",
                self.name,
                result.status,
                self.breaker.cooldown,
            )
        elif after == "closed" and before != "closed":
            logger.info("upstream %s: circuit closed, calls flow again", self.name)

    def _admit(self) -> Permit | UpstreamError:
        if not self.bulkhead.try_enter():
            return UpstreamOverloadedError(
                self.name, f"already {self.bulkhead.limit} calls in flight; refused at once"
            )
        permit = self.breaker.acquire()
        if permit is None:
            self.bulkhead.leave()
            return UpstreamCircuitOpenError(
                self.name,
                f"circuit open after {self.breaker.failures} consecutive failures; "
                f"not called (next probe within {self.breaker.cooldown:g} s)",
            )
        return permit

    def _plan(
        self, end: float, deadline: float | None
    ) -> tuple[Callable[[RetryCallState], bool], _Backoff]:
        """tenacity's `stop` and `wait` for one call that ends at `end` (or `deadline`)."""
        backoff = _Backoff(self.backoff, self.timeout)
        window_end = end if deadline is None else min(end, deadline)
        min_attempt = MIN_ATTEMPT_SHARE * self.timeout

        def stop(state: RetryCallState) -> bool:
            # Cheap checks first; the budget is last because taking a retry from it is final.
            if state.attempt_number > self.retries or self.breaker.state != "closed":
                return True
            if window_end - (self._clock() + backoff(state)) < min_attempt:
                return True
            return not self.budget.try_retry()

        return stop, backoff


class Guards:
    """Every upstream's guard for one app (that is, one worker process).

    `circuit_listener(name)` gives each breaker its `on_change` (the metrics' circuit gauge).
    """

    def __init__(
        self,
        upstreams: Mapping[str, UpstreamConfig],
        *,
        clock: Clock = time.monotonic,
        circuit_listener: Callable[[str], StateListener | None] | None = None,
    ) -> None:
        self._guards = {
            name: UpstreamGuard(
                name,
                up,
                clock=clock,
                on_circuit_change=circuit_listener(name) if circuit_listener else None,
            )
            for name, up in upstreams.items()
        }

    def __getitem__(self, name: str) -> UpstreamGuard:
        return self._guards[name]

    def get(self, name: str) -> UpstreamGuard | None:
        return self._guards.get(name)

    def items(self) -> ItemsView[str, UpstreamGuard]:
        """Every upstream's guard, in config order (for `/status`)."""
        return self._guards.items()


def with_fallback(result: SourceResult, upstream: UpstreamConfig) -> SourceResult:
    """A failed result answered with the upstream's static fallback data, if it has any.

    The error kind stays (it is still reported under `errors`, so the answer is not complete);
    only `data` and the `fallback` flag change.
    """
    if result.ok or upstream.fallback is None:
        return result
    return dataclasses.replace(result, data=upstream.fallback_data, fallback=True)
