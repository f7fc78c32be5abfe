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

Every answer carries `Server-Timing`: the sources this request waited for (a miss), then
`cache` (ms spent on cache I/O: the lookup, and a fill's lock, re-check and store) and `total`
(ms from the lookup that began the request, before Flask when the adapter's fast path ran it,
to the answer's headers). A hit has no source entries: the sources did not run for it, and their
times when the entry was filled are in the body's `sources`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import parse_qs

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
from aggregator.cache.privacy import ANONYMOUS, Caller, caller_from_asgi
from aggregator.cache.store import CacheStore
from aggregator.config import AppConfig
from aggregator.context import request_id
from aggregator.errors import CacheUnavailableError, InvalidRequestError
from aggregator.metrics import OFF, Recorder
from aggregator.params import ParamValue
from aggregator.settings import Settings

logger = logging.getLogger(__name__)

State = Literal["fresh", "stale", "stale_if_error", "expired", "miss", "bypass", "off"]
_POLL = 0.02  # seconds between looks for another process's fill
_LOCAL_MAX = 10_000  # near-cache entries per process


@dataclass(frozen=True, slots=True)
class Filled:
    """One fan-out's answer, ready to send (or one another process stored meanwhile)."""

    status: int
    body: bytes
    complete: bool
    timing: str
    failed: tuple[str, ...] = ()  # sources in the envelope's `errors`, sorted
    entry: AggregateEntry | None = None  # set when the answer came from another process
    stored: bool = False  # set when this fill's answer was written to the cache
    cache_ms: float = 0.0  # cache I/O of this fill (lock, re-check, store), for Server-Timing


@dataclass(frozen=True, slots=True)
class WarmResult:
    """What warming one target did, for `aggregator warm` and `POST /admin/warm`."""

    outcome: Literal["warmed", "partial", "failed", "skipped"]
    status: int | None = None
    sources_failed: tuple[str, ...] = ()
    detail: str = ""


class Fill(Protocol):
    """What the cache calls to fill a key: one fan-out (`aggregator.aggregate.AggregateFill`)."""

    def __call__(self, name: str, params: Mapping[str, ParamValue]) -> Awaitable[Filled]: ...


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache holds for a key; the adapter hands it to the view so it is read once."""

    name: str
    params: Mapping[str, ParamValue]
    state: State
    entry: AggregateEntry | None = None
    vary: str = ""  # the key's header digest (privacy.Caller.vary)
    caller: Caller = ANONYMOUS  # what the request's headers say (its vary is `vary`)
    #: perf_counter() when the request's handling began, and ms the lookup took (Server-Timing).
    started: float = 0.0
    ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


#: The fast path's lookup for the request being served, set by the adapter before Flask runs
#: (the request's context reaches the view), so the view neither parses nor looks up again.
looked_up: contextvars.ContextVar[Lookup | None] = contextvars.ContextVar(
    "aggregator_looked_up", default=None
)


def parse_query(query_string: str) -> dict[str, list[str]]:
    """The one query parser for both the fast path and the view, so both build the same key."""
    return parse_qs(query_string, keep_blank_values=True)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return etag in (t.strip().removeprefix("W/") for t in if_none_match.split(","))


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
        # The near cache: key -> (entry, monotonic time until which it may be reused).
        self._local: OrderedDict[str, tuple[AggregateEntry, float]] = OrderedDict()
        self._local_ttl = settings.cache_local_ttl
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifespan ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Background refreshes run on the loop that started us (the server's)."""
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None
        self.store.close()

    # -- lookups ----------------------------------------------------------------------------

    def caches(self, name: str) -> bool:
        agg = self.config.aggregates[name]
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
        return dataclasses.replace(
            found,
            started=begun if started is None else started,
            ms=ms,
            caller=caller if caller is not None else ANONYMOUS,
        )

    async def _lookup(self, name: str, params: Mapping[str, ParamValue], vary: str) -> Lookup:
        if not self.caches(name):
            return Lookup(name, params, "off", vary=vary)
        key = aggregate_key(name, params, vary)
        near = self._near(key)
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
            self._remember(key, entry)
        return Lookup(name, params, freshness, entry, vary)

    def _near(self, key: str) -> AggregateEntry | None:
        """The near cache's fresh entry for `key`, if it has one."""
        local = self._local.get(key)
        if local is None:
            return None
        near, until = local
        if time.monotonic() < until and near.meta.freshness(self.clock()) == "fresh":
            return near
        del self._local[key]
        return None

    def _remember(self, key: str, entry: AggregateEntry) -> None:
        if self._local_ttl <= 0:
            return
        self._local[key] = (entry, time.monotonic() + self._local_ttl)
        self._local.move_to_end(key)
        if len(self._local) > _LOCAL_MAX:
            self._local.popitem(last=False)

    def forget_local(self) -> None:
        """Drop the near cache (after a purge from this process)."""
        self._local.clear()

    async def fast_answer(
        self, path: str, query_string: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> tuple[Answer | None, Lookup | None]:
        """For the adapter, before Flask: the answer to a fresh hit, else what we looked up.

        Same rule as `answer`: a request with credentials shares no entry unless the aggregate
        declares `cache_vary` (then its key has their values); otherwise Flask answers it.
        """
        started = time.perf_counter()
        name = self._routes.get(path)
        if name is None or not self.caches(name):
            return None, None
        caller = caller_from_asgi(headers, self._vary[name])
        if caller.credentials and not self._declared[name]:
            return None, None  # the view answers it privately
        try:
            params = self.config.aggregates[name].parse_params(parse_query(query_string))
        except InvalidRequestError:
            return None, None  # Flask renders the 400
        lookup = await self.lookup(name, params, started=started, caller=caller)
        if lookup.state == "fresh" and lookup.entry is not None:
            return self._from_entry(lookup.entry, "HIT", caller, lookup), None
        return None, lookup

    # -- answering --------------------------------------------------------------------------

    async def answer(
        self,
        name: str,
        params: Mapping[str, ParamValue],
        caller: Caller | None = None,
        lookup: Lookup | None = None,
    ) -> Answer:
        """The response for one request of aggregate `name` (`caller`: what its headers say)."""
        caller = caller or ANONYMOUS
        if caller.credentials and not self._declared[name]:
            return await self._answer_privately(name, params, caller)
        vary = caller.vary
        if lookup is None or (lookup.name, lookup.params, lookup.vary) != (name, params, vary):
            lookup = await self.lookup(name, params, caller=caller)
        if lookup.state == "fresh" and lookup.entry is not None:
            return self._from_entry(lookup.entry, "HIT", caller, lookup)
        if lookup.state == "stale" and lookup.entry is not None:
            self._refresh_in_background(name, params, vary)
            return self._from_entry(lookup.entry, "STALE", caller, lookup)
        if lookup.state == "off":
            filled = await self._fill_fn(name, params)  # not cached: a disconnect cancels it
            return self._from_filled(filled, None, 0, caller, lookup)
        # Cache down (bypass) too: concurrent requests still share one fan-out per process, so
        # a cache outage never multiplies the load on upstreams.
        filled = await self._single_flight(name, params, vary)
        if filled.entry is not None:
            return self._from_entry(filled.entry, "HIT", caller, lookup, filled)
        if filled.status >= 500 and lookup.entry is not None:
            if lookup.state in ("stale_if_error", "stale"):
                logger.info("serving stale %s: its refresh answered %d", name, filled.status)
                return self._from_entry(lookup.entry, "STALE", caller, lookup, filled)
        if lookup.state == "bypass":
            return self._from_filled(filled, "BYPASS", 0, caller, lookup, bypass="backend")
        ttl = aggregate_ttls(self.config.aggregates[name], filled.complete)
        max_age = ttl if filled.status == 200 else 0
        return self._from_filled(filled, "MISS", max_age, caller, lookup)

    async def _answer_privately(
        self, name: str, params: Mapping[str, ParamValue], caller: Caller
    ) -> Answer:
        """A fan-out of this request's own, neither read from nor written to the cache, and not
        the single-flight fill other requests share (privacy module docstring)."""
        lookup = Lookup(name, params, "bypass" if self.caches(name) else "off")
        lookup = dataclasses.replace(lookup, started=time.perf_counter())
        filled = await self._fill_fn(name, params)
        how = "BYPASS" if lookup.state == "bypass" else None
        return self._from_filled(filled, how, 0, caller, lookup, bypass="credentials")

    def _from_entry(
        self,
        entry: AggregateEntry,
        how: str,
        caller: Caller,
        lookup: Lookup,
        filled: Filled | None = None,
    ) -> Answer:
        """Answer with a stored entry; `filled` is a fill this request waited for meanwhile."""
        self.metrics.cache_result(lookup.name, how)  # every HIT, fast path's included
        meta = entry.meta
        age = meta.age(self.clock())
        max_age = max(0, int(meta.ttl - age)) if how == "HIT" else 0
        private = "private, " if caller.credentials else ""
        headers = [
            ("ETag", meta.etag),
            ("X-Cache", how),
            ("Age", str(int(age))),
            ("Cache-Control", f"{private}max-age={max_age}"),
            ("X-Aggregate-Complete", "true" if meta.complete else "false"),
            ("Server-Timing", _server_timing(how.lower(), lookup, filled)),
        ]
        if self._vary[lookup.name]:
            headers.append(("Vary", self._vary_header[lookup.name]))
        if meta.status == 200 and etag_matches(caller.if_none_match, meta.etag):
            return Answer(304, headers, b"")
        return Answer(meta.status, [("Content-Type", "application/json"), *headers], entry.body)

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
        """Answer with a fresh fan-out; `bypass` says why the cache was skipped, if it was."""
        timing = _server_timing("off" if how is None else how.lower(), lookup, filled)
        private = "private, " if caller.credentials else ""
        headers = [
            ("X-Aggregate-Complete", "true" if filled.complete else "false"),
            ("Server-Timing", timing),
            ("Cache-Control", private + (f"max-age={int(ttl)}" if ttl > 0 else "no-store")),
        ]
        if how is not None:
            self.metrics.cache_result(lookup.name, how)
            headers += [("X-Cache", how), ("Age", "0")]
        if bypass:
            headers.append(("X-Cache-Bypass", bypass))
        if self._vary[lookup.name]:
            headers.append(("Vary", self._vary_header[lookup.name]))
        if filled.status == 200:
            etag = etag_for(filled.body)
            headers.append(("ETag", etag))
            if etag_matches(caller.if_none_match, etag):
                return Answer(304, headers, b"")
        return Answer(filled.status, [("Content-Type", "application/json"), *headers], filled.body)

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
        fill = self._fill_and_store(name, params, key, vary, force=force)
        # Created in this request's context: the fill's upstream calls and log lines carry its
        # id and send its forwarded headers (whose values the key's digest was made of).
        started_by = request_id.get() or "no request"
        task = asyncio.create_task(fill, name=f"fill:{key} (started by {started_by})")
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._forget(key, t))
        return task

    def _forget(self, key: str, task: asyncio.Task[Filled]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and task.exception() is not None:
            logger.error("filling %s failed", key, exc_info=task.exception())

    async def _single_flight(
        self, name: str, params: Mapping[str, ParamValue], vary: str
    ) -> Filled:
        task = self._task_for(name, params, vary, waiter=True)
        try:
            async with asyncio.timeout(self.settings.singleflight_wait):
                return await asyncio.shield(task)
        except TimeoutError:
            logger.warning(
                "waited %.1f s for a fill of %s; filling alone",
                self.settings.singleflight_wait,
                name,
            )
            return await self._fill_fn(name, params)

    def _refresh_in_background(
        self, name: str, params: Mapping[str, ParamValue], vary: str
    ) -> None:
        if self._loop is not asyncio.get_running_loop():
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
        *,
        force: bool = False,
    ) -> Filled:
        """One fan-out for `key`, stored; `force` (warming) never settles for an older entry."""
        begun = time.perf_counter()
        filled, fan_out_ms = await self._fill_and_store_untimed(
            name, params, key, vary, force=force
        )
        # Everything here that is not the fan-out itself is cache I/O (or waiting on it).
        cache_ms = (time.perf_counter() - begun) * 1000 - fan_out_ms
        return dataclasses.replace(filled, cache_ms=max(cache_ms, 0.0))

    async def _fill_and_store_untimed(
        self, name: str, params: Mapping[str, ParamValue], key: str, vary: str, *, force: bool
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
                entry = self._near(key)
                if entry is None and (token or self._local_ttl <= 0):
                    again = await self.lookup(name, params, vary=vary)
                    entry = again.entry if again.state == "fresh" else None
                if entry is not None:
                    filled = _filled_from(entry)
                    return filled, 0.0
            fill_started = time.perf_counter()
            filled = await self._fill_fn(name, params)
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
            etag=etag_for(filled.body),
            timing=filled.timing,
            failed=filled.failed,
        )
        try:
            await self.store.set(key, encode_aggregate(meta, filled.body), meta.backend_timeout())
        except CacheUnavailableError:
            return False
        self._remember(key, AggregateEntry(meta, filled.body))
        return True


def _filled_from(entry: AggregateEntry) -> Filled:
    """Another fill's stored answer (this process's or another's), as a fill result."""
    meta = entry.meta
    return Filled(meta.status, entry.body, meta.complete, "", meta.failed, entry)


def _server_timing(cache_state: str, lookup: Lookup, filled: Filled | None) -> str:
    """Sources this request waited for, then `cache` and `total`, e.g. for a hit:
    `cache;dur=0.04;desc="hit", total;dur=0.09`."""
    cache_ms = lookup.ms + (filled.cache_ms if filled is not None else 0.0)
    total_ms = (time.perf_counter() - lookup.started) * 1000
    own = f'cache;dur={cache_ms:.2f};desc="{cache_state}", total;dur={total_ms:.2f}'
    return f"{filled.timing}, {own}" if filled is not None and filled.timing else own
