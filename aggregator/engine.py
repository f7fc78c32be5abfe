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

import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
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
from aggregator.resilience.shared import build_shared
from aggregator.settings import Settings
from aggregator.upstream import UpstreamClients
from aggregator.viewfill import AggregateView

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
        views: Mapping[str, AggregateView] | None = None,
    ) -> Engine:
        """Build every component (blocking: backend clients are made here, before any loop).

        `app`: the Flask app whose flask-caching extension the cache backend joins; without one
        (a CLI process that only needs the cache) the backend gets a bare app of its own.
        `views`: the aggregates of `config` written as views (`Aggregator.aggregate`).
        """
        settings = settings or Settings()
        config = config or load_config(settings.config)
        recorder = metrics.build_recorder(settings, config)
        clients = UpstreamClients(settings)
        shared = build_shared(settings, on_health=recorder.shared_state)
        guards = Guards(config.upstreams, circuit_listener=recorder.circuit_listener, shared=shared)
        store = CacheStore(build_cache(app or Flask(__name__), settings), settings)
        clock = time.time  # one clock for entries and purge markers: they compare times
        sources = SourceCache(store, config, clock=clock)
        fill = AggregateFill(
            settings,
            config,
            clients=clients,
            guards=guards,
            metrics=recorder,
            sources=sources,
            views=views,
        )
        cache = AggregateCache(store, config, settings, fill, clock=clock, metrics=recorder)
        engine = cls(settings, config, recorder, clients, guards, store, sources, fill, cache)
        if recorder is not metrics.OFF and metrics.multiprocess_dir() is not None:
            engine.on_lifespan(stop=metrics.forget_process)
        if shared is not None:
            engine.on_lifespan(shared.start, shared.stop)
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
        self.fill.close()
        self.store.close()


class LazyEngine:
    """An engine built on first use, once: views decorated after `init_app` are then known."""

    def __init__(self, build: Callable[[], Engine]) -> None:
        self._build = build
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._engine is not None

    def get(self) -> Engine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = self._build()
        return self._engine


def init_app(app: Flask, engine: Engine | LazyEngine) -> None:
    """Attach `engine` (or how to build it on first use) to `app` (one per app)."""
    app.extensions[_EXTENSION] = engine


def find_engine(app: Flask) -> Engine | None:
    """The engine attached to `app` (built now if it was lazy), or None for a plain Flask app."""
    found = app.extensions.get(_EXTENSION)
    if isinstance(found, LazyEngine):
        return found.get()
    return found if isinstance(found, Engine) else None


def engine_of(app: Flask) -> Engine:
    """The engine attached to `app` (by `create_app` or the `Aggregator` extension)."""
    engine = find_engine(app)
    if engine is None:
        raise RuntimeError(
            f"{app.name!r} has no aggregator engine: use Aggregator(app) or create_app()"
        )
    return engine


def current_engine() -> Engine:
    """The engine of the app handling the current request."""
    return engine_of(current_app)
