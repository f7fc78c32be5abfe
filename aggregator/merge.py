"""Pure merging of source results into the envelope and its HTTP status (no I/O, no Flask)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aggregator.models import Envelope, SourceError, SourceInfo, SourceResult


def merge(results: Mapping[str, SourceResult], required: Sequence[str]) -> tuple[Envelope, int]:
    """Build the envelope; the status is 502/504 when a required source failed, or every one did.

    A failed source served from its fallback has data, stays in `errors` (so the answer is not
    complete) and is flagged in `sources`; it does not fail the answer. When no source has data
    there is no partial answer to give: every source then counts as required (a 200 with
    nothing in it would hide an outage from dashboards and from stale-if-error).
    """
    data = {name: r.data for name, r in results.items() if r.ok or r.fallback}
    errors = {
        name: SourceError(
            kind=r.status,
            detail=r.detail or r.status,
            status=r.upstream_status,
            locations=r.locations or None,
        )
        for name, r in results.items()
        if not r.ok
    }
    sources = {
        name: SourceInfo(status=r.status, ms=r.ms, cache=r.cache, fallback=r.fallback or None)
        for name, r in results.items()
    }
    envelope = Envelope(data=data, errors=errors, sources=sources, complete=not errors)
    return envelope, _status(results, required)


def _status(results: Mapping[str, SourceResult], required: Sequence[str]) -> int:
    if not required and results and not any(r.ok or r.fallback for r in results.values()):
        required = list(results)  # (with required sources, they alone choose 502 or 504)
    failed = [
        r for name in required if (r := results.get(name)) is not None and not (r.ok or r.fallback)
    ]
    if not failed:
        return 200
    if any(r.status == "deadline" for r in failed):
        return 504
    return 502


def server_timing(results: Mapping[str, SourceResult]) -> str:
    """One Server-Timing entry per source, e.g. `weather;dur=101.2;desc="ok"`."""
    return ", ".join(f'{name};dur={r.ms};desc="{r.status}"' for name, r in results.items())
