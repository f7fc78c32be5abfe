"""One upstream's guard: its retries, budget, breaker and bulkhead applied to each call, in order.

A call first needs the bulkhead's room and the breaker's permit (else it is refused, the upstream
not contacted); its first attempt runs at once, and only a retriable result enters tenacity's
loop under the retry policy. The async call and the sync twins' blocking one share the policy
and the state: the twins are measured against the same protection. State is per worker process
(see the package docstring) unless shared fleet-wide (`shared`, opt-in: the async calls take a
fleet-wide slot too, the sync twins keep the local bulkhead only); everything takes an injected
clock so tests drive it on a fake one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, ItemsView, Mapping
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, RetryCallState, Retrying

from aggregator.errors import UpstreamCircuitOpenError, UpstreamError, UpstreamOverloadedError
from aggregator.models import SourceResult
from aggregator.resilience.breaker import (
    CircuitBreaker,
    Permit,
    StateListener,
    is_upstream_failure,
)
from aggregator.resilience.budget import Clock, RetryBudget
from aggregator.resilience.bulkhead import Bulkhead
from aggregator.resilience.hedge import Hedger
from aggregator.resilience.retries import (
    RETRY_IF_RETRIABLE,
    is_retriable,
    last_result,
    plan,
)

if TYPE_CHECKING:
    from aggregator.config import UpstreamConfig
    from aggregator.resilience.shared import SharedState

# The package's name (was one module): log configurations and tests name this logger.
logger = logging.getLogger("aggregator.resilience")

#: One attempt: given the seconds it may take, one upstream call as a result (never raises).
AsyncAttempt = Callable[[float], Awaitable[SourceResult]]
SyncAttempt = Callable[[float], SourceResult]


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
        shared: SharedState | None = None,
    ) -> None:
        self.name = name
        self.timeout = upstream.timeout
        # A call that may not be sent twice (a POST not marked idempotent) is never retried.
        self.retries = upstream.retries if upstream.retriable else 0
        self.backoff = upstream.retry_backoff
        self.budget = RetryBudget(upstream.retry_budget, clock=clock)
        if shared is not None and upstream.breaker_failures:
            self.breaker: CircuitBreaker = shared.breaker(
                name, upstream, clock=clock, on_change=on_circuit_change
            )
        else:
            self.breaker = CircuitBreaker(
                upstream.breaker_failures,
                upstream.breaker_cooldown,
                clock=clock,
                on_change=on_circuit_change,
            )
        self.bulkhead = Bulkhead(upstream.max_concurrency)
        #: The fleet-wide limit on top of the bulkhead (async calls), when shared and limited.
        self.shared = shared if upstream.max_concurrency is not None else None
        # A lease outlives the longest call it covers (its retries included), then expires.
        self._lease_seconds = upstream.timeout * (1 + self.retries) + 1.0
        #: Hedged attempts (None: this upstream does not hedge); async calls only.
        self.hedger = Hedger.build(
            upstream, bulkhead=self.bulkhead, budget=self.budget, breaker=self.breaker
        )
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
        lease = ""
        if self.shared is not None:
            refused = await self._lease_fleet_slot(permit)
            if isinstance(refused, UpstreamError):
                return refused
            lease = refused
        if self.hedger is not None:
            attempt = self.hedger.wrap(attempt)
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
                    retry=RETRY_IF_RETRIABLE,
                    retry_error_callback=last_result,
                )
                result = await retrying(again)
        except BaseException:
            self.breaker.release(permit)
            raise
        finally:
            self.bulkhead.leave()
            if lease and self.shared is not None:
                self.shared.report("release", self.name, lease)
        self._record(permit, result)
        return result

    async def _lease_fleet_slot(self, permit: Permit) -> str | UpstreamError:
        """A slot of the fleet-wide limit ("" when not enforced now), or the refusal."""
        assert self.shared is not None and self.bulkhead.limit is not None
        try:
            lease = await self.shared.lease(self.name, self.bulkhead.limit, self._lease_seconds)
        except BaseException:
            self.breaker.release(permit)
            self.bulkhead.leave()
            raise
        if lease is None:
            self.breaker.release(permit)
            self.bulkhead.leave()
            return UpstreamOverloadedError(
                self.name,
                f"already {self.bulkhead.limit} calls in flight across the fleet; refused at once",
            )
        return lease

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
                    retry=RETRY_IF_RETRIABLE,
                    retry_error_callback=last_result,
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
    ) -> tuple[Callable[[RetryCallState], bool], Callable[[RetryCallState], float]]:
        return plan(
            retries=self.retries,
            backoff=self.backoff,
            timeout=self.timeout,
            end=end,
            deadline=deadline,
            clock=self._clock,
            breaker=self.breaker,
            budget=self.budget,
        )


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
        shared: SharedState | None = None,
    ) -> None:
        #: The fleet's shared state (None: per worker, the default).
        self.shared = shared
        self._guards = {
            name: UpstreamGuard(
                name,
                up,
                clock=clock,
                on_circuit_change=circuit_listener(name) if circuit_listener else None,
                shared=shared,
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
