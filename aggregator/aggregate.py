"""The product's core job for one aggregate and one parameter set: fan out, merge, encode, record.

`AggregateFill` is what the cache calls on a miss (its `Fill` interface), in a background
refresh and in a warm; it never touches Flask or the request, so it runs the same in all three.
It borrows the worker's shared upstream client (the engine's `clients`, opened by `running()`),
goes through the upstreams' guards and the source cache, and hands back the encoded answer
together with what the cache needs to know about it (status, completeness, which sources failed,
Server-Timing), so nobody downstream parses the body again. A `listener` (`aggregator.progress`)
is told about each source's result as it lands, for a progressive answer; the answer itself is
the same with or without one.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from aggregator.cache.results import Filled
from aggregator.cache.sources import SourceCache
from aggregator.config import AppConfig
from aggregator.fanout import Calls, fan_out
from aggregator.merge import merge, merge_view, server_timing
from aggregator.metrics import Recorder
from aggregator.models import Envelope
from aggregator.params import ParamValue
from aggregator.progress import Listener
from aggregator.resilience import Guards
from aggregator.settings import Settings
from aggregator.upstream import UpstreamClients
from aggregator.viewfill import AggregateView, run_view


class AggregateFill:
    """Fills of one worker's aggregates (the cache's `Fill`)."""

    def __init__(
        self,
        settings: Settings,
        config: AppConfig,
        *,
        clients: UpstreamClients,
        guards: Guards,
        metrics: Recorder,
        sources: SourceCache | None,
        views: Mapping[str, AggregateView] | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.clients = clients
        self.guards = guards
        self.metrics = metrics
        self.sources = sources
        #: Aggregates written as views (`aggregator.viewfill`), by name; the others are config's.
        self.views = dict(views or {})
        self._pool: ThreadPoolExecutor | None = None

    async def __call__(
        self, name: str, params: Mapping[str, ParamValue], *, listener: Listener | None = None
    ) -> Filled:
        """One fan-out of aggregate `name`, merged and encoded; never raises for a source."""
        view = self.views.get(name)
        if view is not None:
            return await self._fill_view(view, params, listener)
        aggregate = self.config.aggregates[name]
        async with self.clients.borrow() as client:
            results = await fan_out(
                client,
                self.config,
                aggregate,
                params,
                max_body=self.settings.max_upstream_body,
                source_cache=self.sources,
                guards=self.guards,
                listener=listener,
            )
        self.metrics.sources(results.values())
        envelope, status = merge(results, aggregate.required)
        return _filled(envelope, status, server_timing(results))

    async def _fill_view(
        self,
        view: AggregateView,
        params: Mapping[str, ParamValue],
        listener: Listener | None,
    ) -> Filled:
        """The view's body with its calls under its deadline; a `def` body runs on a pool."""
        aggregate = self.config.aggregates[view.name]
        if not view.is_async and self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.settings.threads, thread_name_prefix="aggregator-view-fill"
            )
        async with self.clients.borrow() as client:
            calls = Calls(
                client,
                self.config,
                deadline=aggregate.deadline,
                max_body=self.settings.max_upstream_body,
                source_cache=self.sources,
                guards=self.guards,
                listener=listener,
            )
            outcome = await run_view(view, params, calls, pool=self._pool)
        self.metrics.sources(outcome.results.values())
        envelope, status = merge_view(
            outcome.data, outcome.results, aggregate.required, cut=outcome.cut
        )
        return _filled(envelope, status, server_timing(outcome.results))

    def close(self) -> None:
        """Stop the `def` views' pool, if one was started (blocking: off the loop)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _filled(envelope: Envelope, status: int, timing: str) -> Filled:
    body = envelope.model_dump_json(exclude_none=True).encode()
    return Filled(status, body, envelope.complete, timing, failed=tuple(sorted(envelope.errors)))
