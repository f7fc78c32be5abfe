"""The HTTP side of a cached answer, pure: ETag and 304, Cache-Control, Age, Vary, Server-Timing.

Every answer carries `Server-Timing`: the sources this request waited for (a miss), then
`cache` (ms spent on cache I/O: the lookup, and a fill's lock, re-check and store) and `total`
(ms from the lookup that began the request, before Flask when the adapter's fast path ran it,
to the answer's headers). A hit has no source entries: the sources did not run for it, and their
times when the entry was filled are in the body's `sources`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aggregator.cache.entries import AggregateEntry, etag_for
from aggregator.cache.privacy import Caller
from aggregator.cache.results import Filled, Lookup
from aggregator.models import StaleInfo


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match's weak comparison (RFC 9110 §13.1.2): W/ prefixes do not count."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return ours in (t.strip().removeprefix("W/") for t in if_none_match.split(","))


def stale_header(stale: StaleInfo) -> str:
    """`X-Cache-Stale`: `refreshing`, or `refresh-failed` with what the refresh answered."""
    if stale.reason == "refreshing":
        return "refreshing"
    return f"refresh-failed; {stale.detail}" if stale.detail else "refresh-failed"


def with_stale(body: bytes, stale: StaleInfo) -> bytes:
    """The stored envelope with its `stale` member, spliced in (the body is a JSON object)."""
    if not body.endswith(b"}"):
        return body
    return body[:-1] + b',"stale":' + stale.model_dump_json(exclude_none=True).encode() + b"}"


def entry_answer(
    entry: AggregateEntry,
    how: str,
    caller: Caller,
    lookup: Lookup,
    *,
    now: float,
    vary: str,
    filled: Filled | None = None,
    stale: StaleInfo | None = None,
) -> Answer:
    """Answer with a stored entry; `filled` is a fill this request waited for meanwhile;
    `stale` says why a STALE answer is stale (in the body and in `X-Cache-Stale`)."""
    meta = entry.meta
    age = meta.age(now)
    max_age = max(0, int(meta.ttl - age)) if how == "HIT" else 0
    private = "private, " if caller.credentials else ""
    headers = [
        ("ETag", meta.etag),
        ("X-Cache", how),
        ("Age", str(int(age))),
        ("Cache-Control", f"{private}max-age={max_age}"),
        ("X-Aggregate-Complete", "true" if meta.complete else "false"),
        ("Server-Timing", server_timing(how.lower(), lookup, filled)),
    ]
    if vary:
        headers.append(("Vary", vary))
    body = entry.body
    if stale is not None:
        headers.append(("X-Cache-Stale", stale_header(stale)))
        body = with_stale(body, stale)
    if meta.status == 200 and etag_matches(caller.if_none_match, meta.etag):
        return Answer(304, headers, b"")
    return Answer(meta.status, [("Content-Type", "application/json"), *headers], body)


def filled_answer(
    filled: Filled,
    how: str | None,
    ttl: float,
    caller: Caller,
    lookup: Lookup,
    *,
    vary: str,
    bypass: str = "",
) -> Answer:
    """Answer with a fresh fan-out; `bypass` says why the cache was skipped, if it was."""
    timing = server_timing("off" if how is None else how.lower(), lookup, filled)
    private = "private, " if caller.credentials else ""
    headers = [
        ("X-Aggregate-Complete", "true" if filled.complete else "false"),
        ("Server-Timing", timing),
        ("Cache-Control", private + (f"max-age={int(ttl)}" if ttl > 0 else "no-store")),
    ]
    if how is not None:
        headers += [("X-Cache", how), ("Age", "0")]
    if bypass:
        headers.append(("X-Cache-Bypass", bypass))
    if vary:
        headers.append(("Vary", vary))
    if filled.status == 200:
        etag = etag_for(filled.body, filled.status)
        headers.append(("ETag", etag))
        if etag_matches(caller.if_none_match, etag):
            return Answer(304, headers, b"")
    return Answer(filled.status, [("Content-Type", "application/json"), *headers], filled.body)


def server_timing(cache_state: str, lookup: Lookup, filled: Filled | None) -> str:
    """Sources this request waited for, then `cache` and `total`, e.g. for a hit:
    `cache;dur=0.04;desc="hit", total;dur=0.09`."""
    cache_ms = lookup.ms + (filled.cache_ms if filled is not None else 0.0)
    total_ms = (time.perf_counter() - lookup.started) * 1000
    own = f'cache;dur={cache_ms:.2f};desc="{cache_state}", total;dur={total_ms:.2f}'
    return f"{filled.timing}, {own}" if filled is not None and filled.timing else own
