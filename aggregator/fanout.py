"""Concurrency for one aggregated request: every source at once, under one deadline.

Each source runs as its own task and returns a SourceResult instead of raising, so one slow or
broken upstream never cancels its siblings. When the aggregate deadline passes, whatever is still
outstanding is cancelled and awaited (so its connection is released before we answer) and reported
as a `deadline` error; everything that did arrive is kept.

A source whose URL names a field of another source's answer (`{profile.city}`, see
`aggregator.graph`) starts as soon as the sources it needs have ended, and not before: the
aggregate runs as a graph, each source as early as its needs allow, under the same one deadline.
When what it needs cannot be had it is not called and fails as `dependency`; a source still
waiting when the deadline passes is a `deadline` error that never started.

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
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import httpx

from aggregator import graph
from aggregator.config import AggregateConfig, AppConfig
from aggregator.models import SourceResult
from aggregator.params import ParamValue
from aggregator.progress import Listener
from aggregator.resilience import Guards, with_fallback
from aggregator.upstream import fetch

T = TypeVar("T")


class SourceCacheProtocol(Protocol):
    """What fan_out needs of a source cache (`aggregator.cache.SourceCache` is one)."""

    async def lookup_sources(
        self, sources: Iterable[str], values: Mapping[str, ParamValue]
    ) -> Mapping[str, SourceResult | None]:
        """Each source it applies to: a cached result, or None for a miss; others absent."""
        ...

    async def store(
        self, values: Mapping[str, ParamValue], results: Mapping[str, SourceResult]
    ) -> None:
        """Keep what it may of freshly fetched results; never raises for cache trouble."""
        ...


class Calls:
    """One request's upstream calls under one deadline: a configured aggregate or a view.

    Every call goes through its upstream's guard and the source cache and gets its fallback,
    and its result is kept in `results` (under `key`, the source's name by default) with the
    moment it started, so the envelope and Server-Timing can show the waterfall. A call never
    raises for its source; once the deadline has passed, a call still out is cancelled (its
    connection released) and reported as `deadline`. `listener`, if given, is told about each
    result the moment it is recorded (`aggregator.progress`: a progressive answer).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        config: AppConfig,
        *,
        deadline: float,
        max_body: int,
        source_cache: SourceCacheProtocol | None = None,
        guards: Guards | None = None,
        listener: Listener | None = None,
    ) -> None:
        self.client = client
        self.config = config
        #: Seconds the whole request may take (the aggregate's or the view's deadline).
        self.deadline = deadline
        self.max_body = max_body
        self.source_cache = source_cache
        self.guards = guards
        self.listener = listener
        self.results: dict[str, SourceResult] = {}
        self._started = time.perf_counter()
        self._ends = time.monotonic() + deadline  # the guards' clock, and asyncio's
        #: Looked up ahead for `values` (`look_up`): source -> cached result or None (a miss).
        self._looked_up: Mapping[str, SourceResult | None] = {}
        self._looked_up_values: Mapping[str, ParamValue] | None = None
        self._out: dict[str, str] = {}  # key -> source of the calls still out

    def remaining(self) -> float:
        """Seconds left before the deadline (0 once it has passed)."""
        return max(0.0, self._ends - time.monotonic())

    def elapsed_ms(self) -> float:
        return ms_since(self._started)

    async def look_up(self, sources: Iterable[str], values: Mapping[str, ParamValue]) -> None:
        """Read the source cache for several upstreams called with the same `values` at once
        (one round trip), ahead of their calls; later calls with those values use what it found."""
        if self.source_cache is None:
            return
        self._looked_up = await self.source_cache.lookup_sources(sources, values)
        self._looked_up_values = values

    async def call(
        self, name: str, values: Mapping[str, ParamValue], *, key: str | None = None
    ) -> SourceResult:
        """Upstream `name` with its URL placeholders filled from `values`; never raises."""
        key = key or name
        started = self.elapsed_ms()
        self._out[key] = name
        result = await self._call(name, values, started)
        del self._out[key]  # (still out if this call was cancelled: see `outstanding`)
        result.started = started
        return self.record(result, key=key)

    def record(self, result: SourceResult, *, key: str | None = None) -> SourceResult:
        """Keep a result reached without `call` (a source that could not be called), with its
        upstream's fallback applied as a call's would be."""
        result = with_fallback(result, self.config.upstreams[result.name])
        key = key or result.name
        self.results[key] = result
        if self.listener is not None:
            self.listener(key, result)
        return result

    def outstanding(self) -> dict[str, str]:
        """Calls begun and not ended (key -> source): cancelled ones, once the caller is done."""
        return dict(self._out)

    async def _call(
        self, name: str, values: Mapping[str, ParamValue], started: float
    ) -> SourceResult:
        consulted = False
        if self.source_cache is not None:
            if values is self._looked_up_values and name in self._looked_up:
                consulted, hit = True, self._looked_up[name]
            else:
                found = await self.source_cache.lookup_sources((name,), values)
                consulted, hit = name in found, found.get(name)
            if hit is not None:
                return hit
        call = fetch(
            self.client,
            name,
            self.config.upstreams[name],
            values,
            max_body=self.max_body,
            guard=self.guards.get(name) if self.guards is not None else None,
            deadline=self._ends,
        )
        try:
            async with asyncio.timeout(self.remaining()):
                result = await cancelled_once(call)
        except TimeoutError:
            return past_deadline(name, self.deadline, self.elapsed_ms())
        if result.ok and self.source_cache is not None:
            if consulted:
                result = dataclasses.replace(result, cache="miss")
            # Every fresh success, looked up or not: the store keeps what its TTL allows, and a
            # first cacheable answer is how the source cache learns to look an upstream up.
            await self.source_cache.store(values, {name: result})
        return result


async def cancelled_once(coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` in a task of its own that is cancelled at most once, however often we are.

    A second cancellation that lands while the HTTP stack is closing a connection after the
    first one interrupts that clean-up (httpcore's shield does not hold against a plain
    `Task.cancel()`), and the connection then stays "in use" in the pool forever. Deadlines,
    `gather` and a client leaving can each cancel a call, so they may well come twice; here
    the call's own task sees one, and we wait for its clean-up for as long as we are let.
    """
    task = asyncio.create_task(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        # Interrupted by a further cancel, we leave; the task goes on alone, held here (the
        # loop keeps only a weak reference to a task: unheld, it could vanish mid-clean-up).
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        await asyncio.wait((task,))
        raise


#: Calls whose caller stopped waiting for their clean-up (see `cancelled_once`).
_closing: set[asyncio.Task[Any]] = set()


async def fan_out(
    client: httpx.AsyncClient,
    config: AppConfig,
    aggregate: AggregateConfig,
    params: Mapping[str, ParamValue],
    *,
    max_body: int,
    source_cache: SourceCacheProtocol | None = None,
    guards: Guards | None = None,
    listener: Listener | None = None,
) -> dict[str, SourceResult]:
    """Call every source of `aggregate` concurrently; results keyed by source, in config order
    (`listener` is told about each as it lands: see `Calls`)."""
    calls = Calls(
        client,
        config,
        deadline=aggregate.deadline,
        max_body=max_body,
        source_cache=source_cache,
        guards=guards,
        listener=listener,
    )
    ups = config.upstreams
    # The sources that need no other's answer are looked up in the source cache at once (one
    # round trip) and all start now; the others wait for what they need (`_when_ready`).
    first = [name for name in aggregate.sources if not ups[name].template.fields]
    await calls.look_up(first, params)
    tasks = [
        asyncio.create_task(calls.call(name, params), name=f"upstream:{name}") for name in first
    ]
    if len(first) < len(aggregate.sources):
        by_name = dict(zip(first, tasks, strict=True))
        for wave in graph.waves(config, aggregate.sources)[1:]:
            for name in wave:
                needs = [by_name[source] for source in ups[name].template.sources]
                task = asyncio.create_task(
                    _when_ready(calls, name, needs, params), name=f"upstream:{name}"
                )
                by_name[name] = task
                tasks.append(task)
    try:
        await asyncio.gather(*tasks)
    finally:
        # Also reached when our own request is cancelled (client gone): never leave calls behind.
        outstanding = [t for t in tasks if not t.done()]
        for task in outstanding:
            if not task.cancelling():  # (`gather` cancelled them already when we were)
                task.cancel()
        if outstanding:
            await asyncio.gather(*outstanding, return_exceptions=True)
    return {name: calls.results[name] for name in aggregate.sources}


async def _when_ready(
    calls: Calls,
    name: str,
    needs: list[asyncio.Task[SourceResult]],
    params: Mapping[str, ParamValue],
) -> SourceResult:
    """Source `name` once every source it needs has ended: called with their fields, or failed
    as `dependency` (never called) when they cannot be had, or `deadline` when none is left."""
    # asyncio.wait, not gather: cancelling this task must not cancel the sources it waits for
    # (other sources may need them too; fan_out cancels whatever is left itself).
    await asyncio.wait(needs)
    if calls.remaining() <= 0:
        return calls.record(past_deadline(name, calls.deadline, calls.elapsed_ms()))
    values = graph.field_values(calls.config.upstreams[name], calls.results)
    if isinstance(values, str):
        return calls.record(graph.dependency_failed(name, values, started=calls.elapsed_ms()))
    return await calls.call(name, {**params, **values})


def with_fallbacks(config: AppConfig, results: dict[str, SourceResult]) -> dict[str, SourceResult]:
    return {name: with_fallback(r, config.upstreams[name]) for name, r in results.items()}


def past_deadline(name: str, deadline: float, ms: float) -> SourceResult:
    """A source still out when a deadline of `deadline` seconds passed."""
    return SourceResult(
        name=name,
        status="deadline",
        ms=ms,
        detail=f"no answer within the aggregate deadline of {deadline:g} s",
    )


def ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
