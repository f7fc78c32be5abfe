"""Hostile HTTP on raw sockets against real Hypercorn: huge or numerous headers, huge, lying or
stalled bodies, idle and slow-head connections. Each is refused (400/408/413/431, or closed)
before Flask sees it in full, and the worker stays healthy with bounded memory.

One server for the module (`request_body_timeout` 1 s to keep the stalls short); each test
checks that a normal request still succeeds afterwards.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from hypercorn.config import Config

from aggregator.demo.process import DemoProcess
from aggregator.ops import serve as ops_serve
from tests.support.configs import five_sources_config
from tests.support.demo import demo_stats, reset_demo
from tests.support.paths import ROOT
from tests.support.servers import Server, start_hypercorn

pytestmark = pytest.mark.integration

BODY_TIMEOUT = 1.0
MIB = 1024 * 1024
AGGREGATE = b"GET /api/five?city=Paris&user_id=7 HTTP/1.1\r\nHost: t\r\n"
CHUNKED_POST = b"POST /admin/purge HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture(scope="module")
def module_server(demo: DemoProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module's tests (conftest's `server` is one per test)."""
    workdir = tmp_path_factory.mktemp("hostile-http")
    config = workdir / "config.toml"
    config.write_text(five_sources_config(demo.url, delay=0.01))
    started = start_hypercorn(workdir, config, request_body_timeout=str(BODY_TIMEOUT))
    yield started
    started.stop()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(server: Server, timeout: float = 15.0) -> socket.socket:
    return socket.create_connection(server.address, timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def parse(data: bytes) -> list[RawResponse]:
    """The HTTP/1.1 responses in `data`, in order (bodies framed by Content-Length)."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        responses.append(RawResponse(status, headers, rest[:length]))
        data = rest[length:]
    return responses


def exchange(server: Server, request: bytes) -> tuple[list[RawResponse], float]:
    """Send `request` whole, read until the server closes; the responses and the time taken."""
    started = time.monotonic()
    with connect(server) as sock:
        sock.sendall(request)
        data = read_all(sock)
    return parse(data), time.monotonic() - started


def assert_healthy(server: Server) -> None:
    """A normal request on a new connection still gets a full answer."""
    r = httpx.get(f"{server.url}/api/five?city=Oslo&user_id=1", trust_env=False, timeout=10)
    assert r.status_code == 200 and r.json()["complete"] is True


def assert_refused(response: RawResponse, status: int, error: str) -> None:
    """The adapter's own JSON refusal, closing the connection."""
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert response.json()["error"] == error


# -- headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"X-A: 1\r\n" * 1000, id="1000-duplicates"),
        pytest.param(b"Cookie: a=b\r\n" * 1000, id="1000-cookies"),
        pytest.param(b"".join(b"X-H%d: 1\r\n" % i for i in range(150)), id="150-distinct"),
        pytest.param(b"X-Big: " + b"a" * 20 * 1024 + b"\r\n", id="20-kib-block-sent-whole"),
    ],
)
def test_too_many_or_too_large_headers_are_431_before_flask(module_server, demo, extra):
    reset_demo(demo)

    (response,), took = exchange(module_server, AGGREGATE + extra + b"\r\n")

    assert_refused(response, 431, "Request Header Fields Too Large")
    assert "100 headers" in response.json()["message"]
    assert demo_stats(demo)["total_requests"] == 0  # the aggregate never ran
    assert took < 5
    assert_healthy(module_server)


def test_a_header_block_arriving_in_pieces_is_cut_by_h11(module_server, demo):
    reset_demo(demo)
    with connect(module_server) as sock:
        sock.sendall(AGGREGATE + b"X-Big: " + b"a" * 10 * 1024)
        time.sleep(0.2)  # h11 now holds an incomplete head of 10 KiB
        sock.sendall(b"a" * 10 * 1024 + b"\r\n\r\n")
        (response,) = parse(read_all(sock))

    assert response.status == 431  # h11's own answer (h11_max_incomplete_size), no body
    assert demo_stats(demo)["total_requests"] == 0
    assert_healthy(module_server)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(f"x-h{i}", "1") for i in range(150)], id="150-headers"),
        pytest.param([("x-big", "a" * 20 * 1024)], id="20-kib-header"),
    ],
)
def test_header_limits_hold_over_cleartext_http2(module_server, demo, headers):
    # Hypercorn speaks h2 to any client that opens with the HTTP/2 preface (prior knowledge).
    reset_demo(demo)
    with httpx.Client(http1=False, http2=True, trust_env=False, timeout=10) as client:
        refused = client.get(f"{module_server.url}/api/five?city=Paris&user_id=7", headers=headers)
        fine = client.get(f"{module_server.url}/api/five?city=Paris&user_id=7")

    assert refused.http_version == "HTTP/2"
    assert refused.status_code == 431
    assert refused.json()["error"] == "Request Header Fields Too Large"
    assert fine.status_code == 200
    assert demo_stats(demo)["total_requests"] == 5  # only the fine request fanned out


# -- bodies --------------------------------------------------------------------------------------


def test_a_declared_20_mib_body_is_413_before_a_byte_is_sent(module_server):
    head = b"POST /admin/purge HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    with connect(module_server) as sock:
        started = time.monotonic()
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % (20 * MIB))
        (response,) = parse(read_all(sock))  # no body byte was sent
        took = time.monotonic() - started

    assert_refused(response, 413, "Payload Too Large")
    assert took < 5
    assert_healthy(module_server)


def stream_body(sock: socket.socket, total: int, sent: list[int]) -> None:
    """Send `total` bytes of chunked body, counting what went out, until the server hangs up."""
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    try:
        while sent[0] < total:
            sock.sendall(chunk)
            sent[0] += 64 * 1024
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server closed after its 413: the point


def test_a_streamed_20_mib_body_is_cut_at_the_limit(module_server):
    sent = [0]
    with connect(module_server) as sock:
        sock.sendall(CHUNKED_POST)
        sender = threading.Thread(target=stream_body, args=(sock, 20 * MIB, sent), daemon=True)
        sender.start()
        data = read_all(sock)
        sender.join(10)

    (response,) = parse(data)
    assert_refused(response, 413, "Payload Too Large")
    assert sent[0] < 20 * MIB  # refused mid-stream, not after reading it all
    assert_healthy(module_server)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /admin/purge HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{}",
            id="content-length-larger-than-the-body",
        ),
        pytest.param(
            CHUNKED_POST + b"2\r\n{}\r\n",
            id="chunked-body-that-stops",
        ),
        pytest.param(
            b"POST /admin/purge HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n",
            id="no-body-at-all",
        ),
    ],
)
def test_a_stalled_body_is_408_after_the_body_timeout(module_server, request_bytes):
    (response,), took = exchange(module_server, request_bytes)

    assert_refused(response, 408, "Request Timeout")
    assert BODY_TIMEOUT * 0.9 < took < BODY_TIMEOUT + 4
    assert_healthy(module_server)


def test_a_content_length_shorter_than_the_body_gives_flask_only_what_it_declared(module_server):
    # Flask reads the 2 declared bytes ({}); the rest is read as the next request: not HTTP.
    request = b"POST /admin/purge HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}garbage\r\n\r\n"

    first, second = exchange(module_server, request)[0]

    assert first.status == 404  # the admin endpoints are disabled here; the body never mattered
    assert second.status == 400 and second.body == b""  # h11: not a request line
    assert_healthy(module_server)


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        pytest.param(b"Content-Length: 1\r\nContent-Length: 2\r\n", 400, id="conflicting-lengths"),
        pytest.param(b"Content-Length: -1\r\n", 400, id="negative-length"),
        pytest.param(b"Content-Length: 1e3\r\n", 400, id="non-numeric-length"),
        pytest.param(b"Transfer-Encoding: gzip\r\n", 501, id="unsupported-transfer-encoding"),
        pytest.param(b"Host: other\r\n", 400, id="two-host-headers"),
    ],
)
def test_malformed_framing_is_refused_by_h11(module_server, demo, framing, status):
    reset_demo(demo)

    (response,), _ = exchange(module_server, AGGREGATE + framing + b"\r\n")

    assert response.status == status
    assert demo_stats(demo)["total_requests"] == 0
    assert_healthy(module_server)


# -- connections ---------------------------------------------------------------------------------


def wait_closed(sock: socket.socket, trickle: bool, closed: dict[int, float]) -> None:
    """Block until the server closes `sock` (sending one header byte per 0.3 s if `trickle`)."""
    started = time.monotonic()
    sock.settimeout(0.3)
    try:
        if trickle:
            sock.sendall(AGGREGATE)
        while time.monotonic() - started < 30:
            try:
                if not sock.recv(1024):
                    break
            except TimeoutError:
                if trickle:
                    sock.sendall(b"X")
    except OSError:
        pass  # reset: closed too
    closed[sock.fileno()] = time.monotonic() - started


def test_idle_and_slow_head_connections_are_closed_after_the_keep_alive_timeout(module_server):
    keep_alive = Config.from_toml(ROOT / "hypercorn.toml").keep_alive_timeout
    sockets = [connect(module_server) for _ in range(100)]
    closed: dict[int, float] = {}
    watchers = [
        threading.Thread(target=wait_closed, args=(s, i < 5, closed), daemon=True)
        for i, s in enumerate(sockets)
    ]
    for watcher in watchers:
        watcher.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        assert_healthy(module_server)  # served while 100 sockets hang around
        served_in = time.monotonic() - started
        for watcher in watchers:
            watcher.join(keep_alive + 10)
    finally:
        for s in sockets:
            s.close()

    assert len(closed) == 100, "the module_server kept some connections open"
    assert max(closed.values()) < keep_alive + 4  # trickling header bytes does not keep one
    assert min(closed.values()) > keep_alive * 0.8
    assert served_in < 3
    assert_healthy(module_server)


# -- the worker afterwards -----------------------------------------------------------------------


def worker_of(server: Server) -> psutil.Process:
    """The Hypercorn worker process (the parent only supervises)."""
    children = psutil.Process(server.popen.pid).children(recursive=True)
    workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1, children
    return workers[0]


def peak_rss(process: psutil.Process) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_hostile_rounds_leave_the_worker_healthy_and_its_memory_bounded(module_server):
    worker = worker_of(module_server)
    assert_healthy(module_server)
    before = peak_rss(worker)
    for _ in range(3):
        threads, sockets = [], []
        for _ in range(4):  # 4 x 20 MiB at once: buffering them would add 80 MiB at the peak
            sock = connect(module_server)
            sockets.append(sock)
            sock.sendall(CHUNKED_POST)
            sender = threading.Thread(target=stream_body, args=(sock, 20 * MIB, [0]), daemon=True)
            reader = threading.Thread(target=read_all, args=(sock,), daemon=True)
            threads += [sender, reader]
            sender.start()
            reader.start()
        exchange(module_server, AGGREGATE + b"X-A: 1\r\n" * 1000 + b"\r\n")
        exchange(module_server, AGGREGATE + b"X-Big: " + b"a" * 60 * 1024 + b"\r\n\r\n")
        exchange(
            module_server, b"POST /admin/purge HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n{"
        )
        for thread in threads:
            thread.join(15)
        for sock in sockets:
            sock.close()
    grown = peak_rss(worker) - before

    assert grown < 24 * MIB, f"worker peak RSS grew {grown / MIB:.1f} MiB over 3 hostile rounds"
    assert_healthy(module_server)
    assert worker.is_running() and worker_of(module_server).pid == worker.pid  # never restarted
    assert "Traceback" not in module_server.log()


# -- the limits as shipped -----------------------------------------------------------------------


def test_hypercorn_toml_and_serve_without_it_set_the_same_limits(monkeypatch, tmp_path):
    shipped = Config.from_toml(ROOT / "hypercorn.toml")
    seen: list[Config] = []

    def fake_run(config: Config) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr("hypercorn.run.run", fake_run)

    assert ops_serve.run_server(tmp_path / "absent.toml", {"bind": None, "workers": None}) == 0

    (config,) = seen
    for attribute, value in ops_serve.SERVER_LIMITS.items():
        assert getattr(shipped, attribute) == value, attribute
        assert getattr(config, attribute) == value, attribute
