"""The source cache: one upstream's validated payload, reused across aggregates and parameters.

An aggregate entry is keyed by aggregate and parameters; a source entry by upstream and the URL
the parameters render, so two aggregates (or two parameter sets) that make the same upstream call
share it (with the same values of the client headers it forwards, if any). How long a payload is
kept is decided here (`source_ttl`): the upstream's `cache_ttl` when the config sets one (0 =
never), else what the upstream's `Cache-Control` allows a shared cache (s-maxage over max-age,
minus `Age`; never with no-store, no-cache or private, nor without a max-age). Only successful,
validated payloads are stored.

A fan-out reads every source entry of its aggregate, and the purge markers of their upstreams,
in ONE `get_many`. An upstream without `cache_ttl` is looked up only once this process has seen
it answer with a cacheable `Cache-Control`: most APIs never send one, and asking the cache for
their entries cost a noticeable share of an uncached fan-out's CPU for nothing (py-spy). The
price is one upstream call per process and upstream after start-up that another process's entry
could have answered; the answer then stores its own entry and later lookups find it. Each
payload is re-validated through its upstream's model on the way out, and anything unreadable,
expired or older than its upstream's purge marker is a miss. A sick backend
(`CacheUnavailableError`) only means no source caching for that request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping

from pydantic import ValidationError

from aggregator.bodytemplate import body_digest
from aggregator.cache.entries import SourceEntry, decode_marker, source_key, source_marker
from aggregator.cache.privacy import vary_digest
from aggregator.cache.store import CacheStore
from aggregator.config import AggregateConfig, AppConfig, UpstreamConfig
from aggregator.context import forwarded
from aggregator.errors import CacheUnavailableError
from aggregator.models import CacheControl, SourceResult
from aggregator.params import ParamValue

logger = logging.getLogger(__name__)

#: The longest an upstream's own Cache-Control can make us keep its payload (as `cache_ttl`).
MAX_SOURCE_TTL = 86_400.0


def source_ttl(upstream: UpstreamConfig, cache_control: CacheControl | None) -> float:
    """Seconds to keep an upstream's successful payload; 0 means do not store it."""
    if upstream.cache_ttl is not None:
        return upstream.cache_ttl  # the operator's word wins, whatever the upstream says
    cc = cache_control
    if cc is None or cc.no_store or cc.no_cache or cc.private:
        # no-cache would need a revalidation per use, which we do not do: never store.
        return 0.0
    lifetime = cc.s_maxage if cc.s_maxage is not None else cc.max_age  # we are a shared cache
    if lifetime is None:
        return 0.0
    return min(max(0.0, lifetime - cc.age), MAX_SOURCE_TTL)


class SourceCache:
    """Per-upstream payloads in the same store as the aggregate entries."""

    def __init__(
        self,
        store: CacheStore,
        config: AppConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache_store = store
        self.config = config
        self.clock = clock
        #: Upstreams whose entries are worth looking up: a positive `cache_ttl` in the config,
        #: or (learned) a cacheable answer seen by this process.
        self._looked_up = {name for name, up in config.upstreams.items() if (up.cache_ttl or 0) > 0}

    def _key(self, upstream: str, values: Mapping[str, ParamValue]) -> str:
        """Upstream and URL, and the values of the client headers it forwards (this request's)."""
        config = self.config.upstreams[upstream]
        url = config.template.render(values)
        if config.body_template is not None:  # the body picks the answer as much as the URL
            url = f"{config.method} {url} {body_digest(config.body_template.render(values))}"
        names = config.forwarded_keys
        if not names:
            return source_key(upstream, url)
        values = forwarded.get()
        return source_key(upstream, url, vary_digest([values.get(name, "") for name in names]))

    async def lookup(
        self, aggregate: AggregateConfig, params: Mapping[str, ParamValue]
    ) -> dict[str, SourceResult | None]:
        """Each source of `aggregate` the cache applies to: its cached result ("hit"), or None
        for a miss.

        Sources it does not apply to are absent, and so is everything when the cache is down.
        """
        return await self.lookup_sources(aggregate.sources, params)

    async def lookup_sources(
        self, sources: Iterable[str], values: Mapping[str, ParamValue]
    ) -> dict[str, SourceResult | None]:
        """`lookup` for any upstreams called with the same URL `values` (one `get_many`)."""
        started = time.perf_counter()
        names = [name for name in sources if name in self._looked_up]
        if not names:
            return {}
        keys = [self._key(name, values) for name in names]
        try:
            raw = await self.cache_store.get_many(*keys, *map(source_marker, names))
        except CacheUnavailableError:
            return {}
        if len(raw) != 2 * len(names):  # a sick backend answers anything
            return {}
        now = self.clock()
        ms = round((time.perf_counter() - started) * 1000, 1)
        found: dict[str, SourceResult | None] = {}
        for i, name in enumerate(names):
            found[name] = self._read(name, keys[i], raw[i], raw[len(names) + i], now, ms)
        return found

    def _read(
        self, name: str, key: str, raw: object, marker: object, now: float, ms: float
    ) -> SourceResult | None:
        if raw is None:
            return None
        model = self.config.upstreams[name].model
        try:
            if not isinstance(raw, bytes):
                raise ValueError(f"not bytes but {type(raw).__name__}")
            entry = SourceEntry.model_validate_json(raw)
            data = entry.data
            if model is not None:
                # Values out of the cache are Any: the payload must still satisfy its model
                # (which may have changed since it was stored).
                data = model.model_validate(data).model_dump(mode="json")
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            reason = f"{exc.error_count()} errors" if isinstance(exc, ValidationError) else exc
            logger.info("source entry %s is unreadable (%s); treating it as a miss", key, reason)
            return None
        if max(0.0, now - entry.stored) >= entry.ttl:
            return None  # expired (the backend keeps entries a little longer than their TTL)
        if entry.stored <= decode_marker(marker):
            return None  # its upstream was purged after it was stored
        return SourceResult(name=name, status="ok", ms=ms, data=data, cache="hit")

    async def store(
        self, values: Mapping[str, ParamValue], results: Mapping[str, SourceResult]
    ) -> None:
        """Keep each successful, freshly fetched result its TTL allows; errors only log."""
        now = self.clock()
        writes: list[tuple[str, bytes, int]] = []
        for name, result in results.items():
            if not result.ok or result.cache == "hit":
                continue
            ttl = source_ttl(self.config.upstreams[name], result.cache_control)
            if ttl <= 0:
                continue
            self._looked_up.add(name)
            body = SourceEntry(stored=now, ttl=ttl, data=result.data).model_dump_json().encode()
            # The backend drops it a second after it expires; the TTL itself is checked on read.
            writes.append((self._key(name, values), body, math.ceil(ttl) + 1))
        if not writes:
            return
        outcomes = await asyncio.gather(
            *(self.cache_store.set(key, body, timeout) for key, body, timeout in writes),
            return_exceptions=True,
        )
        for outcome in outcomes:
            # CacheUnavailableError: the store already logged it (rate-limited); nothing to do.
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, CacheUnavailableError
            ):
                raise outcome
