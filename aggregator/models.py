"""Shapes that cross module boundaries: one source's outcome and the envelope dashboards get."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from aggregator.errors import ErrorKind

JSONDict = dict[str, Any]

#: The envelope's error kinds; "ok" marks success.
SourceStatus = Literal["ok", ErrorKind]

#: What became of a hedged call: sent and the first attempt's answer used (`first_won`), sent and
#: the hedge's used (`hedge_won`), sent and neither answered well (`both_failed`), or due but
#: refused by the bulkhead, retry budget or breaker and not sent (`refused`).
HedgeOutcome = Literal["first_won", "hedge_won", "both_failed", "refused"]

#: Where a source's data came from when a source cache was consulted for it.
SourceCacheState = Literal["hit", "miss"]


@dataclass(frozen=True, slots=True)
class CacheControl:
    """What an upstream said about caching its answer (Cache-Control and Age), not a decision.

    Seconds are None when the directive was absent; an unreadable value reads as 0 (stale), as
    RFC 9111 §4.2.1 recommends. The cache package turns this into a TTL.
    """

    max_age: float | None = None
    s_maxage: float | None = None
    no_store: bool = False
    no_cache: bool = False
    private: bool = False
    #: Seconds the answer had already spent in caches on its way (the Age header).
    age: float = 0.0


@dataclass(slots=True)
class SourceResult:
    """What one upstream call produced: data on success, an error kind otherwise; never raises."""

    name: str
    status: SourceStatus
    ms: float
    data: Any = None
    detail: str | None = None
    upstream_status: int | None = None
    locations: list[str] = field(default_factory=list)
    #: The upstream's caching headers (successful calls only).
    cache_control: CacheControl | None = None
    #: "hit" or "miss" when a source cache was consulted for this source, else None.
    cache: SourceCacheState | None = None
    #: The call failed (`status` says how) and `data` is the upstream's configured fallback.
    fallback: bool = False
    #: Milliseconds after its request's first call began that this call started (None: unknown).
    started: float | None = None
    #: What became of a hedge of this call (`aggregator.resilience.hedge`); None: none was due.
    hedge: HedgeOutcome | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class SourceError(BaseModel):
    """One failed source as the envelope reports it."""

    kind: SourceStatus
    detail: str
    status: int | None = None
    locations: list[str] | None = None


class SourceInfo(BaseModel):
    """Per-source status and timing, present for every source; `cache` only when one applied.

    `fallback` is present (true) only when `data` holds the configured fallback in place of a
    failed call; `status` then keeps the failure's kind, so older readers see a failure.
    `started` is when the source started, in ms since the fan-out began (the waterfall: a source
    that needs another's answer starts after it); absent for one that never started (cut off by
    the deadline while it waited for what it needs).
    """

    status: SourceStatus
    ms: float
    started: float | None = None
    cache: SourceCacheState | None = None
    fallback: bool | None = None
    #: Present (true) only when a hedge (one more identical request) was sent for this source.
    hedged: bool | None = None
    #: With `hedged`: which attempt's answer is used (`first` or `hedge`); absent when neither
    #: answered well.
    hedge_winner: Literal["first", "hedge"] | None = None


class StaleInfo(BaseModel):
    """Why an answer is older than its cache_ttl: present only on such an answer."""

    #: Seconds since the answer was stored.
    age: float
    #: `refreshing`: a refresh runs meanwhile (stale-while-revalidate); `refresh_failed`: the
    #: refresh this request waited for failed, and this is the last good answer instead.
    reason: Literal["refreshing", "refresh_failed"]
    #: What the failed refresh answered (its status and failed sources).
    detail: str | None = None


class Envelope(BaseModel):
    """The merged answer: what arrived, what failed, and whether it is complete."""

    data: JSONDict
    errors: dict[str, SourceError]
    sources: dict[str, SourceInfo]
    complete: bool
    #: Set on a stale answer only (X-Cache: STALE): how old and why.
    stale: StaleInfo | None = None
