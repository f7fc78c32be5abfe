"""Pure merging of source results into the envelope and its HTTP status (no I/O, no Flask)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aggregator.models import Envelope, SourceError, SourceInfo, SourceResult


def merge(results: Mapping[str, SourceResult], required: Sequence[str]) -> tuple[Envelope, int]:
    """Build the envelope; the status is 502/504 only when a required source failed."""
    data = {name: r.data for name, r in results.items() if r.ok}
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
        name: SourceInfo(status=r.status, ms=r.ms, cache=r.cache) for name, r in results.items()
    }
    envelope = Envelope(data=data, errors=errors, sources=sources, complete=not errors)
    return envelope, _status(results, required)


def _status(results: Mapping[str, SourceResult], required: Sequence[str]) -> int:
    failed = [results[name] for name in required if name in results and not results[name].ok]
    if not failed:
        return 200
    if any(r.status == "deadline" for r in failed):
        return 504
    return 502


def server_timing(results: Mapping[str, SourceResult]) -> str:
    """One Server-Timing entry per source, e.g. `weather;dur=101.2;desc="ok"`."""
    return ", ".join(f'{name};dur={r.ms};desc="{r.status}"' for name, r in results.items())
