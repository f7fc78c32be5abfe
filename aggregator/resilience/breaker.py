"""The circuit breaker: stop calling an upstream that keeps failing, and probe for its recovery.

`failures` consecutive failed calls (a call = one `fetch`, its retries included) open it; while
open, calls are refused at once (`circuit_open`, the upstream is not contacted). After
`cooldown` one probe call is let through (half-open; others are still refused); its success
closes the breaker, its failure re-opens it for another cool-down. Failures are what says the
upstream is unwell: `connect`, `timeout`, HTTP 5xx and 429. A 4xx or an unusable body comes from
a live upstream and counts as a success; a call we abandon (deadline, client gone) says nothing
and only frees the probe slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aggregator.models import SourceResult

Clock = Callable[[], float]
BreakerState = Literal["closed", "open", "half_open"]
StateListener = Callable[[BreakerState], None]


def is_upstream_failure(result: SourceResult) -> bool:
    """Counts against the breaker: the upstream is down, slow, failing or shedding load."""
    if result.status in ("connect", "timeout"):
        return True
    status = result.upstream_status or 0
    return result.status == "http_status" and (status >= 500 or status == 429)


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
