"""The cache under faults and hostile data: requests keep succeeding, with bounded added latency,
and nothing read from a cache is ever unpickled.

Faults: a Redis that accepts connections and never answers (a raw socket), Redis killed and
restarted under concurrent traffic, crafted bytes (a pickle that would create a file if loaded,
garbage, integers) written into every kind of key under our prefix on Redis and in the cache
directory, and a FileSystemCache directory that cannot be written, at start-up or mid-traffic.
`pickle.loads`/`load` raise throughout the in-process tests (`no_unpickling`), and the package
is checked statically. Refused/stalled Redis and single corrupted entries: test_cache_redis.py
and test_cache_backends.py.
"""

from __future__ import annotations

import pickle
import re
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.cache import backends
from aggregator.cache.backends import FileSystemCache, _RawBytes
from aggregator.cache.entries import aggregate_marker, lock_key, source_key, source_marker
from tests.support.cache import GARBAGE, Tripwire, cache_of, entry_key, garbage
from tests.support.configs import SERVICES, cached_config, five_sources_config, url_for
from tests.support.paths import ROOT
from tests.support.redis import new_prefix, redis_settings
from tests.support.servers import serving

pytestmark = pytest.mark.integration


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any unpickling in this process fails the test (and is recorded, in case it is caught)."""
    calls: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append("unpickle")
        raise AssertionError("something unpickled data")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    return calls


class Blackhole:
    """A TCP listener that accepts connections and never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.held.append(conn)  # read nothing, answer nothing, keep it open

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


async def timed_get(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = await client.get(url)
    return response, time.perf_counter() - started


# -- Redis that accepts and never answers --------------------------------------------------------


async def test_a_redis_that_never_answers_costs_each_request_a_bounded_delay(
    demo, write_config, blackhole, no_unpickling
):
    # cache_retry_after=0: every request meets the silent Redis itself (no cool-down to hide in).
    config = write_config(cached_config(demo.url, delay=0.05))
    settings = {"cache_type": "redis", "cache_redis_url": blackhole.url, "cache_retry_after": 0}
    async with serving(config, **settings) as (adapter, client):
        timed = [await timed_get(client, url_for(i % 3)) for i in range(6)]
        ready, ready_took = await timed_get(client, "/readyz")
        failures = cache_of(adapter).store.failures
    took = [t for _, t in timed]
    took_text = f"redis blackhole: requests took {', '.join(f'{t:.2f}' for t in took)} s"
    assert [r.status_code for r, _ in timed] == [200] * 6
    assert {r.headers["x-cache"] for r, _ in timed} == {"BYPASS"}
    assert {r.headers["x-cache-bypass"] for r, _ in timed} == {"backend"}
    # Three cache calls at most per request (read, lock, write), 0.25 s each, plus the fan-out.
    assert max(took) < 1.5, took_text
    assert ready.status_code == 503 and "cache" in ready.json()["failed"]
    assert ready_took < 1.0
    assert failures >= 6 and len(blackhole.held) >= 1  # it really was asked
    assert no_unpickling == []


def test_hypercorn_keeps_answering_when_redis_never_answers(serve, demo, write_config, blackhole):
    config = write_config(cached_config(demo.url, delay=0.05))
    server = serve(config, cache_type="redis", cache_redis_url=blackhole.url)
    took = []
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        for i in range(8):
            started = time.perf_counter()
            r = client.get(url_for(i % 2))
            took.append(time.perf_counter() - started)
            assert r.status_code == 200 and r.headers["x-cache"] == "BYPASS"
        assert client.get("/readyz").status_code == 503
    took_text = f"hypercorn, redis blackhole: {', '.join(f'{t:.2f}' for t in took)} s"
    assert max(took) < 1.5, took_text
    assert sum(took) / len(took) < 0.6, took_text  # after a failure the cache is skipped for 1 s


# -- Redis restarted mid-traffic -----------------------------------------------------------------


def test_redis_restarted_mid_traffic_fails_no_request(serve, demo, write_config, private_redis):
    config = write_config(cached_config(demo.url, delay=0.02))
    prefix = new_prefix()
    server = serve(
        config, cache_type="redis", cache_redis_url=private_redis.url, cache_key_prefix=prefix
    )
    results: list[tuple[float, int, str, float]] = []  # (when, status, x-cache, seconds)
    stop = threading.Event()

    def traffic(worker: int) -> None:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
            i = 0
            while not stop.is_set():
                started = time.perf_counter()
                r = client.get(url_for(worker * 100 + i % 10))
                took = time.perf_counter() - started
                results.append((time.monotonic(), r.status_code, r.headers["x-cache"], took))
                i += 1

    threads = [threading.Thread(target=traffic, args=(w,), daemon=True) for w in range(4)]
    for thread in threads:
        thread.start()
    # Traffic until answers come from the cache (1.5 s at least; longer on a busy machine).
    time.sleep(1.5)
    deadline = time.monotonic() + 20
    while not any(state == "HIT" for _, _, state, _ in list(results)):
        assert time.monotonic() < deadline, "no answer came from the cache before Redis was killed"
        time.sleep(0.05)
    private_redis.kill()
    killed_at = time.monotonic()
    time.sleep(1.5)
    private_redis.start()
    restarted_at = time.monotonic()
    time.sleep(3.0)  # past the default 1 s cool-down: the cache is used again
    stop.set()
    for thread in threads:
        thread.join(15)

    def states(since: float, until: float = float("inf")) -> set[str]:
        return {state for when, _, state, _ in results if since <= when < until}

    worst = max(took for *_, took in results)
    assert {status for _, status, _, _ in results} == {200}
    assert "HIT" in states(0, killed_at)
    assert "BYPASS" in states(killed_at, restarted_at)
    assert states(killed_at, restarted_at) <= {"BYPASS", "HIT", "MISS"}
    assert "HIT" in states(restarted_at + 2.0)  # entries stored again and read back
    assert worst < 2.0, (
        f"redis restarted under 4 clients: {len(results)} requests, worst {worst:.2f} s"
    )
    server.stop()
    assert "Traceback" not in server.log()


# -- crafted bytes under our key prefix ----------------------------------------------------------


def crafted_keys(adapter: Any) -> list[str]:
    """Every kind of key one /api/five request reads or takes: entry, sources, markers, lock."""
    config = cache_of(adapter).config
    params = {"city": "Paris", "user_id": 7}
    sources = [source_key(n, config.upstreams[n].template.render(params)) for n in SERVICES]
    entry = entry_key(adapter)
    markers = [aggregate_marker("five"), *map(source_marker, SERVICES)]
    return [entry, *sources, *markers, lock_key(entry)]


@pytest.mark.parametrize("kind", GARBAGE)
async def test_crafted_bytes_in_every_redis_key_are_never_loaded(
    demo, write_config, private_redis, tmp_path, kind, no_unpickling
):
    deadline = 1.0  # a foreign value under the lock key makes a fill wait up to deadline + 1 s
    config = write_config(five_sources_config(demo.url, delay=0.02, deadline=deadline))
    config.write_text(config.read_text() + "cache_ttl = 30\n")
    settings = redis_settings(private_redis)
    tripwire = tmp_path / "unpickled"
    async with serving(config, **settings) as (adapter, client):
        keys = crafted_keys(adapter)
        with private_redis.client() as raw:
            for key in keys:  # no expiry: as if someone wrote them by hand
                raw.set(settings["cache_key_prefix"] + key, garbage(kind, tripwire))
            raw.set(settings["cache_key_prefix"] + "unrelated", garbage(kind, tripwire))
        first, took = await timed_get(client, "/api/five?city=Paris&user_id=7")
        second, _ = await timed_get(client, "/api/five?city=Paris&user_id=7")
        other, _ = await timed_get(client, "/api/five?city=Oslo&user_id=8")
    assert first.status_code == 200 and first.json()["complete"] is True
    assert first.headers["x-cache"] == "MISS"
    assert {s["status"] for s in first.json()["sources"].values()} == {"ok"}
    assert second.headers["x-cache"] == "HIT"
    assert other.status_code == 200
    assert took < deadline + 1.0 + 2.0
    assert not tripwire.exists(), "the cache unpickled what it read"
    assert no_unpickling == []


@pytest.mark.parametrize("kind", GARBAGE)
async def test_crafted_bytes_in_every_cache_file_are_never_loaded(
    demo, write_config, tmp_path, kind, no_unpickling
):
    config = write_config(cached_config(demo.url, delay=0.02))
    cache_dir = tmp_path / "cache"
    tripwire = tmp_path / "unpickled"
    async with serving(config, cache_type="filesystem", cache_dir=cache_dir) as (adapter, c):
        backend = cache_of(adapter).store.backend
        expires = struct.pack("I", int(time.time()) + 60)  # cachelib's header, then our bytes
        for key in [*crafted_keys(adapter)[:-1], "__wz_cache_count"]:
            Path(backend._get_filename(key)).write_bytes(expires + garbage(kind, tripwire))
        first = await c.get("/api/five?city=Paris&user_id=7")
        second = await c.get("/api/five?city=Paris&user_id=7")
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert not tripwire.exists()
    assert no_unpickling == []


def test_the_package_never_unpickles_or_uses_a_pickle_serializer():
    # Statically: no module of the package imports a pickle-like loader or calls one.
    loader = re.compile(
        r"^\s*(?:import|from)\s+(?:c?pickle|_pickle|dill|shelve|marshal|jsonpickle)\b"
        r"|\bpickle\.(?:loads?|Unpickler)\b",
        re.M,
    )
    offenders = [
        f"{path.relative_to(ROOT)}: {match.group(0).strip()}"
        for path in (ROOT / "aggregator").rglob("*.py")
        for match in loader.finditer(path.read_text())
    ]
    assert offenders == []
    # Every backend class we configure stores our bytes verbatim (cachelib's default pickles).
    for cls in backends._BACKENDS.values():
        assert isinstance(getattr(cls, "serializer", None), _RawBytes), cls
    payload = pickle.dumps(Tripwire(ROOT / "never-created"))
    assert _RawBytes().loads(payload) == payload  # handed back as bytes, never executed
    with pytest.raises(TypeError):
        _RawBytes().dumps({"not": "bytes"})


# -- an unwritable FileSystemCache directory ---------------------------------------------------


@pytest.fixture
def unusable_dir(tmp_path: Path) -> Path:
    """A cache directory nobody can create or write, not even root: its parent is a file."""
    parent = tmp_path / "a-file"
    parent.write_text("not a directory")
    return parent / "cache"


async def test_an_unusable_cache_dir_at_start_up_serves_uncached(
    demo, write_config, unusable_dir, no_unpickling
):
    config = write_config(cached_config(demo.url, delay=0.02))
    async with serving(config, cache_type="filesystem", cache_dir=unusable_dir) as (_, client):
        answers = [await timed_get(client, url_for(i % 2)) for i in range(6)]
        ready = await client.get("/readyz")
    states = [r.headers["x-cache"] for r, _ in answers]
    assert [r.status_code for r, _ in answers] == [200] * 6
    assert set(states) <= {"MISS", "BYPASS"} and "BYPASS" in states  # the failure was seen
    assert "HIT" not in states
    assert max(t for _, t in answers) < 1.5
    assert ready.status_code == 503 and ready.json()["failed"] == ["cache"]


def test_hypercorn_starts_and_serves_with_an_unusable_cache_dir(
    serve, demo, write_config, unusable_dir
):
    config = write_config(cached_config(demo.url, delay=0.02))
    server = serve(config, cache_type="filesystem", cache_dir=str(unusable_dir))
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        answers = [client.get(url_for(1)) for _ in range(3)]
        ready = client.get("/readyz")
    assert [r.status_code for r in answers] == [200] * 3
    assert ready.status_code == 503
    server.stop()
    assert "cache directory" in server.log() and "unusable" in server.log()


async def test_a_cache_dir_that_becomes_unwritable_mid_traffic(
    demo, write_config, tmp_path, no_unpickling
):
    config = write_config(cached_config(demo.url, delay=0.02))
    cache_dir = tmp_path / "cache"
    settings: dict[str, Any] = {
        "cache_type": "filesystem",
        "cache_dir": cache_dir,
        "cache_local_ttl": 0,  # every hit reads the directory
        "cache_retry_after": 0.5,
    }
    async with serving(config, **settings) as (adapter, client):
        await client.get(url_for(1))
        before = (await client.get(url_for(1))).headers["x-cache"]
        shutil.rmtree(cache_dir)
        cache_dir.write_text("the directory is gone; a file took its place")
        during = [await timed_get(client, url_for(i % 3)) for i in range(6)]
        cache_dir.unlink()
        cache_dir.mkdir()
        time.sleep(0.6)  # past cache_retry_after
        after = [(await client.get(url_for(9))).headers["x-cache"] for _ in range(2)]
        failures = cache_of(adapter).store.failures
    states = [r.headers["x-cache"] for r, _ in during]
    assert before == "HIT"
    assert [r.status_code for r, _ in during] == [200] * 6
    assert set(states) <= {"MISS", "BYPASS"} and "BYPASS" in states
    assert max(t for _, t in during) < 1.5
    assert failures >= 1
    assert after == ["MISS", "HIT"]  # usable again: entries are stored and read


def test_a_file_cache_write_that_fails_raises_instead_of_claiming_success(tmp_path):
    cache = FileSystemCache(str(tmp_path / "c"), threshold=100)
    assert cache.set("k", b"v") is True
    shutil.rmtree(tmp_path / "c")
    with pytest.raises(OSError, match="could not write a cache file"):
        cache.set("k", b"v")
