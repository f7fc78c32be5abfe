"""The product's core job for one aggregate and one parameter set: fan out, merge, encode, record.

`AggregateFill` is what the cache calls on a miss (its `Fill` interface), in a background
refresh and in a warm; it never touches Flask or the request, so it runs the same in all three.
It borrows the worker's shared upstream client (the engine's `clients`, opened by `running()`),
goes through the upstreams' guards and the source cache, and hands back the encoded answer
together with what the cache needs to know about it (status, completeness, which sources failed,
Server-Timing), so nobody downstream parses the body again.
"""

from __future__ import annotations

from collections.abc import Mapping

from aggregator.cache.results import Filled
from aggregator.cache.sources import SourceCache
from aggregator.config import AppConfig
from aggregator.fanout import fan_out
from aggregator.merge import merge, server_timing
from aggregator.metrics import Recorder
from aggregator.params import ParamValue
from aggregator.resilience import Guards
from aggregator.settings import Settings
from aggregator.upstream import UpstreamClients


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
    ) -> None:
        self.settings = settings
        self.config = config
        self.clients = clients
        self.guards = guards
        self.metrics = metrics
        self.sources = sources

    async def __call__(self, name: str, params: Mapping[str, ParamValue]) -> Filled:
        """One fan-out of aggregate `name`, merged and encoded; never raises for a source."""
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
            )
        self.metrics.sources(results.values())
        envelope, status = merge(results, aggregate.required)
        body = envelope.model_dump_json(exclude_none=True).encode()
        return Filled(
            status,
            body,
            envelope.complete,
            server_timing(results),
            failed=tuple(sorted(envelope.errors)),
        )
