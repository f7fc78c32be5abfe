"""The near cache: a worker's own copy of fresh entries, for at most `cache_local_ttl` seconds.

A hit from memory skips the backend round trip (Redis, a file read) for the hottest keys. It is
bounded twice: by entries (least recently used out first) and by time, so a purge made by
another process reaches this worker within `cache_local_ttl`; this process's purges clear it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from aggregator.cache.entries import AggregateEntry

_MAX = 10_000  # entries per process


class NearCache:
    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl = ttl  # 0: off
        self._clock = clock  # the entries' clock (freshness), not the near cache's own
        # key -> (entry, monotonic time until which it may be reused)
        self._entries: OrderedDict[str, tuple[AggregateEntry, float]] = OrderedDict()

    def get(self, key: str) -> AggregateEntry | None:
        """The fresh entry for `key`, if this worker holds one."""
        held = self._entries.get(key)
        if held is None:
            return None
        entry, until = held
        if time.monotonic() < until and entry.meta.freshness(self._clock()) == "fresh":
            return entry
        del self._entries[key]
        return None

    def put(self, key: str, entry: AggregateEntry) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (entry, time.monotonic() + self.ttl)
        self._entries.move_to_end(key)
        if len(self._entries) > _MAX:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
