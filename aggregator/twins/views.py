"""The sync twins: every aggregate again as plain `def` views, for the benchmark's comparison.

`/sync<path>` calls the sources one after another on a shared blocking `httpx.Client` (the
classic sync style); `/sync-pool<path>` calls them all at once from a thread pool on the same
client. Parameters, envelope, status codes and error kinds are those of the async view; the
twins are never cached (they measure the fan-out itself). In loop mode the adapter runs these
views in its bounded view pool, so their blocking calls never touch the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from flask import Blueprint, Flask, Response, request

from aggregator.config import AppConfig
from aggregator.engine import Engine
from aggregator.merge import merge, server_timing
from aggregator.params import parse_query
from aggregator.routes import SYNC_POOL_PREFIX, SYNC_PREFIX
from aggregator.settings import Settings
from aggregator.twins.fanout import fan_out_in_turn, fan_out_threads
from aggregator.twins.upstream_sync import SyncClient


class SyncTwins:
    """Per-process resources of the twins: the shared blocking client and the fan-out pool."""

    def __init__(self, settings: Settings, config: AppConfig) -> None:
        self.client = SyncClient(settings)
        # Sized so no call ever queues for a thread: each view thread (at most `threads` in
        # either serving mode) may have all its sources in flight. Threads start lazily. It is
        # not the adapter's view pool, which these views run in (no waiting on itself).
        widest = max((len(agg.sources) for agg in config.aggregates.values()), default=1)
        self.pool = ThreadPoolExecutor(
            settings.threads * widest, thread_name_prefix="aggregator-sync-fanout"
        )

    def close(self) -> None:
        """Wait for abandoned calls (each bounded by its own timeout), then close the client."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


_EXTENSION = "aggregator.twins"


def twins_of(app: Flask) -> SyncTwins:
    """The twins' resources of `app` (the benchmark's and tests' handle on them)."""
    twins = app.extensions.get(_EXTENSION)
    if not isinstance(twins, SyncTwins):
        raise RuntimeError(f"{app.name!r} has no sync twins")
    return twins


def register(app: Flask, engine: Engine) -> SyncTwins:
    """Build the twins' resources (closed by the engine's shutdown) and a blueprint with two
    routes per aggregate (built per app: its routes come from that app's config)."""
    twins = SyncTwins(engine.settings, engine.config)

    async def stop() -> None:
        # Blocking (joins threads, closes sockets): off the loop. The client is built on first use.
        await asyncio.get_running_loop().run_in_executor(None, twins.close)

    engine.on_lifespan(stop=stop)
    app.extensions[_EXTENSION] = twins
    bp = Blueprint("sync", __name__)
    for name, agg in engine.config.aggregates.items():
        bp.add_url_rule(
            SYNC_PREFIX + agg.path,
            endpoint=f"sequential_{name}",
            view_func=_make_view(engine, twins, name, pooled=False),
            methods=["GET"],
        )
        bp.add_url_rule(
            SYNC_POOL_PREFIX + agg.path,
            endpoint=f"pool_{name}",
            view_func=_make_view(engine, twins, name, pooled=True),
            methods=["GET"],
        )
    app.register_blueprint(bp)
    return twins


def _make_view(
    engine: Engine, twins: SyncTwins, name: str, *, pooled: bool
) -> Callable[[], Response]:
    config, settings, guards = engine.config, engine.settings, engine.guards

    def view() -> Response:
        started = time.perf_counter()
        aggregate = config.aggregates[name]
        params = aggregate.parse_params(parse_query(request.environ.get("QUERY_STRING", "")))
        client = twins.client.get()
        max_body = settings.max_upstream_body
        if pooled:
            results = fan_out_threads(
                client,
                config,
                aggregate,
                params,
                max_body=max_body,
                executor=twins.pool,
                guards=guards,
            )
        else:
            results = fan_out_in_turn(
                client, config, aggregate, params, max_body=max_body, guards=guards
            )
        engine.metrics.sources(results.values())
        envelope, status = merge(results, aggregate.required)
        # Shaped like the async view's (sources, cache, total); the twins never cache.
        total_ms = (time.perf_counter() - started) * 1000
        timing = f'{server_timing(results)}, cache;dur=0.00;desc="off", total;dur={total_ms:.2f}'
        headers = [
            ("Content-Type", "application/json"),
            ("X-Aggregate-Complete", "true" if envelope.complete else "false"),
            ("Server-Timing", timing),
            ("Cache-Control", "no-store"),
        ]
        body = envelope.model_dump_json(exclude_none=True)
        return Response(body, status=status, headers=headers)

    style = "a thread pool" if pooled else "one source after another"
    view.__name__ = f"{'pool' if pooled else 'sequential'}_{name}"
    view.__doc__ = f"Serve the {name!r} aggregate from a plain `def` view ({style}, uncached)."
    return view
