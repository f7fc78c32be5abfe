"""The sync twins' fan-outs: the same sources on a blocking client, in turn or from threads.

A benchmark comparison (DESIGN §2, the classic blocking style): same results, deadline reporting
and fallbacks as `aggregator.fanout.fan_out`, so the only difference measured is the style.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping
from concurrent import futures
from concurrent.futures import Executor

import httpx

from aggregator.config import AggregateConfig, AppConfig
from aggregator.fanout import ms_since, past_deadline, with_fallbacks
from aggregator.models import SourceResult
from aggregator.params import ParamValue
from aggregator.resilience import Guards
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

    A call in progress is bounded by its own timeout only; sources not started before the
    aggregate deadline are reported as `deadline` without being called.
    """
    started = time.perf_counter()
    deadline = time.monotonic() + aggregate.deadline
    results: dict[str, SourceResult] = {}
    for name in aggregate.sources:
        if time.perf_counter() - started >= aggregate.deadline:
            results[name] = past_deadline(name, aggregate, ms_since(started))
        else:
            upstream = config.upstreams[name]
            guard = guards.get(name) if guards is not None else None
            results[name] = fetch_sync(
                client, name, upstream, params, max_body=max_body, guard=guard, deadline=deadline
            )
    return with_fallbacks(config, results)


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

    Threads cannot be cancelled: at the deadline, calls not yet started are dropped and calls in
    flight are abandoned (they end by their own timeout, holding their thread and connection
    until then) and reported as `deadline`. `executor` must never be the pool the calling view
    runs in, or a full pool would wait for itself.
    """
    started = time.perf_counter()
    deadline = time.monotonic() + aggregate.deadline
    # A pool thread does not inherit our contextvars (the request id, forwarded headers): each
    # call runs in its own copy (one context cannot be entered by two threads at once).
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
    results = {
        name: call.result() if call in done else past_deadline(name, aggregate, elapsed)
        for name, call in calls.items()
    }
    return with_fallbacks(config, results)
