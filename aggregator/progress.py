"""A fill's source results as they land, for every request that waits on that fill.

`fanout.Calls` tells one `Listener` about each result the moment it is recorded (its key in the
envelope's `sources`, and the result with its fallback applied). The cache gives each fill it
starts a `Progress` as that listener, so the requests coalesced behind one fill (single-flight)
all see the same results live: a request that joins late is told at once what already landed,
then the rest as it lands. A progressive answer (`aggregator.events`) is made of these.

Everything here runs on the server loop: results are recorded there (a `def` view's calls too),
and listeners are plain callbacks that must not block (an `asyncio.Queue.put_nowait`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aggregator.models import SourceResult

logger = logging.getLogger(__name__)

#: Told about each result as it is recorded: its key in `sources`, and the result.
Listener = Callable[[str, SourceResult], None]


class Progress:
    """One fill's results so far, and who listens for the next ones."""

    __slots__ = ("_landed", "_listeners")

    def __init__(self) -> None:
        self._landed: list[tuple[str, SourceResult]] = []
        self._listeners: list[Listener] = []

    def publish(self, key: str, result: SourceResult) -> None:
        """A result just landed (the fill's `Listener`)."""
        self._landed.append((key, result))
        for listener in self._listeners:
            _tell(listener, key, result)

    def subscribe(self, listener: Listener) -> None:
        """Tell `listener` what already landed, at once, then each result as it lands."""
        for key, result in self._landed:
            _tell(listener, key, result)
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


def _tell(listener: Listener, key: str, result: SourceResult) -> None:
    # A listener's bug must not fail the fill that other requests (and the cache) wait for.
    try:
        listener(key, result)
    except Exception:
        logger.exception("a progress listener failed on %s", key)
