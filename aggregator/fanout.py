"""Concurrency for one aggregated request: every source at once, under one deadline.

Each source runs as its own task and returns a SourceResult instead of raising, so one slow or
broken upstream never cancels its siblings. When the aggregate deadline passes, whatever is still
outstanding is cancelled and awaited (so its connection is released before we answer) and reported
as a `deadline` error; everything that did arrive is kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import httpx

from aggregator.config import AggregateConfig, AppConfig, ParamValue
from aggregator.models import SourceResult
from aggregator.upstream import fetch


async def fan_out(
    client: httpx.AsyncClient,
    config: AppConfig,
    aggregate: AggregateConfig,
    params: Mapping[str, ParamValue],
    *,
    max_body: int,
) -> dict[str, SourceResult]:
    """Call every source of `aggregate` concurrently; results keyed by source, in config order."""
    started = time.perf_counter()
    tasks = {
        name: asyncio.create_task(
            fetch(client, name, config.upstreams[name], params, max_body=max_body),
            name=f"upstream:{name}",
        )
        for name in aggregate.sources
    }
    try:
        _, pending = await asyncio.wait(tasks.values(), timeout=aggregate.deadline)
    finally:
        # Also reached when our own request is cancelled (client gone): never leave calls behind.
        outstanding = [t for t in tasks.values() if not t.done()]
        for task in outstanding:
            task.cancel()
        if outstanding:
            await asyncio.gather(*outstanding, return_exceptions=True)
    elapsed = round((time.perf_counter() - started) * 1000, 1)
    results: dict[str, SourceResult] = {}
    for name, task in tasks.items():
        if task in pending or task.cancelled():
            results[name] = SourceResult(
                name=name,
                status="deadline",
                ms=elapsed,
                detail=f"no answer within the aggregate deadline of {aggregate.deadline:g} s",
            )
        else:
            results[name] = task.result()
    return results
