"""Purging: one entry, one aggregate, or an upstream and every aggregate built from it.

Shared by `aggregator cache purge` and `POST /admin/purge`, which check their targets alike.
"""

from __future__ import annotations

from collections.abc import Mapping

from aggregator.cache.entries import aggregate_key, aggregate_marker, encode_marker, source_marker
from aggregator.cache.service import AggregateCache
from aggregator.config import AppConfig
from aggregator.errors import UnknownTargetError
from aggregator.params import ParamValue

#: Markers outlive every entry they invalidate (the longest window we accept is 7 days).
_MARKER_TIMEOUT = 8 * 86_400


def check_target(config: AppConfig, aggregate: str | None, upstream: str | None) -> None:
    """Raise UnknownTargetError naming the field when a name is not configured."""
    for field, name, known in (
        ("aggregate", aggregate, config.aggregates),
        ("upstream", upstream, config.upstreams),
    ):
        if name is not None and name not in known:
            names = ", ".join(sorted(known)) or "none"
            raise UnknownTargetError(field, f"unknown {field} {name!r} (known: {names})")


async def purge(
    service: AggregateCache,
    *,
    aggregate: str | None = None,
    params: Mapping[str, ParamValue] | None = None,
    upstream: str | None = None,
) -> list[str]:
    """Invalidate one entry, one aggregate, or an upstream and every aggregate built from it.

    Whole aggregates and upstreams are purged with a marker holding the purge time (entries
    stored before it read as misses), which works the same on every backend without listing
    keys. An aggregate whose entries vary by headers (`cache_vary`, or a source that forwards
    client headers) keeps one entry per parameter set and header values, so purging one
    parameter set purges the whole aggregate. Returns what was purged, for the caller to report.
    """
    config = service.config
    now = service.clock()
    purged: list[str] = []
    service.forget_local()
    varies = bool(config.vary_by(aggregate)) if aggregate is not None else False
    if aggregate is not None and params is not None and not varies:
        key = aggregate_key(aggregate, params)
        await service.store.delete_many(key)
        purged.append(key)
    elif aggregate is not None:
        await service.store.set(aggregate_marker(aggregate), encode_marker(now), _MARKER_TIMEOUT)
        purged.append(f"aggregate {aggregate}")
    if upstream is not None:
        await service.store.set(source_marker(upstream), encode_marker(now), _MARKER_TIMEOUT)
        purged.append(f"upstream {upstream}")
        for name, agg in config.aggregates.items():
            if upstream in agg.sources:
                await service.store.set(aggregate_marker(name), encode_marker(now), _MARKER_TIMEOUT)
                purged.append(f"aggregate {name}")
    return purged
