"""The fleet-wide circuit breaker: the existing breaker's interface over the shared state.

While the shared state is healthy (`shared.SharedState`), a call is permitted or refused from a
local mirror of the fleet's state, so `acquire` costs what the local breaker's does: no I/O. The
mirror is refreshed by the shared state's background task, and at once by what this worker
reports. Open fleet-wide, a call is refused unless this worker holds the fleet's probe lease
(asked for by the refused call, taken by the background task with `SET NX PX cooldown`): the
next call is then the fleet's one probe of this cool-down. A worker whose own breaker trips
refuses at once for one cool-down, without waiting for the fleet to be read again; it never
probes on its own while the shared state is healthy.

The local breaker underneath hears every outcome all along, so when Redis goes away the worker
falls back to today's local state as it would be had it always been deciding alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aggregator.resilience.breaker import BreakerState, CircuitBreaker, Permit, StateListener

if TYPE_CHECKING:
    from aggregator.config import UpstreamConfig
    from aggregator.resilience.shared import SharedState

logger = logging.getLogger("aggregator.resilience")

_CALL = Permit(probe=False)
#: The fleet's probe permit; told apart from the local breaker's by identity.
_FLEET_PROBE = Permit(probe=True)


class SharedCircuitBreaker(CircuitBreaker):
    """A `CircuitBreaker` that decides fleet-wide while the shared state is healthy."""

    def __init__(
        self,
        shared: SharedState,
        name: str,
        upstream: UpstreamConfig,
        *,
        on_change: StateListener | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(upstream.breaker_failures, upstream.breaker_cooldown, **kwargs)
        self.name = name
        self.upstream = upstream
        self._shared = shared
        self._listener = on_change
        self._reported: BreakerState = "closed"
        self._fleet_open = False
        self._fleet_fails = 0
        self._want_probe = False
        self._granted = False
        self._probing_fleet = False

    @property
    def state(self) -> BreakerState:
        if not self._shared.healthy:
            return super().state
        if self._probing_fleet:
            return "half_open"
        return "open" if self._fleet_open or self._tripped_here() else "closed"

    @property
    def consecutive_failures(self) -> int:
        return self._fleet_fails if self._shared.healthy else super().consecutive_failures

    def acquire(self) -> Permit | None:
        if not self._shared.healthy:
            permit = super().acquire()
        else:
            with self._lock:
                if not self._fleet_open:
                    # This worker's own trip holds until the fleet's is seen (a poll away):
                    # a fast-failing upstream would otherwise get a poll interval of calls.
                    permit = None if self._tripped_here() else _CALL
                elif self._granted and not self._probing_fleet:
                    self._granted = False
                    self._probing_fleet = True
                    permit = _FLEET_PROBE
                else:
                    self._want_probe = True  # the background task asks for the lease
                    permit = None
        self._notify()
        return permit

    def record(self, permit: Permit, *, failed: bool) -> None:
        fleet_probe = permit is _FLEET_PROBE
        super().record(_CALL if fleet_probe else permit, failed=failed)
        if fleet_probe:
            with self._lock:
                self._probing_fleet = False
                if not failed:
                    self._fleet_open, self._fleet_fails = False, 0
            self._shared.report("reopen" if failed else "close", self.name)
        elif failed:
            self._shared.report("fail", self.name)
            self._fleet_fails += 1  # our own estimate until the next poll
        elif self._fleet_fails:
            self._fleet_fails = 0
            self._shared.report("reset", self.name)
        self._notify()

    def release(self, permit: Permit) -> None:
        if permit is _FLEET_PROBE:
            # Abandoned: the lease stays taken, so the fleet's next probe waits its cool-down.
            with self._lock:
                self._probing_fleet = False
        else:
            super().release(permit)

    def _tripped_here(self) -> bool:
        """The local breaker opened less than a cool-down ago (it never probes while shared)."""
        return self._state == "open" and self._clock() - self._opened_at < self.cooldown

    # -- the shared state's background task -------------------------------------------------

    def mirror(self, *, open_: bool, fails: int, why: str) -> None:
        """The fleet's state as read (or as this worker's own report made it)."""
        with self._lock:
            was = self._fleet_open
            self._fleet_open, self._fleet_fails = open_, fails
            if not open_:
                self._want_probe = self._granted = False
                if was and self._state != "closed":
                    # The fleet's probe succeeded: follow it now, not after a local cool-down.
                    self._state, self._consecutive = "closed", 0
        if open_ and not was:
            logger.warning(
                "upstream %s: fleet circuit open (%s); calls refused, one probe per %g s "
                "for the whole fleet",
                self.name,
                why,
                self.cooldown,
            )
        elif was and not open_:
            logger.info("upstream %s: fleet circuit closed, calls flow again", self.name)
        self._notify()

    def wants_probe(self) -> bool:
        with self._lock:
            return self._fleet_open and self._want_probe and not self._granted

    def grant_probe(self, won: bool) -> None:
        with self._lock:
            self._want_probe = False
            self._granted = won and self._fleet_open

    def fleet_lost(self) -> None:
        """Redis went away: forget the fleet's view (the local breaker decides from now on)."""
        with self._lock:
            self._fleet_open = self._want_probe = self._granted = False
            self._fleet_fails = 0
        self._notify()

    def _notify(self) -> None:
        state = self.state
        if state != self._reported:
            self._reported = state
            if self._listener is not None:
                self._listener(state)
