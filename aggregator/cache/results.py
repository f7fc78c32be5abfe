"""What the cache's lookups, fills and warms return: the vocabulary its callers share.

The fill (`aggregator.aggregate`) returns `Filled`; the fast path hands a `Lookup` to the view
through `looked_up`, so the request is parsed and looked up once.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from aggregator.cache.entries import AggregateEntry
from aggregator.cache.privacy import ANONYMOUS, Caller
from aggregator.params import ParamValue
from aggregator.progress import Listener

State = Literal["fresh", "stale", "stale_if_error", "expired", "miss", "bypass", "off"]


@dataclass(frozen=True, slots=True)
class Filled:
    """One fan-out's answer, ready to send (or one another process stored meanwhile)."""

    status: int
    body: bytes
    complete: bool
    timing: str
    failed: tuple[str, ...] = ()  # sources in the envelope's `errors`, sorted
    entry: AggregateEntry | None = None  # set when the answer came from another process
    stored: bool = False  # set when this fill's answer was written to the cache
    cache_ms: float = 0.0  # cache I/O of this fill (lock, re-check, store), for Server-Timing


@dataclass(frozen=True, slots=True)
class WarmResult:
    """What warming one target did, for `aggregator warm` and `POST /admin/warm`."""

    outcome: Literal["warmed", "partial", "failed", "skipped"]
    status: int | None = None
    sources_failed: tuple[str, ...] = ()
    detail: str = ""


class Fill(Protocol):
    """What the cache calls to fill a key: one fan-out (`aggregator.aggregate.AggregateFill`);
    `listener` is told about each source's result as it lands (`aggregator.progress`)."""

    def __call__(
        self, name: str, params: Mapping[str, ParamValue], *, listener: Listener | None = None
    ) -> Awaitable[Filled]: ...


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache holds for a key; the adapter hands it to the view so it is read once."""

    name: str
    params: Mapping[str, ParamValue]
    state: State
    entry: AggregateEntry | None = None
    vary: str = ""  # the key's header digest (privacy.Caller.vary)
    caller: Caller = ANONYMOUS  # what the request's headers say (its vary is `vary`)
    #: perf_counter() when the request's handling began, and ms the lookup took (Server-Timing).
    started: float = 0.0
    ms: float = 0.0


#: The fast path's lookup for the request being served, set by the adapter before Flask runs
#: (the request's context reaches the view), so the view neither parses nor looks up again.
looked_up: contextvars.ContextVar[Lookup | None] = contextvars.ContextVar(
    "aggregator_looked_up", default=None
)
