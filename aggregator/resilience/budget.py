"""The retry budget: retries at most a share of calls, so retrying never multiplies an outage.

Over a sliding window (10 s in 1 s buckets) retries may be at most `ratio` x calls, plus a
reserve of 3 so a quiet upstream still gets a retry for a rare blip. The reserve is per window,
not "3 in flight at any moment": fast failures rarely have three retries out at once, so an
in-flight floor would retry every call of a dead upstream (3x its traffic), the very thing the
budget is for. A dead upstream sees at most ~(1 + ratio) x calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Clock = Callable[[], float]

BUDGET_WINDOW = 10.0
BUDGET_BUCKETS = 10
BUDGET_RESERVE = 3


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
