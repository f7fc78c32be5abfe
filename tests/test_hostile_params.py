"""Parameters that try to leave their URL segment, over the wire into real Hypercorn, on both
upstream engines: each is refused (400 naming it) or percent-encoded, and the demo upstream's
recorder shows every upstream request at the expected host with exactly one path segment and
one query value; a canary listener, named in the hostile values, is never contacted."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode

import httpx
import pytest

from aggregator.demo.process import DemoProcess
from aggregator.params import MAX_PARAM_LENGTH
from aggregator.settings import Engine
from tests.support.demo import reset_demo
from tests.support.servers import Server

pytestmark = pytest.mark.integration

#: What an upstream request may look like: the echo route, one encoded segment, one query value.
#: `quote(safe="")` leaves only unreserved characters; dots are encoded in the path too.
EXPECTED_PATH = re.compile(r"/echo/(?P<segment>[A-Za-z0-9%_~-]+)\?(?P<query>q=[A-Za-z0-9%._~-]+)")
#: The harness's own calls to the demo, not made by the aggregator.
HARNESS_PATHS = {"/_reset", "/_requests", "/_stats", "/healthz"}


class Canary:
    """A listener on a free loopback port that counts connections; nobody should ever call it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    listener = Canary()
    yield listener
    listener.close()


def hostile_values(canary: Canary) -> list[str]:
    elsewhere = f"127.0.0.1:{canary.port}"
    return [
        "../",
        "..",
        ".",
        "%2e%2e%2f",  # arrives literally (the client sent %252e...): must not be decoded again
        "..%2F..%2F_stats",
        "../../_stats?delay=5",
        f"@{elsewhere}",
        f"user:pass@{elsewhere}",
        f"//{elsewhere}/x",
        f"http://{elsewhere}/",
        "#fragment",
        "?q=other&delay=5",
        "a&q=second",
        f"a\r\nHost: {elsewhere}\r\nX-Injected: 1",
        "\x00",
        "a\\b",
        "Zürich 東京 🙂",
        "x" * MAX_PARAM_LENGTH,  # as long as a parameter may be
    ]


def echo_config(demo: DemoProcess) -> str:
    return f"""
[upstreams.echo]
url = "{demo.url}/echo/{{city}}?q={{topic}}"
timeout = 5.0

[aggregates.echo]
path = "/api/echo"
sources = ["echo"]
params = {{ city = "str", topic = "str" }}
"""


def received(demo: DemoProcess) -> list[dict[str, str]]:
    """What reached the demo since the last reset, without the harness's own calls."""
    listed = httpx.get(f"{demo.url}/_requests", trust_env=False).json()["requests"]
    return [r for r in listed if r["raw_path"] not in HARNESS_PATHS]


def assert_contained(request: dict[str, str], demo: DemoProcess) -> tuple[str, str]:
    """The upstream request went to the demo's echo route with one segment and one value."""
    assert request["host"] == f"127.0.0.1:{demo.port}", request
    assert request["method"] == "GET"
    match = EXPECTED_PATH.fullmatch(request["raw_path"])
    assert match, request["raw_path"]
    (value,) = parse_qs(match["query"], keep_blank_values=True)["q"]
    return unquote(match["segment"]), value


@pytest.mark.parametrize("engine", ["aiohttp", "httpx"])
def test_hostile_parameters_reach_only_the_configured_host_and_path(
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
    canary: Canary,
    engine: Engine,
) -> None:
    server = serve(write_config(echo_config(demo)), engine=engine)
    values = hostile_values(canary)
    reset_demo(demo)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        answers = [
            client.get("/api/echo", params={"city": value, "topic": value}) for value in values
        ]
        # Escapes the client made itself, decoded by the server into the same hostile values.
        raw_dots = client.get("/api/echo?city=%2e%2e%2f&topic=%2E%2E%2F")
        raw_crlf = client.get("/api/echo?city=a%0d%0aX-Injected:%201&topic=%0D%0A")
        bad_utf8 = client.get("/api/echo?city=%ff%fe&topic=%c3")
    seen = received(demo)

    labels = [*values, "raw %2e%2e%2f", "raw %0d%0a", "raw %ff"]
    everything = [*answers, raw_dots, raw_crlf, bad_utf8]
    for value, answer in zip(labels, everything, strict=True):
        # A line break in the path is a 404 from the demo's router (nothing matches it there):
        # the only source failed, hence a 502. Either way the envelope says what happened.
        assert answer.status_code in (200, 502), (value, answer.text)
        assert answer.json()["sources"]["echo"]["status"] in ("ok", "http_status")
    assert [assert_contained(r, demo) for r in seen[: len(values)]] == [(v, v) for v in values]
    extra = [assert_contained(r, demo) for r in seen[len(values) :]]
    assert extra == [("../", "../"), ("a\r\nX-Injected: 1", "\r\n"), ("\ufffd\ufffd", "\ufffd")]
    assert [r.status_code for r in (raw_dots, bad_utf8)] == [200, 200]
    assert canary.connections == 0


@pytest.mark.parametrize("field", ["city", "topic"])
def test_a_too_long_parameter_is_a_400_naming_it_and_calls_nothing(
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
    field: str,
) -> None:
    server = serve(write_config(echo_config(demo)))
    params = {"city": "Paris", "topic": "news", field: "x" * (MAX_PARAM_LENGTH + 1)}
    reset_demo(demo)

    r = httpx.get(f"{server.url}/api/echo?{urlencode(params)}", trust_env=False, timeout=10)

    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.json()["field"] == field
    assert str(MAX_PARAM_LENGTH) in r.json()["message"]
    assert received(demo) == []


def test_raw_non_ascii_or_line_breaks_in_the_request_line_are_refused_by_h11(
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
) -> None:
    server = serve(write_config(echo_config(demo)))
    reset_demo(demo)
    statuses = []
    for target in ("/api/echo?city=Zürich&topic=a", "/api/echo?city=a b&topic=a"):
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            statuses.append(sock.recv(1024).split(b" ")[1])

    assert statuses == [b"400", b"400"]
    assert received(demo) == []
