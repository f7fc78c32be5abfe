"""Cache keys, TTL arithmetic and the stored format: the only place that knows them.

An aggregate entry is two JSON documents on two lines: a small meta record (when stored, TTLs,
status, ETag, failed sources) and the response body exactly as served, so a hit sends stored
bytes without re-encoding them. Entries are re-validated on the way out: the meta through its
model, the body against the ETag digest recorded with it and through the envelope model;
anything else is a miss, never an error.

An aggregate's key may end in a digest of header values (`privacy`): those of its `cache_vary`
and of every client header one of its sources forwards (`forward_headers`: the answer may depend
on them). A source entry's key likewise has the digest of the headers its upstream forwards.
Digests, never the values: keys appear in logs and backend key listings, and a forwarded
`Authorization` or `Cookie` is a secret.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, ValidationError

from aggregator.config import AggregateConfig
from aggregator.models import Envelope
from aggregator.params import ParamValue
from aggregator.urltemplate import format_value

FORMAT: Literal[1] = 1
Freshness = Literal["fresh", "stale", "stale_if_error", "expired"]


class AggregateMeta(BaseModel):
    """What we need to answer from an entry without decoding its body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = FORMAT
    stored: float
    ttl: float
    stale_ttl: float = 0.0
    stale_if_error_ttl: float = 0.0
    status: int
    complete: bool
    etag: str
    timing: str = ""
    #: Sources in the body's `errors`, so a warm reports them without decoding the body.
    failed: tuple[str, ...] = ()

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored)

    def freshness(self, now: float) -> Freshness:
        age = self.age(now)
        if age < self.ttl:
            return "fresh"
        if age < self.ttl + self.stale_ttl:
            return "stale"
        if age < self.ttl + self.stale_if_error_ttl:
            return "stale_if_error"
        return "expired"

    def backend_timeout(self) -> int:
        """How long the backend keeps it: past every window it can still be served in."""
        return math.ceil(self.ttl + max(self.stale_ttl, self.stale_if_error_ttl)) + 1


@dataclass(frozen=True, slots=True)
class AggregateEntry:
    meta: AggregateMeta
    body: bytes


class SourceEntry(BaseModel):
    """One upstream's validated payload."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = FORMAT
    stored: float
    ttl: float
    data: Any


_SOURCES = b',"sources":'
_COMPLETE = b',"complete":'


def etag_for(body: bytes, status: int = 200) -> str:
    """A weak ETag over what a client considers the answer's content: its status, `data`,
    `errors` and `complete`, not `sources` (each answer's own timings and cache states).

    So an answer whose content did not change revalidates to a 304, cached or not, refreshed
    or not. `body` is an encoded envelope (`sources` and `complete` are its last two keys,
    and no source name can contain `"sources":`); anything else is digested whole.
    """
    end = body.rfind(_COMPLETE)
    start = body.rfind(_SOURCES, 0, end) if end > 0 else -1
    content = body[:start] + body[end:] if start > 0 else body
    return 'W/"' + hashlib.sha256(b"%d\n" % status + content).hexdigest()[:32] + '"'


def canonical_params(params: Mapping[str, ParamValue]) -> str:
    """Typed values in name order: `?b=2&a=1` and `?a=1&b=2` (or `a=01`) give one key."""
    return "&".join(
        f"{name}={quote(format_value(params[name]), safe='')}" for name in sorted(params)
    )


def aggregate_key(name: str, params: Mapping[str, ParamValue], vary: str = "") -> str:
    """`vary` is the digest of the request's `cache_vary` headers (`privacy.vary_digest`)."""
    key = f"agg:{name}:{canonical_params(params)}"
    return f"{key}|vary={vary}" if vary else key


def source_key(upstream: str, url: str, vary: str = "") -> str:
    """`vary`: the digest of the client headers this upstream forwards (`privacy.vary_digest`)."""
    key = f"src:{upstream}:{hashlib.sha256(url.encode()).hexdigest()[:32]}"
    return f"{key}|vary={vary}" if vary else key


def aggregate_marker(name: str) -> str:
    """Holds the time of the last purge of an aggregate; older entries are gone."""
    return f"purged:agg:{name}"


def source_marker(upstream: str) -> str:
    return f"purged:src:{upstream}"


def lock_key(key: str) -> str:
    return f"lock:{key}"


def encode_aggregate(meta: AggregateMeta, body: bytes) -> bytes:
    return meta.model_dump_json().encode() + b"\n" + body


def decode_aggregate(raw: object) -> AggregateEntry | None:
    """The entry, or None when it is missing, corrupted or of another format."""
    if not isinstance(raw, bytes):
        return None
    head, sep, body = raw.partition(b"\n")
    if not sep:
        return None
    try:
        meta = AggregateMeta.model_validate_json(head)
        if etag_for(body, meta.status) != meta.etag:
            return None
        Envelope.model_validate_json(body)
    except ValidationError:
        return None
    return AggregateEntry(meta, body)


def encode_marker(at: float) -> bytes:
    return b'{"purged_at": %r}' % at


def decode_marker(raw: object) -> float:
    """The purge time in a marker; 0 when absent or unreadable (nothing purged)."""
    if not isinstance(raw, bytes):
        return 0.0
    try:
        return float(_Marker.model_validate_json(raw).purged_at)
    except ValidationError:
        return 0.0


class _Marker(BaseModel):
    model_config = ConfigDict(extra="forbid")
    purged_at: float


def aggregate_ttls(agg: AggregateConfig, complete: bool) -> float:
    """Seconds a fresh answer is served from cache; 0 means do not store it."""
    if complete:
        return agg.cache_ttl
    return agg.cache_partial_ttl or 0.0
