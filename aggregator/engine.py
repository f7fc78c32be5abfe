"""The engine: every app-wide component of one worker process, built in one place, in order.

A Flask app, a direct `aggregator warm`, `aggregator cache purge` and the tests all need the same
parts wired the same way: the settings and config, the metrics recorder (built first: the others
record into it), the upstream clients, the upstreams' guards, the cache store, the source cache,
the fill and the aggregate cache. `Engine.build` makes them; `running()` opens and closes, on
the running loop, what they need while serving (the shared upstream client, the metrics' and
cache's hooks), which is what the ASGI lifespan does. An app holds its engine under one key,
read only by `engine_of`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from flask import Flask, current_app

from aggregator import metrics
from aggregator.aggregate import AggregateFill
from aggregator.cache.backends import build_cache
from aggregator.cache.service import AggregateCache
from aggregator.cache.sources import SourceCache
from aggregator.cache.store import CacheStore
from aggregator.config import AppConfig, load_config
from aggregator.resilience import Guards
from aggregator.settings import Settings
from aggregator.upstream import UpstreamClients

#: A lifespan hook: awaited once, on the server loop, at startup or at shutdown.
Hook = Callable[[], Awaitable[None]]

_EXTENSION = "aggregator"


async def _nothing() -> None:
    return None


@dataclass(eq=False)
class Engine:
    """One worker's components; build it with `Engine.build`."""

    settings: Settings
    config: AppConfig
    metrics: metrics.Recorder
    clients: UpstreamClients
    guards: Guards
    store: CacheStore
    sources: SourceCache
    fill: AggregateFill
    cache: AggregateCache
    _hooks: list[tuple[Hook, Hook]] = field(default_factory=list, repr=False)
    _started: list[Hook] = field(default_factory=list, repr=False)

    @classmethod
    def build(
        cls,
        settings: Settings | None = None,
        config: AppConfig | None = None,
        *,
        app: Flask | None = None,
    ) -> Engine:
        """Build every component (blocking: backend clients are made here, before any loop).

        `app`: the Flask app whose flask-caching extension the cache backend joins; without one
        (a CLI process that only needs the cache) the backend gets a bare app of its own.
        """
        settings = settings or Settings()
        config = config or load_config(settings.config)
        recorder = metrics.build_recorder(settings, config)
        clients = UpstreamClients(settings)
        guards = Guards(config.upstreams, circuit_listener=recorder.circuit_listener)
        store = CacheStore(build_cache(app or Flask(__name__), settings), settings)
        clock = time.time  # one clock for entries and purge markers: they compare times
        sources = SourceCache(store, config, clock=clock)
        fill = AggregateFill(
            settings, config, clients=clients, guards=guards, metrics=recorder, sources=sources
        )
        cache = AggregateCache(store, config, settings, fill, clock=clock, metrics=recorder)
        engine = cls(settings, config, recorder, clients, guards, store, sources, fill, cache)
        if recorder is not metrics.OFF and metrics.multiprocess_dir() is not None:
            engine.on_lifespan(stop=metrics.forget_process)
        engine.on_lifespan(cache.start, cache.stop)
        return engine

    def on_lifespan(self, start: Hook = _nothing, stop: Hook = _nothing) -> None:
        """Run `start` at startup (after those added before) and `stop` at shutdown (before)."""
        self._hooks.append((start, stop))

    async def start(self) -> None:
        """Open the shared upstream client on this loop, then run the start hooks in order.

        If a hook fails, what already started is stopped before the error propagates.
        """
        await self.clients.open()
        self._started = []
        try:
            for start, stop in self._hooks:
                await start()
                self._started.append(stop)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Run the stop hooks of what started, in reverse, then close the shared client."""
        started, self._started = self._started, []
        try:
            for stop in reversed(started):
                await stop()
        finally:
            await self.clients.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        """`start()`, then `stop()` however the block ends: a lifespan for any caller."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    def close(self) -> None:
        """Release the store's threads and connections (a CLI process, after its loop ended)."""
        self.store.close()


def init_app(app: Flask, engine: Engine) -> None:
    """Attach `engine` to `app` (one per app)."""
    app.extensions[_EXTENSION] = engine


def engine_of(app: Flask) -> Engine:
    """The engine attached to `app` (by `create_app`)."""
    engine = app.extensions.get(_EXTENSION)
    if not isinstance(engine, Engine):
        raise RuntimeError(f"{app.name!r} has no aggregator engine: build it with create_app()")
    return engine


def current_engine() -> Engine:
    """The engine of the app handling the current request."""
    return engine_of(current_app)
