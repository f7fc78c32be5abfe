"""AGGREGATOR_HTTP1_PARSER=h11-mypyc: Hypercorn on the compiled h11 fork, only when it passes
its checks, and answering every raw request byte for byte as it does on stock h11.

The conformance part sends the same raw requests (well-formed, pipelined, HTTP/1.0, chunked,
100-continue, and framing a server must refuse) to two real Hypercorn servers, one per parser,
and compares what comes back with the per-request parts (Date, request id, timings) masked.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h11
import httpx
import pytest

from aggregator.demo.process import DemoProcess, free_port
from aggregator.ops import http1
from aggregator.settings import Settings, SettingsError
from aggregator.status import parser_in_use
from tests.support.configs import five_sources_config
from tests.support.paths import ROOT
from tests.support.servers import Server, start_hypercorn, wait_healthy

h11_mypyc = pytest.importorskip("h11_mypyc")


@pytest.fixture
def restore_parser() -> Iterator[None]:
    protocol = importlib.import_module("hypercorn.protocol.h11")
    before = protocol.h11
    yield
    vars(protocol)["h11"] = before


# -- choosing the parser, in one process -----------------------------------------------------------


def test_the_compiled_parser_is_what_hypercorn_then_uses(restore_parser):
    choice = http1.use_parser("h11-mypyc")
    assert choice.used == "h11-mypyc" and not choice.fell_back
    assert choice.line == f"HTTP/1.1 parser: h11-mypyc {http1.PINNED_MYPYC} (compiled)"
    assert importlib.import_module("hypercorn.protocol.h11").h11 is h11_mypyc
    assert parser_in_use() == "h11-mypyc"
    assert sys.modules["h11"] is h11  # httpcore and the rest keep stock h11
    back = http1.use_parser("h11")
    assert back.used == "h11" and importlib.import_module("hypercorn.protocol.h11").h11 is h11
    assert parser_in_use() == "h11"


def _unlike_h11() -> Any:
    """Stock h11 with a Connection that reads every request target as `/other`."""

    class Connection(h11.Connection):
        def next_event(self) -> Any:
            event = super().next_event()
            if isinstance(event, h11.Request):
                return h11.Request(method=event.method, target="/other", headers=event.headers)
            return event

    return SimpleNamespace(**{**vars(h11), "Connection": Connection})


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        ("missing", "it is not installed (pip install 'aggregator[fast]')"),
        ("version", "0.18.0 is installed, only 0.17.0 is tested"),
        ("not compiled", "it is not the compiled build (no extension modules)"),
        ("reads unlike h11", "it reads a GET unlike h11"),
    ],
)
def test_a_compiled_parser_failing_a_check_falls_back_to_stock_h11(
    restore_parser, monkeypatch, break_it, reason
):
    stock_version = importlib.metadata.version("h11")
    if break_it == "missing":

        def version(name: str) -> str:
            raise importlib.metadata.PackageNotFoundError(name)

        monkeypatch.setattr(importlib.metadata, "version", version)
    elif break_it == "version":
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.18.0")
    elif break_it == "not compiled":
        connection = importlib.import_module("h11_mypyc._connection")
        monkeypatch.setattr(connection, "__file__", str(connection.__file__).replace(".so", ".py"))
    else:
        real = importlib.import_module

        def import_module(name: str) -> Any:
            return _unlike_h11() if name == "h11_mypyc" else real(name)

        monkeypatch.setattr(importlib, "import_module", import_module)
        monkeypatch.setattr(importlib.import_module("h11_mypyc._connection"), "__file__", "x.so")
    choice = http1.use_parser("h11-mypyc")
    assert choice.fell_back and choice.used == "h11"
    assert choice.line.startswith(f"AGGREGATOR_HTTP1_PARSER=h11-mypyc: {reason}")
    assert choice.line.endswith(f"; serving with h11 {stock_version}")
    assert importlib.import_module("hypercorn.protocol.h11").h11 is h11
    assert parser_in_use() == "h11"


def test_an_unknown_parser_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("AGGREGATOR_HTTP1_PARSER", "httptools")
    with pytest.raises(SettingsError) as caught:
        Settings()
    message = str(caught.value)
    assert "AGGREGATOR_HTTP1_PARSER='httptools'" in message and "\n" not in message
    assert message.endswith("expected one of h11, h11-mypyc")


# -- served: the setting reaches every worker -----------------------------------------------------


def _serve(tmp_path: Path, demo: DemoProcess, *, workers: int, hide_compiled: bool) -> Server:
    """`aggregator serve` with AGGREGATOR_HTTP1_PARSER=h11-mypyc; `hide_compiled`: in a
    process where h11_mypyc cannot be imported (installed, but unusable)."""
    config = tmp_path / "config.toml"
    config.write_text(five_sources_config(demo.url, delay=0.01))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    env.update(AGGREGATOR_HTTP1_PARSER="h11-mypyc", AGGREGATOR_CACHE_TYPE="null")
    hide = "import sys; sys.modules['h11_mypyc'] = None; " if hide_compiled else ""
    python = [sys.executable, "-c", f"{hide}from aggregator.ops.cli import main; main()"]
    args = ["serve", "--config", str(config), "-w", str(workers), "--bind", f"127.0.0.1:{port}"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*python, *args],
            cwd=ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", popen, log)
    try:
        wait_healthy(server.url, popen, log)
    except RuntimeError:
        server.stop()
        raise
    return server


def _parsers_of_workers(server: Server, n: int) -> dict[int, str]:
    """Worker pid -> the parser its /status names, from fresh connections until `n` answered."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 30
    while len(seen) < n and time.monotonic() < deadline:
        with httpx.Client(trust_env=False, timeout=10) as client:  # a new connection each
            body = client.get(f"{server.url}/status").json()
        seen[body["worker"]] = body["http1_parser"]
    assert len(seen) == n, f"only {seen} answered:\n{server.log()}"
    return seen


@pytest.mark.integration
def test_serve_announces_the_compiled_parser_and_every_worker_uses_it(demo, tmp_path):
    server = _serve(tmp_path, demo, workers=2, hide_compiled=False)
    try:
        assert set(_parsers_of_workers(server, 2).values()) == {"h11-mypyc"}
        assert "HTTP/1.1 parser: h11-mypyc 0.17.0 (compiled)" in server.log()
    finally:
        server.stop()


@pytest.mark.integration
def test_serve_with_an_unusable_compiled_parser_says_so_once_and_serves_with_h11(demo, tmp_path):
    server = _serve(tmp_path, demo, workers=1, hide_compiled=True)
    try:
        assert set(_parsers_of_workers(server, 1).values()) == {"h11"}
        r = httpx.get(f"{server.url}/api/five?city=Oslo&user_id=1", trust_env=False, timeout=10)
        assert r.status_code == 200
        said = [line for line in server.log().splitlines() if "AGGREGATOR_HTTP1_PARSER" in line]
        assert said == [
            "AGGREGATOR_HTTP1_PARSER=h11-mypyc: it does not import (import of h11_mypyc halted; "
            f"None in sys.modules); serving with h11 {importlib.metadata.version('h11')}"
        ]
        assert "Traceback" not in server.log()
    finally:
        server.stop()


@pytest.mark.integration
def test_stock_h11_is_what_ships(demo, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(five_sources_config(demo.url, delay=0.01))
    server = start_hypercorn(tmp_path, config)
    try:
        assert httpx.get(f"{server.url}/status", trust_env=False).json()["http1_parser"] == "h11"
    finally:
        server.stop()


# -- conformance: the same bytes back for the same raw request ------------------------------------


@pytest.fixture(scope="module")
def both_servers(
    demo: DemoProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    workdir = tmp_path_factory.mktemp("http1-parsers")
    config = workdir / "config.toml"
    config.write_text(five_sources_config(demo.url, delay=0.01))
    servers: dict[str, Server] = {}
    try:
        servers["h11"] = start_hypercorn(workdir, config, request_body_timeout="1")
        servers["h11-mypyc"] = start_hypercorn(
            workdir, config, request_body_timeout="1", http1_parser="h11-mypyc"
        )
        for name, server in servers.items():
            used = httpx.get(f"{server.url}/status", trust_env=False).json()["http1_parser"]
            assert used == name, server.log()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


H = b"Host: t\r\n"
C = b"Connection: close\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
PURGE = b"POST /admin/purge HTTP/1.1\r\n" + H
#: name -> the raw bytes sent on one connection (each ends by closing, or asks the server to).
CASES: dict[str, bytes] = {
    "get": b"GET /healthz HTTP/1.1\r\n" + H + C + b"\r\n",
    "head": b"HEAD /healthz HTTP/1.1\r\n" + H + C + b"\r\n",
    "not found": b"GET /nowhere?a=1 HTTP/1.1\r\n" + H + C + b"\r\n",
    "bad parameter": b"GET /api/five?city=Paris&user_id=x HTTP/1.1\r\n" + H + C + b"\r\n",
    "pipelined": (
        b"GET /healthz HTTP/1.1\r\n" + H + b"\r\n"
        b"GET /readyz HTTP/1.1\r\n" + H + b"\r\n"
        b"GET /nowhere HTTP/1.1\r\n" + H + C + b"\r\n"
    ),
    "http/1.0": b"GET /healthz HTTP/1.0\r\n\r\n",
    "http/1.0 keep-alive": (
        b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n"
    ),
    "chunked post": PURGE + CHUNKED + C + b"\r\n5\r\nhello\r\n0\r\n\r\n",
    "chunk extensions and trailers": (
        PURGE + CHUNKED + C + b"\r\n5;name=v\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
    ),
    "expect 100-continue": (
        PURGE + b"Content-Length: 2\r\nExpect: 100-continue\r\n" + C + b"\r\n{}"
    ),
    "absolute-form target": b"GET http://t/healthz HTTP/1.1\r\n" + H + C + b"\r\n",
    "percent-encoded query": (
        b"GET /api/five?city=S%C3%A3o%20Paulo&user_id=%37x HTTP/1.1\r\n" + H + C + b"\r\n"
    ),
    "header case and spaces": (
        b"GET /healthz HTTP/1.1\r\nhOsT:   t  \r\nX-Odd:\t v \r\n" + C + b"\r\n"
    ),
    "bare LF line ends": b"GET /healthz HTTP/1.1\nHost: t\nConnection: close\n\n",
    # Refused by the parser: each must be refused the same way.
    "no host": b"GET /healthz HTTP/1.1\r\n" + C + b"\r\n",
    "two hosts": b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "space in a header name": b"GET /healthz HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n",
    "obsolete line folding": b"GET /healthz HTTP/1.1\r\n" + H + C + b"X-A: a\r\n b\r\n\r\n",
    "control byte in the target": b"GET /\x00 HTTP/1.1\r\n" + H + b"\r\n",
    "garbage request line": b"HELLO\r\n\r\n",
    "unknown version": b"GET /healthz HTTP/3.7\r\n" + H + C + b"\r\n",
    "content-length and chunked": PURGE + b"Content-Length: 3\r\n" + CHUNKED + C + b"\r\n0\r\n\r\n",
    "two content-lengths": PURGE + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "negative content-length": PURGE + b"Content-Length: -1\r\n\r\n",
    "bad chunk size": PURGE + CHUNKED + b"\r\nzz\r\nhello\r\n0\r\n\r\n",
    "unknown transfer-encoding": PURGE + b"Transfer-Encoding: gzip\r\n\r\n",
    "header block too large": b"GET /healthz HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 20_000,
    "request line too long": b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n" + H + C + b"\r\n",
}

#: Parts that differ between any two answers: the date, the request id, timings, worker pids.
_MASKS = [
    (re.compile(rb"(?im)^date: [^\r\n]*"), b"date: *"),
    (re.compile(rb"(?im)^x-request-id: [^\r\n]*"), b"x-request-id: *"),
    (re.compile(rb"(?im)^server-timing: [^\r\n]*"), b"server-timing: *"),
    (re.compile(rb'"request_id": ?"[^"]*"'), b'"request_id":"*"'),
]


def _exchange(server: Server, data: bytes) -> bytes:
    """Send `data` on one connection; everything the server sends until it closes (or resets)."""
    received = b""
    with socket.create_connection(server.address, timeout=15) as sock:
        sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    for pattern, replacement in _MASKS:
        received = pattern.sub(replacement, received)
    return received


@pytest.mark.integration
@pytest.mark.parametrize("case", list(CASES))
def test_both_parsers_answer_a_raw_request_byte_for_byte_alike(both_servers, case):
    stock = _exchange(both_servers["h11"], CASES[case])
    compiled = _exchange(both_servers["h11-mypyc"], CASES[case])
    assert stock.startswith(b"HTTP/1."), stock[:200]  # an answer, not a silent close
    assert compiled == stock


@pytest.mark.integration
def test_the_conformance_cases_cover_both_accepted_and_refused_requests(both_servers):
    stock = both_servers["h11"]
    statuses = {case: int(_exchange(stock, data).split(b" ", 2)[1]) for case, data in CASES.items()}
    assert statuses["get"] == 200 and statuses["pipelined"] == 200
    assert _exchange(stock, CASES["pipelined"]).count(b"HTTP/1.1 ") == 3  # each answered
    assert b"HTTP/1.1 100 " in _exchange(stock, CASES["expect 100-continue"])
    assert {statuses[c] for c in ("no host", "two hosts", "garbage request line")} == {400}
    assert statuses["header block too large"] in (400, 431)
    assert sum(status >= 400 for status in statuses.values()) >= 12
