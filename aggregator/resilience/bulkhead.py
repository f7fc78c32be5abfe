"""The bulkhead: a cap on one upstream's calls in flight, so a slow one cannot starve the rest.

At most `max_concurrency` calls to one upstream at once (retries and backoff included); a call
beyond it is refused at once as `overloaded` rather than queued, so a slow upstream cannot hold
every connection and task while its siblings stay fast.
"""

from __future__ import annotations

import threading


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
