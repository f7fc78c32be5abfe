"""Concurrency for one aggregated request: every source at once, under one deadline.

Each source runs as its own task and returns a SourceResult instead of raising, so one slow or
broken upstream never cancels its siblings. When the aggregate deadline passes, whatever is still
outstanding is cancelled and awaited (so its connection is released before we answer) and reported
as a `deadline` error; everything that did arrive is kept.

With a source cache, sources it holds are answered from it (`cache="hit"`) and not called; the
others are called as usual (`cache="miss"` when they succeed) and handed back to it afterwards.
Its one lookup counts against the deadline. fanout knows the cache only through the small
`SourceCacheProtocol` below, so it does not depend on the cache package.

With `guards` (one `aggregator.resilience.Guards` per worker), each call goes through its
upstream's retries, breaker and bulkhead, and no retry starts that could not end before the
deadline. A failed source whose upstream has `fallback` data is answered with it (flagged, its
error kind kept), whatever the failure, the deadline included.

The sync twins' blocking fan-outs (`aggregator.twins`) report deadlines and fallbacks with the
helpers at the end of this module, so both styles answer alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from typing import Protocol

import httpx

from aggregator.config import AggregateConfig, AppConfig
from aggregator.models import SourceResult
from aggregator.params import ParamValue
from aggregator.resilience import Guards, with_fallback
from aggregator.upstream import fetch


class SourceCacheProtocol(Protocol):
    """What fan_out needs of a source cache (`aggregator.cache.SourceCache` is one)."""

    async def lookup(
        self, aggregate: AggregateConfig, params: Mapping[str, ParamValue]
    ) -> Mapping[str, SourceResult | None]:
        """Each source it applies to: a cached result, or None for a miss; others absent."""
        ...

    async def store(
        self, params: Mapping[str, ParamValue], results: Mapping[str, SourceResult]
    ) -> None:
        """Keep what it may of freshly fetched results; never raises for cache trouble."""
        ...


async def fan_out(
    client: httpx.AsyncClient,
    config: AppConfig,
    aggregate: AggregateConfig,
    params: Mapping[str, ParamValue],
    *,
    max_body: int,
    source_cache: SourceCacheProtocol | None = None,
    guards: Guards | None = None,
) -> dict[str, SourceResult]:
    """Call every source of `aggregate` concurrently; results keyed by source, in config order."""
    started = time.perf_counter()
    deadline = time.monotonic() + aggregate.deadline  # the guards' clock
    looked_up: Mapping[str, SourceResult | None] = {}
    if source_cache is not None:
        looked_up = await source_cache.lookup(aggregate, params)
    hits = {name: r for name, r in looked_up.items() if r is not None}
    tasks = {
        name: asyncio.create_task(
            fetch(
                client,
                name,
                config.upstreams[name],
                params,
                max_body=max_body,
                guard=guards.get(name) if guards is not None else None,
                deadline=deadline,
            ),
            name=f"upstream:{name}",
        )
        for name in aggregate.sources
        if name not in hits
    }
    pending: set[asyncio.Task[SourceResult]] = set()
    try:
        if tasks:  # asyncio.wait refuses an empty set (every source was a hit)
            budget = max(0.0, aggregate.deadline - (time.perf_counter() - started))
            _, pending = await asyncio.wait(tasks.values(), timeout=budget)
    finally:
        # Also reached when our own request is cancelled (client gone): never leave calls behind.
        outstanding = [t for t in tasks.values() if not t.done()]
        for task in outstanding:
            task.cancel()
        if outstanding:
            await asyncio.gather(*outstanding, return_exceptions=True)
    elapsed = ms_since(started)
    results: dict[str, SourceResult] = {}
    for name in aggregate.sources:
        call = tasks.get(name)
        if call is None:
            results[name] = hits[name]
        elif call in pending or call.cancelled():
            results[name] = past_deadline(name, aggregate, elapsed)
        elif name in looked_up and call.result().ok:
            results[name] = dataclasses.replace(call.result(), cache="miss")
        else:
            results[name] = call.result()
    # Every fresh success, looked up or not: the store keeps what its TTL allows, and a first
    # cacheable answer is how the source cache learns to look an upstream up.
    fetched = {name: r for name, r in results.items() if name in tasks and r.ok}
    if source_cache is not None and fetched:
        await source_cache.store(params, fetched)
    return with_fallbacks(config, results)


def with_fallbacks(config: AppConfig, results: dict[str, SourceResult]) -> dict[str, SourceResult]:
    return {name: with_fallback(r, config.upstreams[name]) for name, r in results.items()}


def past_deadline(name: str, aggregate: AggregateConfig, ms: float) -> SourceResult:
    return SourceResult(
        name=name,
        status="deadline",
        ms=ms,
        detail=f"no answer within the aggregate deadline of {aggregate.deadline:g} s",
    )


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
