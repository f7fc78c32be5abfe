"""Probes of the aggregate cache on real backends: keys, raw stored bytes, corrupted entries,
upstream call counts and the event loop's lateness."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import httpx
import pytest

from aggregator.cache import AggregateCache
from aggregator.cache.backends import FileSystemCache, SimpleCache
from aggregator.cache.entries import AggregateMeta, aggregate_key, encode_aggregate, etag_for
from aggregator.demo.process import DemoProcess
from aggregator.engine import engine_of
from aggregator.params import parse_query
from aggregator.serving import ASGIAdapter
from tests.support.configs import QUERY, SERVICES
from tests.support.demo import demo_stats


def cache_of(adapter: ASGIAdapter) -> AggregateCache:
    return engine_of(adapter.app).cache


def entry_key(adapter: ASGIAdapter, query: str = QUERY) -> str:
    """The backend key of /api/five?`query`, built the way the app builds it."""
    params = cache_of(adapter).config.aggregates["five"].parse_params(parse_query(query))
    return aggregate_key("five", params)


def local_raw(adapter: ASGIAdapter, key: str) -> bytes | None:
    """What an in-memory or file backend holds under `key`, bytes as stored."""
    backend = cache_of(adapter).store.backend
    if isinstance(backend, SimpleCache):
        item = backend._cache.get(key)
        return None if item is None else cast(bytes, item[1])
    assert isinstance(backend, FileSystemCache)
    path = Path(backend._get_filename(key))
    return path.read_bytes()[4:] if path.exists() else None  # after cachelib's expiry header


def assert_our_format(raw: bytes | None, response: httpx.Response) -> None:
    """`raw` is one JSON meta line plus the served body, and nothing pickled."""
    assert raw is not None, "nothing stored"
    assert not raw.startswith(b"\x80"), "a pickle (protocol >= 2 starts with PROTO, 0x80)"
    head, sep, body = raw.partition(b"\n")
    assert sep == b"\n"
    meta = json.loads(head)
    assert meta["v"] == 1 and meta["status"] == 200 and meta["complete"] is True
    assert meta["etag"] == response.headers["etag"]
    assert body == response.content
    assert json.loads(body) == response.json()


class Tripwire:
    """Unpickling this touches a file: proof that nobody ever unpickles what the cache holds."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[Path], None], tuple[Path]]:
        return (Path.touch, (self.path,))


def garbage(kind: str, tripwire: Path) -> bytes:
    """A corrupted entry of one kind."""
    if kind == "pickle":
        return pickle.dumps(Tripwire(tripwire))
    if kind == "not-json":
        return b"\x00\xffnot json\n{]"
    if kind == "tampered-body":  # a valid meta line whose ETag does not match the body
        meta = AggregateMeta(
            stored=time.time(), ttl=30, status=200, complete=True, etag=etag_for(b"{}")
        )
        return encode_aggregate(meta, b'{"data": {}, "errors": {}, "complete": true}')
    if kind == "count-like":  # what our serializer reads back as an int
        return b"#12345"
    raise AssertionError(kind)


GARBAGE = [
    pytest.param("pickle", id="pickle"),
    pytest.param("not-json", id="not-json"),
    pytest.param("tampered-body", id="tampered-body"),
    pytest.param("count-like", id="count-like"),
]


def upstream_calls(demo: DemoProcess) -> dict[str, int]:
    """Calls per service of /api/five since the demo's last reset."""
    requests: dict[str, int] = demo_stats(demo)["requests"]
    return {name: requests[name] for name in SERVICES}


class LoopLag:
    """Measures the event loop's worst lateness: a task sleeping 5 ms at a time, on the loop."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.ticks = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, loop.time() - started - 0.005)
            self.ticks += 1


@contextlib.asynccontextmanager
async def loop_lag() -> AsyncIterator[LoopLag]:
    probe = LoopLag()
    task = asyncio.create_task(probe.run())
    await asyncio.sleep(0.02)
    try:
        yield probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
