"""Shapes that cross module boundaries: one source's outcome and the envelope dashboards get."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from aggregator.errors import ErrorKind

JSONDict = dict[str, Any]

#: Error kinds of DESIGN §4; "ok" marks success.
SourceStatus = Literal["ok", ErrorKind]

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
    """

    status: SourceStatus
    ms: float
    cache: SourceCacheState | None = None
    fallback: bool | None = None


class Envelope(BaseModel):
    """The merged answer: what arrived, what failed, and whether it is complete."""

    data: JSONDict
    errors: dict[str, SourceError]
    sources: dict[str, SourceInfo]
    complete: bool
