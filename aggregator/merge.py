"""Pure merging of source results into the envelope and its HTTP status (no I/O, no Flask)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from aggregator.models import Envelope, JSONDict, SourceError, SourceInfo, SourceResult


def merge(results: Mapping[str, SourceResult], required: Sequence[str]) -> tuple[Envelope, int]:
    """Build the envelope; the status is 502/504 when a required source failed, or every one did.

    A failed source served from its fallback has data, stays in `errors` (so the answer is not
    complete) and is flagged in `sources`; it does not fail the answer. When no source has data
    there is no partial answer to give: every source then counts as required (a 200 with
    nothing in it would hide an outage from dashboards and from stale-if-error).
    """
    data = {name: r.data for name, r in results.items() if r.ok or r.fallback}
    errors = {name: source_error(r) for name, r in results.items() if not r.ok}
    sources = {name: source_info(r) for name, r in results.items()}
    envelope = Envelope(data=data, errors=errors, sources=sources, complete=not errors)
    return envelope, _status(results, required)


def source_error(r: SourceResult) -> SourceError:
    """A failed source as the envelope's `errors` (and a progressive answer's event) say it."""
    return SourceError(
        kind=r.status,
        detail=r.detail or r.status,
        status=r.upstream_status,
        locations=r.locations or None,
    )


def source_info(r: SourceResult) -> SourceInfo:
    """A source's entry in the envelope's `sources`: status, ms, start, cache, fallback, hedge."""
    sent = r.hedge is not None and r.hedge != "refused"
    return SourceInfo(
        status=r.status,
        ms=r.ms,
        started=r.started,
        cache=r.cache,
        fallback=r.fallback or None,
        hedged=True if sent else None,
        hedge_winner=_HEDGE_WINNERS.get(r.hedge) if sent else None,
    )


_HEDGE_WINNERS: dict[str | None, Literal["first", "hedge"]] = {
    "first_won": "first",
    "hedge_won": "hedge",
}


def merge_view(
    data: JSONDict,
    results: Mapping[str, SourceResult],
    required: Sequence[str],
    *,
    cut: str | None = None,
) -> tuple[Envelope, int]:
    """`merge` for a hand-written view: `data` is what its body returned.

    `cut` says the body ended early: "required" (a required source failed: 502/504 as
    `merge` decides) or "deadline" (504). A cut answer is never complete.
    """
    envelope, status = merge(results, required)
    envelope = envelope.model_copy(update={"data": data, "complete": envelope.complete and not cut})
    if cut == "deadline":
        status = 504
    return envelope, status


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
    """One Server-Timing entry per source, e.g. `weather;dur=101.2;desc="ok";start=48.1`.

    `start` (ms since the fan-out began; absent for a source that never started) is an extra
    parameter, a token as the Server-Timing grammar allows, so the waterfall survives in the
    header: tools that do not know it ignore it.
    """
    return ", ".join(
        f'{name};dur={r.ms};desc="{r.status}"'
        + ("" if r.started is None else f";start={r.started}")
        for name, r in results.items()
    )
