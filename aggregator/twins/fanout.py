"""The sync twins' fan-outs: the same sources on a blocking client, in turn or from threads.

A benchmark comparison (the classic blocking style): same results, deadline reporting,
fallbacks and dependent sources (`aggregator.graph`) as `aggregator.fanout.fan_out`, so the only
difference measured is the style.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping
from concurrent import futures
from concurrent.futures import Executor

import httpx

from aggregator import graph
from aggregator.config import AggregateConfig, AppConfig
from aggregator.fanout import ms_since, past_deadline, with_fallbacks
from aggregator.models import SourceResult
from aggregator.params import ParamValue
from aggregator.resilience import Guards, with_fallback
from aggregator.twins.upstream_sync import fetch_sync


def fan_out_in_turn(
    client: httpx.Client,
    config: AppConfig,
    aggregate: AggregateConfig,
    params: Mapping[str, ParamValue],
    *,
    max_body: int,
    guards: Guards | None = None,
) -> dict[str, SourceResult]:
    """Call the sources one after another (the classic sync style); no source cache.

    A source that needs another's answer comes after it (a topological order, config order
    otherwise). A call in progress is bounded by its own timeout only; sources not started
    before the aggregate deadline are reported as `deadline` without being called.
    """
    started = time.perf_counter()
    deadline = time.monotonic() + aggregate.deadline
    ups = config.upstreams
    order = aggregate.sources
    if graph.is_graph(config, aggregate):
        order = [name for wave in graph.waves(config, aggregate.sources) for name in wave]
    results: dict[str, SourceResult] = {}
    for name in order:
        if time.perf_counter() - started >= aggregate.deadline:
            results[name] = past_deadline(name, aggregate.deadline, ms_since(started))
            continue
        upstream = ups[name]
        offset = ms_since(started)
        values = graph.field_values(upstream, results) if upstream.template.fields else {}
        if isinstance(values, str):
            result = graph.dependency_failed(name, values, started=offset)
        else:
            guard = guards.get(name) if guards is not None else None
            result = fetch_sync(
                client,
                name,
                upstream,
                {**params, **values} if values else params,
                max_body=max_body,
                guard=guard,
                deadline=deadline,
            )
            result.started = offset
        # At once, not at the end: a source that needs this one reads its fallback data.
        results[name] = with_fallback(result, upstream)
    return results if order is aggregate.sources else {n: results[n] for n in aggregate.sources}


def fan_out_threads(
    client: httpx.Client,
    config: AppConfig,
    aggregate: AggregateConfig,
    params: Mapping[str, ParamValue],
    *,
    max_body: int,
    executor: Executor,
    guards: Guards | None = None,
) -> dict[str, SourceResult]:
    """Call every source at once on `executor` threads, under the aggregate deadline.

    A source that needs another's answer is submitted as soon as what it needs has arrived
    (`_threads_graph`). Threads cannot be cancelled: at the deadline, calls not yet started are
    dropped and calls in flight are abandoned (they end by their own timeout, holding their
    thread and connection until then) and reported as `deadline`. `executor` must never be the
    pool the calling view runs in, or a full pool would wait for itself.
    """
    if graph.is_graph(config, aggregate):
        return _threads_graph(
            client, config, aggregate, params, max_body=max_body, executor=executor, guards=guards
        )
    started = time.perf_counter()
    deadline = time.monotonic() + aggregate.deadline
    # A pool thread does not inherit our contextvars (the request id, forwarded headers): each
    # call runs in its own copy (one context cannot be entered by two threads at once).
    offset = ms_since(started)
    calls = {
        name: executor.submit(
            contextvars.copy_context().run,
            fetch_sync,
            client,
            name,
            config.upstreams[name],
            params,
            max_body=max_body,
            guard=guards.get(name) if guards is not None else None,
            deadline=deadline,
        )
        for name in aggregate.sources
    }
    done, pending = futures.wait(calls.values(), timeout=aggregate.deadline)
    for call in pending:
        call.cancel()
    elapsed = ms_since(started)
    results = {}
    for name, call in calls.items():
        result = call.result() if call in done else past_deadline(name, aggregate.deadline, elapsed)
        result.started = offset
        results[name] = result
    return with_fallbacks(config, results)


def _threads_graph(
    client: httpx.Client,
    config: AppConfig,
    aggregate: AggregateConfig,
    params: Mapping[str, ParamValue],
    *,
    max_body: int,
    executor: Executor,
    guards: Guards | None,
) -> dict[str, SourceResult]:
    """`fan_out_threads` for an aggregate whose sources need others': each source is submitted
    once every source it needs has ended (or fails as `dependency` without being called)."""
    started = time.perf_counter()
    deadline = time.monotonic() + aggregate.deadline
    ups = config.upstreams
    results: dict[str, SourceResult] = {}
    running: dict[futures.Future[SourceResult], tuple[str, float]] = {}
    # Topological order: one pass starts everything that can start, including what a source
    # failed as `dependency` in this same pass unblocks (it fails too, further down the list).
    waiting = [name for wave in graph.waves(config, aggregate.sources) for name in wave]
    while True:
        for name in list(waiting):
            upstream = ups[name]
            if not upstream.template.sources <= results.keys():
                continue
            waiting.remove(name)
            offset = ms_since(started)
            values = graph.field_values(upstream, results)
            if isinstance(values, str):
                failed = graph.dependency_failed(name, values, started=offset)
                results[name] = with_fallback(failed, upstream)
                continue
            call = executor.submit(
                contextvars.copy_context().run,
                fetch_sync,
                client,
                name,
                upstream,
                {**params, **values},
                max_body=max_body,
                guard=guards.get(name) if guards is not None else None,
                deadline=deadline,
            )
            running[call] = (name, offset)
        left = deadline - time.monotonic()
        if not running or left <= 0:
            break
        done, _ = futures.wait(running, timeout=left, return_when=futures.FIRST_COMPLETED)
        if not done:
            break
        for call in done:
            name, offset = running.pop(call)
            result = call.result()
            result.started = offset
            results[name] = with_fallback(result, ups[name])
    elapsed = ms_since(started)
    for call, (name, offset) in running.items():
        call.cancel()  # abandoned if it already runs; it ends by its own timeout
        cut = past_deadline(name, aggregate.deadline, elapsed)
        cut.started = offset
        results[name] = with_fallback(cut, ups[name])
    for name in waiting:  # never started: what it needed did not arrive in time
        results[name] = with_fallback(past_deadline(name, aggregate.deadline, elapsed), ups[name])
    return {name: results[name] for name in aggregate.sources}
