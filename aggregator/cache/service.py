"""Answering an aggregate through the cache: hit, stale, single-flight fill, stale-if-error, 304.

A fill (one fan-out for one key) is a task owned by `AggregateCache`, not by the request that
started it: every concurrent request for the key awaits the same task (bounded by
`singleflight_wait`, then it fills on its own), a requester that disconnects does not cancel a
fill others are waiting for, and the lifespan cancels leftovers at shutdown. Stale-while-
revalidate refreshes use the same tasks, so a key is never refreshed twice at once. With Redis,
a short `SET NX` lock per key makes other processes wait for the holder's entry instead of
fanning out themselves.

A fill runs in the context of the request that started it (see `aggregator.context`): its
upstream calls send that request's `X-Request-ID`, also on behalf of the requests that joined it,
and a joining request logs which fill it waits for (at DEBUG).

A request may also listen to its fill (`answer(..., listener=...)`: a progressive answer): each
fill publishes its sources' results as they land (`aggregator.progress.Progress`), and every
request coalesced behind it hears them live, a late one first what already landed. What it
listens to never changes its answer, which is the same `Answer` as without a listener.

This module owns one thing, the life of a key (lookup, single-flight fill, store, refresh,
warm), and is long because those steps share the in-flight table and the Redis lock. Around it:
the answer's HTTP headers are `headers`' (pure), the worker's memory copy is `near`'s, and what
lookups and fills return is `results`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from aggregator.cache.entries import (
    AggregateEntry,
    AggregateMeta,
    aggregate_key,
    aggregate_marker,
    aggregate_ttls,
    decode_aggregate,
    decode_marker,
    encode_aggregate,
    etag_for,
    lock_key,
)
from aggregator.cache.headers import Answer, entry_answer, filled_answer
from aggregator.cache.near import NearCache
from aggregator.cache.privacy import ANONYMOUS, Caller, caller_from_asgi
from aggregator.cache.results import Fill, Filled, Lookup, WarmResult
from aggregator.cache.store import CacheStore
from aggregator.config import AppConfig
from aggregator.context import request_id
from aggregator.errors import CacheUnavailableError
from aggregator.metrics import OFF, Recorder
from aggregator.models import StaleInfo
from aggregator.params import ParamValue
from aggregator.progress import Listener, Progress
from aggregator.settings import Settings

logger = logging.getLogger(__name__)

State = Literal["fresh", "stale", "stale_if_error", "expired", "miss", "bypass", "off"]
_POLL = 0.02  # seconds between looks for another process's fill


class AggregateCache:
    """The aggregate cache of one worker process."""

    def __init__(
        self,
        store: CacheStore,
        config: AppConfig,
        settings: Settings,
        fill: Fill,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Recorder = OFF,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.config = config
        self.settings = settings
        self._fill_fn = fill
        self.clock = clock
        self._routes = {agg.path: name for name, agg in config.aggregates.items()}
        #: Per aggregate, the headers its entries vary by (`cache_vary`, then those its sources
        #: forward: `AppConfig.vary_by`), as the fast path meets them.
        self._vary = {
            name: tuple(h.encode() for h in config.vary_by(name)) for name in config.aggregates
        }
        #: Per aggregate, whether it declares `cache_vary`: only that lets requests with
        #: credentials share entries (forwarded headers only add to the key).
        self._declared = {name: bool(a.cache_vary) for name, a in config.aggregates.items()}
        self._vary_header = {name: ", ".join(config.vary_by(name)) for name in config.aggregates}
        self._inflight: dict[str, asyncio.Task[Filled]] = {}
        self._progress: dict[str, Progress] = {}  # key -> what its in-flight fill published
        self._near = NearCache(settings.cache_local_ttl, clock)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifespan ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Background refreshes run on the loop that started us (the server's)."""
        self._loop = asyncio.get_running_loop()

    def live(self) -> bool:
        """Whether we run on the loop that started us (a server's): only there may a fill, or
        a request's wait for it, outlive the handler that began it."""
        return self._loop is asyncio.get_running_loop()

    async def stop(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None
        self.store.close()

    # -- lookups ----------------------------------------------------------------------------

    def caches(self, name: str) -> bool:
        """Whether `name`'s answers are cached at all (never with the null backend: its near
        copy would otherwise keep serving them, for `cache_local_ttl`, from memory)."""
        agg = self.config.aggregates[name]
        if self.store.stores_nothing:
            return False
        return agg.cache_ttl > 0 or agg.cache_partial_ttl is not None

    async def lookup(
        self,
        name: str,
        params: Mapping[str, ParamValue],
        *,
        started: float | None = None,
        vary: str = "",
        caller: Caller | None = None,
    ) -> Lookup:
        """What the cache holds for the key, timed; `started` is when the request began.

        `caller` (whose digest then is the key's `vary`) travels with the lookup to the view.
        """
        begun = time.perf_counter()
        if caller is not None:
            vary = caller.vary
        found = await self._lookup(name, params, vary)
        ms = (time.perf_counter() - begun) * 1000
        return Lookup(  # not dataclasses.replace: this runs for every request, and it is slow
            found.name,
            found.params,
            found.state,
            found.entry,
            found.vary,
            caller if caller is not None else ANONYMOUS,
            begun if started is None else started,
            ms,
        )

    async def _lookup(self, name: str, params: Mapping[str, ParamValue], vary: str) -> Lookup:
        if not self.caches(name):
            return Lookup(name, params, "off", vary=vary)
        key = aggregate_key(name, params, vary)
        near = self._near.get(key)
        if near is not None:
            return Lookup(name, params, "fresh", near, vary)
        try:
            raw, marker = await self.store.get_many(key, aggregate_marker(name))
        except CacheUnavailableError:
            return Lookup(name, params, "bypass", vary=vary)
        entry = decode_aggregate(raw)
        if entry is None:
            if raw is not None:
                logger.info("cache entry %s is unreadable; treating it as a miss", key)
            return Lookup(name, params, "miss", vary=vary)
        if entry.meta.stored <= decode_marker(marker):
            return Lookup(name, params, "miss", vary=vary)  # purged after it was stored
        freshness = entry.meta.freshness(self.clock())
        if freshness == "fresh":
            self._near.put(key, entry)
        return Lookup(name, params, freshness, entry, vary)

    def forget_local(self) -> None:
        """Drop the near cache (after a purge from this process)."""
        self._near.clear()

    # -- for the fast path (serving.fastpath), before Flask -------------------------------------

    def route(self, path: str) -> str | None:
        """The cached aggregate served at `path`, if there is one."""
        name = self._routes.get(path)
        return name if name is not None and self.caches(name) else None

    def caller(self, name: str, headers: Iterable[tuple[bytes, bytes]]) -> Caller:
        """What a request's raw ASGI headers say, as `name`'s key varies by them."""
        return caller_from_asgi(headers, self._vary[name])

    def shares(self, name: str, caller: Caller) -> bool:
        """Whether `caller` may share `name`'s entries: a request with credentials shares none
        unless the aggregate declares `cache_vary` (then its key has their values)."""
        return not caller.credentials or self._declared[name]

    def hit(self, lookup: Lookup) -> Answer | None:
        """The answer to a fresh lookup; None when it needs the view (a fill, a stale entry, or
        a request for a progressive answer, which the view streams from the entry)."""
        if lookup.state == "fresh" and lookup.entry is not None and not lookup.caller.stream:
            return self._from_entry(lookup.entry, "HIT", lookup.caller, lookup)
        return None

    # -- answering --------------------------------------------------------------------------

    async def answer(
        self,
        name: str,
        params: Mapping[str, ParamValue],
        caller: Caller | None = None,
        lookup: Lookup | None = None,
        *,
        listener: Listener | None = None,
    ) -> Answer:
        """The response for one request of aggregate `name` (`caller`: what its headers say).

        `listener` hears each source's result as the fill it waits for records it, if it waits
        for one that may answer it (not when an older entry may be served in its place).
        """
        caller = caller or ANONYMOUS
        if not self.shares(name, caller):
            return await self._answer_privately(name, params, caller, listener)
        vary = caller.vary
        if lookup is None or (lookup.name, lookup.params, lookup.vary) != (name, params, vary):
            lookup = await self.lookup(name, params, caller=caller)
        if lookup.state == "fresh" and lookup.entry is not None:
            return self._from_entry(lookup.entry, "HIT", caller, lookup)
        if lookup.state == "stale" and lookup.entry is not None:
            self._refresh_in_background(name, params, vary)
            stale = StaleInfo(age=self._age(lookup.entry), reason="refreshing")
            return self._from_entry(lookup.entry, "STALE", caller, lookup, stale=stale)
        if lookup.state == "off":
            # Not cached: a disconnect cancels it.
            filled = await self._fill_fn(name, params, listener=listener)
            return self._from_filled(filled, None, 0, caller, lookup)
        if lookup.state == "stale_if_error":
            listener = None  # the answer may be the stored entry: what the fill hears is not it
        # Cache down (bypass) too: concurrent requests still share one fan-out per process, so
        # a cache outage never multiplies the load on upstreams.
        filled = await self._single_flight(name, params, vary, listener)
        if filled.entry is not None:
            return self._from_entry(filled.entry, "HIT", caller, lookup, filled)
        if filled.status >= 500 and lookup.entry is not None:
            if lookup.state in ("stale_if_error", "stale"):
                logger.info("serving stale %s: its refresh answered %d", name, filled.status)
                stale = StaleInfo(
                    age=self._age(lookup.entry),
                    reason="refresh_failed",
                    detail=_refresh_failure(filled),
                )
                return self._from_entry(lookup.entry, "STALE", caller, lookup, filled, stale)
        if lookup.state == "bypass":
            return self._from_filled(filled, "BYPASS", 0, caller, lookup, bypass="backend")
        ttl = aggregate_ttls(self.config.aggregates[name], filled.complete)
        max_age = ttl if filled.status == 200 else 0
        return self._from_filled(filled, "MISS", max_age, caller, lookup)

    async def _answer_privately(
        self,
        name: str,
        params: Mapping[str, ParamValue],
        caller: Caller,
        listener: Listener | None = None,
    ) -> Answer:
        """A fan-out of this request's own, neither read from nor written to the cache, and not
        the single-flight fill other requests share (privacy module docstring)."""
        lookup = Lookup(name, params, "bypass" if self.caches(name) else "off")
        lookup = dataclasses.replace(lookup, started=time.perf_counter())
        filled = await self._fill_fn(name, params, listener=listener)
        how = "BYPASS" if lookup.state == "bypass" else None
        return self._from_filled(filled, how, 0, caller, lookup, bypass="credentials")

    def _from_entry(
        self,
        entry: AggregateEntry,
        how: str,
        caller: Caller,
        lookup: Lookup,
        filled: Filled | None = None,
        stale: StaleInfo | None = None,
    ) -> Answer:
        self.metrics.cache_result(lookup.name, how)  # every HIT, fast path's included
        vary = self._vary_header[lookup.name] if self._vary[lookup.name] else ""
        now = self.clock()
        return entry_answer(
            entry, how, caller, lookup, now=now, vary=vary, filled=filled, stale=stale
        )

    def _age(self, entry: AggregateEntry) -> float:
        return round(entry.meta.age(self.clock()), 1)

    def _from_filled(
        self,
        filled: Filled,
        how: str | None,
        ttl: float,
        caller: Caller,
        lookup: Lookup,
        *,
        bypass: str = "",
    ) -> Answer:
        if how is not None:
            self.metrics.cache_result(lookup.name, how)
        vary = self._vary_header[lookup.name] if self._vary[lookup.name] else ""
        return filled_answer(filled, how, ttl, caller, lookup, vary=vary, bypass=bypass)

    # -- warming ----------------------------------------------------------------------------

    async def warm(
        self, name: str, params: Mapping[str, ParamValue], *, only_missing: bool = False
    ) -> WarmResult:
        """Refresh one entry now, through the same single-flight as live traffic.

        A fill already in flight for the key (live traffic, another warmer) is joined rather than
        duplicated; otherwise a new fan-out runs even if a fresh entry exists, unless
        `only_missing`, which skips keys that are fresh.
        """
        if not self.caches(name):
            return WarmResult("failed", detail="caching is off for this aggregate (cache_ttl = 0)")
        if only_missing:
            lookup = await self.lookup(name, params)
            if lookup.state == "fresh":
                return WarmResult("skipped", detail="fresh in the cache")
        if not self.store.available:
            return WarmResult("failed", detail="the cache backend is unreachable")
        filled = await asyncio.shield(self._task_for(name, params, force=True))
        failed = filled.failed
        if filled.entry is not None:  # another process's fresh fill, waited for
            return WarmResult(
                "warmed" if filled.complete else "partial",
                filled.status,
                failed,
                "filled by another worker",
            )
        if filled.status != 200:
            return WarmResult(
                "failed", filled.status, failed, f"the aggregate answered {filled.status}"
            )
        if not filled.stored:
            if not filled.complete:
                return WarmResult(
                    "partial", 200, failed, "partial answer, not cached (no cache_partial_ttl)"
                )
            return WarmResult("failed", 200, failed, "the cache backend did not take the entry")
        return WarmResult("warmed" if filled.complete else "partial", 200, failed)

    # -- filling ----------------------------------------------------------------------------

    def _task_for(
        self,
        name: str,
        params: Mapping[str, ParamValue],
        vary: str = "",
        *,
        force: bool = False,
        waiter: bool = False,
    ) -> asyncio.Task[Filled]:
        """The in-flight fill of this key (a live one serves a forced refresh too), or a new one.

        `waiter`: a request will await the task; joining one under way is counted as coalesced.
        """
        key = aggregate_key(name, params, vary)
        task = self._inflight.get(key)
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            if waiter:
                self.metrics.coalesced(name, "worker")
            if logger.isEnabledFor(logging.DEBUG):
                # Its upstream calls carry the id of the request that started it: say which.
                logger.debug("waiting for %s", task.get_name())
            return task
        progress = Progress()
        fill = self._fill_and_store(name, params, key, vary, progress, force=force)
        # Created in this request's context: the fill's upstream calls and log lines carry its
        # id and send its forwarded headers (whose values the key's digest was made of).
        started_by = request_id.get() or "no request"
        task = asyncio.create_task(fill, name=f"fill:{key} (started by {started_by})")
        self._inflight[key] = task
        self._progress[key] = progress
        task.add_done_callback(lambda t: self._forget(key, t))
        return task

    def _forget(self, key: str, task: asyncio.Task[Filled]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
            self._progress.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            logger.error("filling %s failed", key, exc_info=task.exception())

    async def _single_flight(
        self,
        name: str,
        params: Mapping[str, ParamValue],
        vary: str,
        listener: Listener | None = None,
    ) -> Filled:
        task = self._task_for(name, params, vary, waiter=True)
        progress = None
        if listener is not None:
            progress = self._progress.get(aggregate_key(name, params, vary))
            if progress is not None:
                progress.subscribe(listener)
        try:
            async with asyncio.timeout(self.settings.singleflight_wait):
                return await asyncio.shield(task)
        except TimeoutError:
            logger.warning(
                "waited %.1f s for a fill of %s; filling alone",
                self.settings.singleflight_wait,
                name,
            )
            # (Without the listener: it heard that fill's results, and the answer says the rest.)
            return await self._fill_fn(name, params)
        finally:
            if progress is not None and listener is not None:
                progress.unsubscribe(listener)

    def _refresh_in_background(
        self, name: str, params: Mapping[str, ParamValue], vary: str
    ) -> None:
        if not self.live():
            # Not started by a lifespan on this loop (Flask's test client, the CLI): a task
            # would die with the request's private loop, so there is no background refresh.
            return
        self._task_for(name, params, vary)

    async def _fill_and_store(
        self,
        name: str,
        params: Mapping[str, ParamValue],
        key: str,
        vary: str,
        progress: Progress,
        *,
        force: bool = False,
    ) -> Filled:
        """One fan-out for `key`, stored; `force` (warming) never settles for an older entry.
        Its sources' results are published to `progress` as they land."""
        begun = time.perf_counter()
        filled, fan_out_ms = await self._fill_and_store_untimed(
            name, params, key, vary, progress, force=force
        )
        # Everything here that is not the fan-out itself is cache I/O (or waiting on it).
        cache_ms = (time.perf_counter() - begun) * 1000 - fan_out_ms
        return dataclasses.replace(filled, cache_ms=max(cache_ms, 0.0))

    async def _fill_and_store_untimed(
        self,
        name: str,
        params: Mapping[str, ParamValue],
        key: str,
        vary: str,
        progress: Progress,
        *,
        force: bool,
    ) -> tuple[Filled, float]:
        """`_fill_and_store`, and the ms its fan-out took (0 when another fill answered)."""
        agg = self.config.aggregates[name]
        started = self.clock()
        token: str | None = ""
        with contextlib.suppress(CacheUnavailableError):
            token = await self.store.try_lock(lock_key(key), agg.deadline + 1.0)
        if token is None:  # another process is filling this key: wait for its entry
            self.metrics.coalesced(name, "shared")
            newer_than = started if force else 0.0
            entry = await self._await_entry(name, params, vary, agg.deadline + 1.0, newer_than)
            if entry is not None:
                return _filled_from(entry), 0.0
        try:
            if token is not None and not force:
                # The requester's lookup missed, but a fill that ended since may have stored the
                # entry: one of ours that just left `_inflight` (the near cache has it) or, now
                # that we hold the Redis lock, another process's that released it (read again).
                entry = self._near.get(key)
                if entry is None and (token or self._near.ttl <= 0):
                    again = await self.lookup(name, params, vary=vary)
                    entry = again.entry if again.state == "fresh" else None
                if entry is not None:
                    filled = _filled_from(entry)
                    return filled, 0.0
            fill_started = time.perf_counter()
            filled = await self._fill_fn(name, params, listener=progress.publish)
            fan_out_ms = (time.perf_counter() - fill_started) * 1000
            if await self._store(name, key, filled):
                return dataclasses.replace(filled, stored=True), fan_out_ms
            return filled, fan_out_ms
        finally:
            if token:
                with contextlib.suppress(CacheUnavailableError):
                    await self.store.unlock(lock_key(key), token)

    async def _await_entry(
        self,
        name: str,
        params: Mapping[str, ParamValue],
        vary: str,
        limit: float,
        newer_than: float = 0.0,
    ) -> AggregateEntry | None:
        deadline = time.monotonic() + min(limit, self.settings.singleflight_wait)
        while time.monotonic() < deadline:
            await asyncio.sleep(_POLL)
            lookup = await self.lookup(name, params, vary=vary)
            entry = lookup.entry
            if lookup.state == "fresh" and entry is not None and entry.meta.stored >= newer_than:
                return entry
            if lookup.state == "bypass":
                return None
        return None

    async def _store(self, name: str, key: str, filled: Filled) -> bool:
        """Write the answer if it may be cached; True when it was written."""
        agg = self.config.aggregates[name]
        ttl = aggregate_ttls(agg, filled.complete) if filled.status == 200 else 0.0
        if ttl <= 0:
            return False
        meta = AggregateMeta(
            stored=self.clock(),
            ttl=ttl,
            stale_ttl=agg.stale_ttl,
            stale_if_error_ttl=agg.stale_if_error_ttl,
            status=filled.status,
            complete=filled.complete,
            etag=etag_for(filled.body, filled.status),
            timing=filled.timing,
            failed=filled.failed,
        )
        try:
            await self.store.set(key, encode_aggregate(meta, filled.body), meta.backend_timeout())
        except CacheUnavailableError:
            return False
        self._near.put(key, AggregateEntry(meta, filled.body))
        return True


def _refresh_failure(filled: Filled) -> str:
    """What a failed refresh answered, for `stale.detail`: `status=502; failed="a,b"`."""
    failed = f'; failed="{",".join(filled.failed)}"' if filled.failed else ""
    return f"status={filled.status}{failed}"


def _filled_from(entry: AggregateEntry) -> Filled:
    """Another fill's stored answer (this process's or another's), as a fill result."""
    meta = entry.meta
    return Filled(meta.status, entry.body, meta.complete, "", meta.failed, entry)
