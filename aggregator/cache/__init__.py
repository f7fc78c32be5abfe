"""The cache: flask-caching backends plus what they lack (DESIGN §5).

`init_app` builds the backend, the store around it, the per-process `AggregateCache` and the
`SourceCache` (per-upstream payloads, same store), hands the adapter its fast path (fresh hits
answered before Flask) and registers start/stop with the lifespan. Purging lives here too,
shared by the CLI and the admin endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Flask

from aggregator.cache.backends import build_cache
from aggregator.cache.entries import (
    aggregate_key,
    aggregate_marker,
    encode_marker,
    source_marker,
)
from aggregator.cache.privacy import Caller, caller_from_headers
from aggregator.cache.service import AggregateCache, Filled, FillFn, Lookup, parse_query
from aggregator.cache.sources import SourceCache
from aggregator.cache.store import CacheStore, CacheUnavailableError
from aggregator.config import AppConfig, ParamValue
from aggregator.metrics import OFF
from aggregator.settings import Settings

#: Markers outlive every entry they invalidate (the longest window we accept is 7 days).
_MARKER_TIMEOUT = 8 * 86_400


def init_app(app: Flask, settings: Settings, config: AppConfig, fill: FillFn) -> AggregateCache:
    """Attach the cache to `app`; the adapter runs `app.extensions["aggregator.lifespan"]`."""
    store = CacheStore(build_cache(app, settings), settings)
    service = AggregateCache(
        store, config, settings, fill, metrics=app.extensions.get("aggregator.metrics", OFF)
    )
    app.extensions["aggregator.cache"] = service
    # Same store and clock as the aggregates: purge markers and entries compare times.
    app.extensions["aggregator.source_cache"] = SourceCache(store, config, clock=service.clock)
    app.extensions["aggregator.fast_path"] = service.fast_answer
    app.extensions.setdefault("aggregator.lifespan", []).append((service.start, service.stop))
    return service


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


__all__ = [
    "AggregateCache",
    "Caller",
    "CacheUnavailableError",
    "FillFn",
    "Filled",
    "Lookup",
    "SourceCache",
    "caller_from_headers",
    "init_app",
    "parse_query",
    "purge",
]
