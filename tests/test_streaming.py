"""Streamed responses (serving/stream.py), over the wire on real Hypercorn in loop and threads
modes (`aggregator serve --app tests.support.stream_app:app`): chunks sent as produced, async
waits between chunks that leave the loop free, Content-Length kept, close() on every ending,
write() and exc_info, flat memory for a 1 GiB body to a slow reader; in-process: the messages a
buffered and a streamed response make, and the drain cutting an endless stream."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from aggregator import to_asgi
from aggregator.settings import Mode, Settings
from tests.support import stream_app
from tests.support.servers import Server, start_own_app

APP = "tests.support.stream_app:app"
MODES: list[Mode] = ["loop", "threads"]
MiB = 1024 * 1024


@pytest.fixture(scope="module", params=MODES)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Mode, Server]]:
    """The stream app under `aggregator serve --app`, one server per mode for the module."""
    mode: Mode = request.param
    logs = tmp_path_factory.mktemp(f"stream-{mode}")
    server = start_own_app(logs, "aggregator", "serve", "--app", APP, "--mode", mode)
    yield mode, server
    server.stop()


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=10, trust_env=False)


def _connect(server: Server, path: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A raw connection with one `GET path` sent (Connection: close)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(server.address)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    return sock


def _read_to_eof(server: Server, path: str, timeout: float = 5.0) -> bytes:
    """Everything the server sends for `path` until it closes the connection (or `timeout`)."""
    deadline = time.monotonic() + timeout
    data = b""
    with _connect(server, path) as sock:
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            if not piece:
                return data
            data += piece
    raise AssertionError(f"no end of {path} within {timeout} s; got {data[:300]!r}")


def _log_with(server: Server, *texts: str, timeout: float = 3.0) -> str:
    """The server's log once it holds every one of `texts` (lines may be written a little after
    the bytes they describe went out)."""
    deadline = time.monotonic() + timeout
    while True:
        log = server.log()
        if all(text in log for text in texts) or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


async def _stats(client: httpx.AsyncClient, server: Server, name: str) -> dict[str, int]:
    answer = await client.get(f"{server.url}/stats", params={"name": name})
    stats: dict[str, int] = answer.json()
    return stats


async def _closed(
    client: httpx.AsyncClient, server: Server, name: str, timeout: float = 3.0
) -> dict[str, int]:
    """`name`'s stats once its close() has run (fails past `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await _stats(client, server, name)
        if stats["closed"] or time.monotonic() > deadline:
            assert stats["closed"] == 1, stats
            return stats
        await asyncio.sleep(0.05)


async def _timed_chunks(
    client: httpx.AsyncClient, url: str, n: int, **params: Any
) -> tuple[bytes, list[float]]:
    """The body of a /chunks stream and when each of its `n` chunks had arrived."""
    started = time.perf_counter()
    seen: list[float] = []
    body = b""
    async with client.stream("GET", url, params={"n": n, **params}) as response:
        assert response.status_code == 200
        async for data in response.aiter_raw():
            body += data
            while len(seen) < n and f"chunk-{len(seen)};".encode() in body:
                seen.append(time.perf_counter() - started)
    return body, seen


# -- chunks as they are produced ---------------------------------------------------------------


@pytest.mark.integration
async def test_three_chunks_200_ms_apart_arrive_200_ms_apart(served: tuple[Mode, Server]) -> None:
    mode, server = served
    waits = ["async", "block"] if mode == "threads" else ["async"]  # blocking: threads only
    async with _client() as client:
        for wait in waits:
            body, seen = await _timed_chunks(client, f"{server.url}/chunks", 3, gap=0.2, wait=wait)
            gaps = [round(b - a, 3) for a, b in zip(seen, seen[1:], strict=False)]
            assert body == b"chunk-0;chunk-1;chunk-2;"
            assert seen[0] < 0.15, (wait, seen)  # the first chunk did not wait for the others
            assert all(0.15 < gap < 0.6 for gap in gaps), (wait, gaps)


@pytest.mark.integration
async def test_a_generator_awaiting_between_chunks_leaves_the_server_free(
    served: tuple[Mode, Server],
) -> None:
    """`app.ensure_sync(asyncio.sleep)` inside the generator: in loop mode awaited on the loop
    from the request's greenlet, in threads mode from its pool thread; either way other
    requests are answered meanwhile, while the stream's chunks keep arriving."""
    _, server = served
    async with _client() as client:
        stream = asyncio.create_task(
            _timed_chunks(client, f"{server.url}/chunks", 4, gap=0.5, wait="async")
        )
        await asyncio.sleep(0.1)
        latencies = []
        for _ in range(8):
            started = time.perf_counter()
            answer = await client.get(f"{server.url}/async")
            latencies.append(time.perf_counter() - started)
            assert answer.status_code == 200
            await asyncio.sleep(0.05)
        streaming_meanwhile = not stream.done()
        body, seen = await stream
    assert streaming_meanwhile and body == b"chunk-0;chunk-1;chunk-2;chunk-3;"
    assert seen[0] < 0.3, seen  # streamed, not buffered until its end (1.5 s)
    assert max(latencies) < 0.3, latencies  # a loop blocked for each 0.5 s gap would show it


# -- Content-Length, close(), disconnects ------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("first", [10, 2])
async def test_an_overlong_body_is_cut_at_its_content_length_and_closed(
    served: tuple[Mode, Server], first: int
) -> None:
    """Content-Length: 4, then 10 bytes (one chunk, or 2 + 8) and an endless tail."""
    _, server = served
    name = f"overlong-{first}"
    raw = await asyncio.to_thread(_read_to_eof, server, f"/overlong?name={name}&first={first}")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-length: 4\r\n" in head.lower() and body == b"0123"
    async with _client() as client:
        stats = await _closed(client, server, name)
    assert stats["pulls"] <= 2, stats  # never pulled into the endless tail
    assert "its Content-Length of 4 bytes: cut there" in _log_with(server, "cut there")


@pytest.mark.integration
async def test_a_body_shorter_than_its_content_length_closes_the_connection(
    served: tuple[Mode, Server],
) -> None:
    _, server = served
    raw = await asyncio.to_thread(_read_to_eof, server, "/raw/short")  # EOF, not a hang
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-length: 10\r\n" in head.lower() and body == b"abc"
    async with _client() as client:
        await _closed(client, server, "raw-short")
    log = _log_with(server, "GET /raw/short 200 3 B")
    assert "sent 3 of the 10 bytes its Content-Length declares" in log
    assert "GET /raw/short 200 3 B" in log and " short\n" in log


@pytest.mark.integration
async def test_a_client_leaving_mid_stream_stops_the_producer_within_a_chunk(
    served: tuple[Mode, Server],
) -> None:
    mode, server = served
    waits = ["async", "block"] if mode == "threads" else ["async"]
    async with _client() as client:
        for wait in waits:
            name = f"left-{wait}"
            path = f"/endless?name={name}&chunk=1000&gap=0.2&wait={wait}"
            sock = await asyncio.to_thread(_connect, server, path)
            received = b""
            while received.count(b"e") < 2000:  # two chunks
                received += await asyncio.to_thread(sock.recv, 65536)
            sock.close()
            stats = await _closed(client, server, name)
            await asyncio.sleep(0.5)
            later = await _stats(client, server, name)
            chunks = received.count(b"e") // 1000
            assert later == stats, (later, stats)  # stopped: nothing pulled after close()
            assert stats["pulls"] <= chunks + 2, (chunks, stats)
            log = _log_with(server, f"GET {path} 200 ")
            line = next(x for x in log.splitlines() if f"GET {path} 200 " in x)
            assert line.endswith("client left"), line


# -- write() and exc_info ----------------------------------------------------------------------


@pytest.mark.integration
async def test_write_bytes_come_first_and_in_order(served: tuple[Mode, Server]) -> None:
    _, server = served
    async with _client() as client:
        answer = await client.get(f"{server.url}/raw/write")
        assert answer.status_code == 200 and answer.text == "w1;w2;i1;i2;"
        assert answer.headers["x-request-id"]
        await _closed(client, server, "raw-write")


@pytest.mark.integration
async def test_exc_info_replaces_the_head_before_a_byte_and_aborts_after(
    served: tuple[Mode, Server],
) -> None:
    _, server = served
    async with _client() as client:
        replaced = await client.get(f"{server.url}/raw/replace")
        twice = await client.get(f"{server.url}/raw/twice")
    assert replaced.status_code == 500 and replaced.text == "replaced"
    assert replaced.headers["x-replaced"] == "yes" and "x-first" not in replaced.headers
    assert twice.status_code == 500  # start_response twice without exc_info: an app error
    raw = await asyncio.to_thread(_read_to_eof, server, "/raw/late-error")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"partial" in body
    assert not body.endswith(b"0\r\n\r\n")  # no last chunk: the client sees the abort
    assert stream_app.SECRET.encode() not in raw and b"never sent" not in raw
    log = _log_with(server, "GET /raw/late-error 200 7 B")
    assert "response aborted after 7 bytes: the app raised mid-stream" in log
    assert "GET /raw/late-error 200 7 B" in log and " aborted\n" in log


# -- back-pressure ------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_1_gib_stream_to_a_slow_reader_keeps_the_worker_rss_flat(
    served: tuple[Mode, Server],
) -> None:
    """Read slowly for 10 s, then leave: the worker (one, in the serving process itself) grows
    by a few MiB at most, and produced no more than the socket buffers hold beyond what was
    read."""
    mode, server = served
    worker = psutil.Process(server.popen.pid)
    assert not worker.children(), "expected one worker served in the process itself"
    _read_to_eof(server, "/big?name=warm&size=4194304")  # the code paths warmed, once
    base = worker.memory_info().rss
    name = f"big-{mode}"
    read = peak = 0
    with _connect(server, f"/big?name={name}&size={1024 * MiB}", rcvbuf=64 * 1024) as sock:
        until = time.monotonic() + 10
        sampled = 0.0
        while time.monotonic() < until:
            read += len(sock.recv(65536))
            time.sleep(0.005)  # at most ~12 MiB/s
            if time.monotonic() - sampled > 0.25:
                sampled = time.monotonic()
                peak = max(peak, worker.memory_info().rss)
        with httpx.Client(trust_env=False, timeout=10) as client:
            produced = client.get(f"{server.url}/stats", params={"name": name}).json()["bytes"]
    growth = (peak - base) / MiB
    ahead = (produced - read) / MiB
    print(
        f"\n{mode}: read {read / MiB:.0f} MiB in 10 s, produced {ahead:.1f} MiB ahead, "
        f"RSS {base / MiB:.1f} MiB at start, peak {growth:+.1f} MiB"
    )
    assert read > 16 * MiB, read  # it streamed
    assert growth < 20, f"RSS grew {growth:.1f} MiB"
    assert ahead < 16, f"produced {ahead:.1f} MiB beyond what was read"
    deadline = time.monotonic() + 3
    with httpx.Client(trust_env=False, timeout=10) as client:
        while client.get(f"{server.url}/stats", params={"name": name}).json()["closed"] != 1:
            assert time.monotonic() < deadline, "close() did not run after the client left"
            time.sleep(0.05)


# -- in-process: the messages sent, the drain -------------------------------------------------


def _scope(path: str, query: bytes = b"", method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.1"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"t")],
        "client": ("127.0.0.1", 5000),
        "server": ("t", 80),
        "extensions": {},
    }


async def _call(
    adapter: Any, scope: dict[str, Any], sent: list[dict[str, Any]], sent_body: asyncio.Event
) -> None:
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            sent_body.set()

    await adapter(scope, receive, send)


@pytest.mark.parametrize("mode", MODES)
async def test_a_buffered_response_is_one_body_message_and_a_stream_is_one_per_chunk(
    mode: Mode,
) -> None:
    adapter = to_asgi(stream_app.create_app(), settings=Settings(mode=mode))
    async with adapter.lifespan():
        runs: dict[str, list[dict[str, Any]]] = {}
        for label, scope in {
            "buffered": _scope("/async"),
            "head": _scope("/chunks", b"gap=0", method="HEAD"),
            "stream": _scope("/chunks", b"gap=0"),
            "short": _scope("/raw/short-list"),
            "long": _scope("/raw/long-list"),
        }.items():
            runs[label] = []
            await _call(adapter, scope, runs[label], asyncio.Event())
    kinds = {label: [m.get("more_body") for m in msgs[1:]] for label, msgs in runs.items()}
    assert kinds == {
        "buffered": [False],
        "head": [False],
        "stream": [True, True, True, False],
        "short": [True],  # no last message: Hypercorn closes the connection
        "long": [False],
    }, kinds
    assert runs["short"][1]["body"] == b"0123456" and runs["long"][1]["body"] == b"0123"
    assert b"".join(m.get("body", b"") for m in runs["stream"][1:]) == b"chunk-0;chunk-1;chunk-2;"


@pytest.mark.parametrize("mode", MODES)
async def test_the_drain_cuts_an_endless_stream_at_its_bound_and_closes_it(mode: Mode) -> None:
    """A server that sends the lifespan shutdown with a stream still open: the drain waits
    its bound (`drain_timeout`, no engine), cuts the stream, and its close() runs."""
    adapter = to_asgi(stream_app.create_app(), settings=Settings(mode=mode, drain_timeout=0.5))
    name = f"drained-{mode}"
    sent: list[dict[str, Any]] = []
    sent_body = asyncio.Event()
    await adapter.startup()
    request = asyncio.create_task(
        _call(adapter, _scope("/endless", f"name={name}&gap=0.05".encode()), sent, sent_body)
    )
    await asyncio.wait_for(sent_body.wait(), 5)
    assert adapter.in_flight == 1  # a stream counts until it ends
    started = time.perf_counter()
    await asyncio.wait_for(adapter.shutdown(), 10)
    elapsed = time.perf_counter() - started
    assert request.done() and 0.4 < elapsed < 3.0, elapsed
    assert stream_app.STATS[name]["closed"] == 1
    assert sent[-1]["more_body"] is True  # no last message: the connection closes
    assert adapter.in_flight == 0


# -- SIGTERM with a stream open ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
async def test_sigterm_cuts_an_endless_stream_at_graceful_timeout_and_closes_it(
    mode: Mode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graceful = 1.0
    toml = tmp_path / "hypercorn.toml"
    toml.write_text(f'worker_class = "uvloop"\ngraceful_timeout = {graceful}\n')
    closed_file = tmp_path / "closed.txt"
    monkeypatch.setenv("STREAM_APP_CLOSED", str(closed_file))
    server = start_own_app(
        tmp_path,
        "aggregator",
        "serve",
        "--app",
        APP,
        "--mode",
        mode,
        "--hypercorn-config",
        str(toml),
    )
    try:
        sock = await asyncio.to_thread(_connect, server, "/endless?name=endless&gap=0.05")
        with sock:
            assert await asyncio.to_thread(sock.recv, 65536)
            server.popen.send_signal(signal.SIGTERM)
            signalled = time.perf_counter()
            code = await asyncio.to_thread(server.popen.wait, graceful + 8)
            exited = time.perf_counter() - signalled
    finally:
        server.stop()
    assert code == 0, server.log()
    assert graceful - 0.2 < exited < graceful + 4, exited
    assert closed_file.read_text() == "endless\n", server.log()
    assert "GET /endless?name=endless&gap=0.05 200 " in server.log()
