"""The cache on real backends (SimpleCache, FileSystemCache) with the real app and demo upstreams.

What is stored is our JSON (never pickle), a corrupted entry is a miss, a slow backend never
blocks the loop, and a cold burst fans out once (per process where the backend has no lock).
Helpers here are shared with `test_cache_redis.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import pickle
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from aggregator import create_asgi_app
from aggregator.cache import AggregateCache, parse_query
from aggregator.cache.backends import FileSystemCache, SimpleCache
from aggregator.cache.entries import AggregateMeta, aggregate_key, encode_aggregate, etag_for
from aggregator.demo.process import DemoProcess
from aggregator.engine import engine_of
from aggregator.serving import ASGIAdapter
from aggregator.settings import Settings
from tests.conftest import Server, demo_stats, five_sources_config, reset_demo

pytestmark = pytest.mark.integration  # every test here talks to the demo upstream process

QUERY = "city=Paris&user_id=7"
SERVICES = ("weather", "stocks", "news", "profile", "recommendations")


def cached_config(demo_url: str, *, delay: float = 0.3, ttl: float = 30) -> str:
    """Five demo sources of `delay` seconds each, aggregated as /api/five and cached `ttl` s."""
    return five_sources_config(demo_url, delay=delay) + f"cache_ttl = {ttl}\n"


def one_source_config(demo_url: str, *, delay: float = 0.05, ttl: float = 30) -> str:
    """/api/one: one demo source, cached; little CPU per request, for loop-lag measurements."""
    return f"""
[upstreams.weather]
url = "{demo_url}/weather/{{city}}?delay={delay}"
timeout = 3.0

[aggregates.one]
path = "/api/one"
sources = ["weather"]
params = {{ city = "str" }}
cache_ttl = {ttl}
"""


@contextlib.asynccontextmanager
async def serving(
    config: Path, **settings: Any
) -> AsyncIterator[tuple[ASGIAdapter, httpx.AsyncClient]]:
    """The real ASGI app in-process, started by its lifespan, and a client for it."""
    adapter = create_asgi_app(Settings(config=config, **settings))
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's ASGI types
    limits = httpx.Limits(max_connections=None)
    async with (
        adapter.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30, limits=limits) as c,
    ):
        yield adapter, c


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


async def burst(client: httpx.AsyncClient, url: str, n: int) -> list[httpx.Response]:
    return list(await asyncio.gather(*[client.get(url) for _ in range(n)]))


def upstream_calls(demo: DemoProcess) -> dict[str, int]:
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


# -- which worker process served a connection (Linux /proc) ------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after "(comm)" and state
            found.append(int(entry))
    return found


def serving_pids(server: Server, client_ports: Iterable[int]) -> dict[int, int]:
    """Client port -> pid of the Hypercorn worker holding the server side of that connection."""
    port = int(server.url.rsplit(":", 1)[1])
    inodes: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.rsplit(":", 1)[1], 16) == port and inode != "0":
            inodes[f"socket:[{inode}]"] = int(remote.rsplit(":", 1)[1], 16)
    owners: dict[int, int] = {}
    for pid in _children(server.popen.pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target in inodes:
                        owners[inodes[target]] = pid
    wanted = set(client_ports)
    return {p: pid for p, pid in owners.items() if p in wanted}


def client_port(response: httpx.Response) -> int:
    """The local port of the (still open) connection that carried `response`."""
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


def get_fresh(server: Server, path: str) -> tuple[httpx.Response, int]:
    """GET on a new connection; the response and the pid of the worker that served it."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        response = client.get(server.url + path)
        port = client_port(response)
        return response, serving_pids(server, [port])[port]


def wait_for_workers(server: Server, n: int, timeout: float = 20.0) -> set[int]:
    """Fresh connections to /healthz until `n` different workers have answered."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < n and time.monotonic() < deadline:
        response, pid = get_fresh(server, "/healthz")
        if response.status_code == 200:
            seen.add(pid)
    assert len(seen) == n, f"only workers {seen} answered within {timeout} s:\n{server.log()}"
    return seen


async def cold_burst_over_the_wire(
    server: Server, n: int
) -> tuple[list[httpx.Response], dict[int, int]]:
    """`n` concurrent requests on `n` connections; the responses and requests per worker."""
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:
        responses = await burst(client, f"{server.url}/api/five?{QUERY}", n)
        ports = [client_port(r) for r in responses]
        owners = serving_pids(server, ports)
    per_worker: dict[int, int] = {}
    for port in ports:
        per_worker[owners[port]] = per_worker.get(owners[port], 0) + 1
    return responses, per_worker


def hits_from_every_worker(server: Server, workers: set[int]) -> dict[int, list[str]]:
    """Sequential requests on fresh connections until each worker answered 3; their X-Cache."""
    seen: dict[int, list[str]] = {pid: [] for pid in workers}
    for _ in range(80):
        response, pid = get_fresh(server, f"/api/five?{QUERY}")
        assert response.status_code == 200
        seen[pid].append(response.headers["x-cache"])
        if sum(map(len, seen.values())) >= 10 and all(len(v) >= 3 for v in seen.values()):
            break
    return seen


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_type", ["simple", "filesystem"])
async def test_entries_are_stored_as_our_json_never_pickle(
    demo, write_config, tmp_path, cache_type
):
    config = write_config(cached_config(demo.url, delay=0.05))
    cache_dir = tmp_path / "cache"
    async with serving(config, cache_type=cache_type, cache_dir=cache_dir) as (adapter, client):
        first = await client.get(f"/api/five?{QUERY}")
        raw = local_raw(adapter, entry_key(adapter))
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    assert_our_format(raw, first)
    if cache_type == "filesystem":  # cachelib's own file count goes through our serializer too
        files = list(cache_dir.iterdir())
        assert len(files) >= 2
        for path in files:
            assert not path.read_bytes()[4:].startswith(b"\x80"), path


@pytest.mark.parametrize("kind", GARBAGE)
@pytest.mark.parametrize("cache_type", ["simple", "filesystem"])
async def test_a_corrupted_entry_is_a_miss_then_refilled(
    demo, write_config, tmp_path, cache_type, kind
):
    config = write_config(cached_config(demo.url, delay=0.05))
    tripwire = tmp_path / "unpickled"
    async with serving(config, cache_type=cache_type, cache_dir=tmp_path / "c") as (adapter, c):
        key = entry_key(adapter)
        backend = cache_of(adapter).store.backend
        if cache_type == "filesystem":  # raw bytes in the file, behind a valid expiry header
            expires = struct.pack("I", int(time.time()) + 60)
            Path(backend._get_filename(key)).write_bytes(expires + garbage(kind, tripwire))
        else:
            backend.set(key, garbage(kind, tripwire), timeout=60)
        first = await c.get(f"/api/five?{QUERY}")
        second = await c.get(f"/api/five?{QUERY}")
        raw = local_raw(adapter, key)
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
    assert second.content == first.content
    assert_our_format(raw, first)  # the garbage was replaced
    assert not tripwire.exists(), "the cache unpickled what it read"


class Stalled:
    """Wraps backend methods so each call takes `stall` seconds; records where each call ran."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.calls: list[tuple[str, bool]] = []  # (method, ran on the event loop's thread)

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, threading.current_thread() is threading.main_thread()))
            time.sleep(self.stall)
            return fn(*args, **kwargs)

        return run

    def count(self, name: str) -> int:
        return sum(1 for method, _ in self.calls if method == name)

    @property
    def on_loop(self) -> list[str]:
        return [method for method, on_loop in self.calls if on_loop]


async def test_a_slow_file_cache_never_blocks_the_event_loop(
    demo, write_config, tmp_path, monkeypatch
):
    # A file cache on a slow disk (NFS, a throttled volume): every backend call takes 0.5 s.
    # Made inline, one call would stall the loop 0.5 s; off the loop, the loop stays free.
    stalled = Stalled(0.5)
    config = write_config(one_source_config(demo.url))
    settings = {"cache_type": "filesystem", "cache_dir": tmp_path, "cache_timeout": 10.0}
    async with serving(config, **settings) as (adapter, client):
        backend = cache_of(adapter).store.backend
        for name in ("get_many", "set"):
            monkeypatch.setattr(backend, name, stalled.wrap(getattr(backend, name), name))
        url = "/api/one?city=Paris"
        gc.collect()  # a full collection is a pause of its own; not what this test measures
        async with loop_lag() as lag:
            started = time.perf_counter()
            cold = await burst(client, url, 50)
            elapsed = time.perf_counter() - started
    print(
        f"\nfilesystem cache, {stalled.stall} s per call, 50 concurrent: worst loop lag "
        f"{lag.worst * 1000:.1f} ms ({lag.ticks} ticks in {elapsed:.2f} s, "
        f"{len(stalled.calls)} cache calls)"
    )
    assert all(r.status_code == 200 for r in cold)
    assert {r.headers["x-cache"] for r in cold} <= {"MISS", "HIT"}  # the cache worked, slowly
    assert stalled.count("get_many") >= 50 and stalled.count("set") >= 1
    assert stalled.on_loop == []
    assert lag.ticks > 20
    assert lag.worst < 0.25  # a single inline call would be >= 0.5 s


async def test_cold_burst_fans_out_once_in_one_process(demo, write_config):
    config = write_config(cached_config(demo.url, delay=0.3))
    async with serving(config, cache_type="simple") as (_, client):
        url = f"/api/five?{QUERY}"
        await client.get("/api/five?city=Oslo&user_id=1")  # warm imports and connections
        reset_demo(demo)
        responses = await burst(client, url, 100)
        calls = upstream_calls(demo)
        after = await client.get(url)
    print(f"\nsimple cache, 1 process, 100 concurrent cold requests: upstream calls {calls}")
    assert all(r.status_code == 200 for r in responses)
    assert len({r.content for r in responses}) == 1
    assert calls == dict.fromkeys(SERVICES, 1)
    assert after.headers["x-cache"] == "HIT" and after.content == responses[0].content


async def test_a_miss_read_just_before_a_fill_ended_does_not_fan_out_again(
    demo, write_config, tmp_path, monkeypatch
):
    # Request B reads "miss" while A's fill is running, but its answer comes back late (a slow
    # backend, a busy pool): by then the fill has stored and left `_inflight`. B must find the
    # entry, not start a second fan-out.
    config = write_config(cached_config(demo.url, delay=0.05))
    settings = {"cache_type": "filesystem", "cache_dir": tmp_path, "cache_timeout": 5.0}
    async with serving(config, **settings) as (adapter, client):
        key = entry_key(adapter)
        backend = cache_of(adapter).store.backend
        real = backend.get_many
        lookups: list[float] = []
        lock = threading.Lock()

        def get_many(*keys: str) -> Any:
            value = real(*keys)
            with lock:
                if keys[0] == key:
                    lookups.append(time.monotonic())
                late = keys[0] == key and len(lookups) == 2
            if late:
                time.sleep(0.6)  # read before the fill stored, answered after it finished
            return value

        monkeypatch.setattr(backend, "get_many", get_many)
        await client.get("/api/five?city=Oslo&user_id=1")  # warm connections; not our key
        reset_demo(demo)
        url = f"/api/five?{QUERY}"
        a, b = await asyncio.gather(client.get(url), client.get(url))
        calls = upstream_calls(demo)
    assert a.status_code == b.status_code == 200
    assert a.content == b.content
    assert len(lookups) >= 2  # the late lookup happened
    assert calls == dict.fromkeys(SERVICES, 1)


async def test_file_cache_is_shared_by_two_workers(serve, demo, write_config, tmp_path):
    config = write_config(cached_config(demo.url, delay=0.3))
    server = serve(config, workers=2, cache_type="filesystem", cache_dir=str(tmp_path / "c"))
    workers = wait_for_workers(server, 2)
    reset_demo(demo)

    responses, per_worker = await cold_burst_over_the_wire(server, 100)
    calls = upstream_calls(demo)
    seen = hits_from_every_worker(server, workers)

    print(
        f"\nfilesystem cache, 2 workers, 100 concurrent cold requests (per worker {per_worker}):"
        f" upstream calls {calls}; afterwards {seen}"
    )
    assert all(r.status_code == 200 for r in responses)
    assert all(1 <= n <= 2 for n in calls.values())  # at most once per process: no file lock
    assert set(per_worker) == workers  # both workers took part in the burst
    assert upstream_calls(demo) == calls  # and nothing was fetched again afterwards
    for pid, states in seen.items():
        assert states and set(states) == {"HIT"}, (pid, seen)
