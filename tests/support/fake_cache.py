"""A fake fill and a fake clock around a real AggregateCache on SimpleCache: the cache's rules
without HTTP or sleeping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from flask import Flask

from aggregator.cache import AggregateCache, Filled
from aggregator.cache.backends import build_cache
from aggregator.cache.headers import Answer
from aggregator.cache.store import CacheStore
from aggregator.config import parse_config
from aggregator.models import SourceResult, SourceStatus
from aggregator.params import ParamValue
from aggregator.progress import Listener
from aggregator.settings import Settings

CONFIG = """
[upstreams.a]
url = "http://127.0.0.1:9/a/{{city}}"

[aggregates.dash]
path = "/dash"
sources = ["a"]
required = ["a"]
params = {{ city = "str", n = {{ type = "int", default = 1 }} }}
{extra}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Upstream:
    """A fake fill: counts calls; answers what `next` says."""

    def __init__(self) -> None:
        self.calls = 0
        self.status = 200
        self.complete = True
        self.delay = 0.0

    async def fill(
        self, name: str, params: Mapping[str, ParamValue], *, listener: Listener | None = None
    ) -> Filled:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if listener is not None:  # its one source landed
            status: SourceStatus = "ok" if self.status == 200 else "connect"
            listener("a", SourceResult(name="a", status=status, ms=1))
        errors = {} if self.status == 200 else {"a": {"kind": "connect", "detail": "x"}}
        body = json.dumps(
            {
                "data": {"a": {"call": self.calls, **params}} if self.status == 200 else {},
                "errors": errors,
                "sources": {"a": {"status": "ok" if self.status == 200 else "connect", "ms": 1}},
                "complete": self.complete and self.status == 200,
            }
        ).encode()
        complete = self.complete and self.status == 200
        # As the real fill (aggregate.py) does: the sources of the envelope's `errors`, sorted.
        return Filled(self.status, body, complete, "a;dur=1", failed=tuple(sorted(errors)))


def make_cache(
    extra: str = "cache_ttl = 10", **settings: Any
) -> tuple[AggregateCache, Upstream, Clock]:
    config = parse_config(CONFIG.format(extra=extra), "test")
    settings.setdefault("cache_local_ttl", 0)  # read the backend every time unless a test asks
    settings_obj = Settings(cache_type="simple", **settings)
    store = CacheStore(build_cache(Flask("t"), settings_obj), settings_obj)
    upstream, clock = Upstream(), Clock()
    service = AggregateCache(store, config, settings_obj, upstream.fill, clock=clock)
    return service, upstream, clock


def headers(answer: Answer) -> dict[str, str]:
    return dict(answer.headers)


P: dict[str, ParamValue] = {"city": "Paris", "n": 1}
