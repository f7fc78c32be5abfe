"""The demo's counters and its record of every request received (`/_stats`, `/_requests`).

What lets tests and the bench prove fan-out, caching, connection reuse and where requests went;
kept bounded so a long benchmark cannot grow the demo's memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any

SERVICES = ("weather", "stocks", "news", "profile", "recommendations", "echo")


class Stats:
    """Counters exposed on /_stats, so tests can prove fan-out, caching and connection reuse."""

    def __init__(self) -> None:
        self.requests = dict.fromkeys(SERVICES, 0)
        self.total = 0
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._epoch = 0
        self._transports: dict[asyncio.BaseTransport, int] = {}
        self._prune_at = 64
        #: Every request received (bounded): what `GET /_requests` lists, each with its headers
        #: (aiohttp's read-only object, kept as is: nothing is copied per request).
        self.received: deque[tuple[dict[str, str], Mapping[str, str]]] = deque(maxlen=10_000)

    def record(self, service: str, transport: asyncio.BaseTransport | None) -> None:
        """Count a request and, if its connection is new since the last reset, the connection."""
        self.requests[service] += 1
        self.total += 1
        if transport is None or self._transports.get(transport) == self._epoch:
            return
        if transport not in self._transports and len(self._transports) >= self._prune_at:
            self._prune()
            self._prune_at = max(64, 2 * len(self._transports))
        self._transports[transport] = self._epoch
        self.connections += 1

    def _prune(self) -> None:
        """Forget closed transports so a no-keep-alive benchmark cannot grow memory."""
        closing = [t for t in self._transports if t.is_closing()]
        for transport in closing:
            del self._transports[transport]

    def reset(self) -> None:
        """Zero every counter; open connections are counted again when they next send."""
        self.requests = dict.fromkeys(SERVICES, 0)
        self.total = 0
        self.connections = 0
        self.max_in_flight = self.in_flight
        self._epoch += 1
        self.received.clear()

    def snapshot(self) -> dict[str, Any]:
        """Render the counters as the JSON body of /_stats."""
        self._prune()
        return {
            "connections": self.connections,
            "open_connections": len(self._transports),
            "requests": dict(self.requests),
            "total_requests": self.total,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }
