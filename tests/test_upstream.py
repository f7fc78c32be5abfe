"""One upstream call: every failure becomes the right SourceResult kind, and fetch never raises."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import respx
from aiohttp import web
from aiohttp.test_utils import TestServer
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient

from aggregator.config import parse_config
from aggregator.demo.process import DemoProcess
from aggregator.errors import UpstreamInvalidPayloadError
from aggregator.settings import Engine, Settings
from aggregator.upstream import UpstreamClients, checks, fetch
from aggregator.upstream.engines import build_client
from tests.support.clients import ENGINES, closed_port, upstream

BASE = "http://upstream.test"
SECRET = "s3cr3t-T0KEN-value"
WEATHER = "aggregator.demo.models:Weather"
STOCKS = "aggregator.demo.models:Stocks"


# --- failures against the real demo upstream, on both engines ----------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "kind", "upstream_status", "detail"),
    [
        pytest.param("/weather/Paris?status=503", "http_status", 503, "HTTP 503", id="503"),
        pytest.param("/weather/Paris?status=404", "http_status", 404, "HTTP 404", id="404"),
        pytest.param("/weather/Paris?status=500", "http_status", 500, "HTTP 500", id="500"),
        pytest.param("/stocks/seven", "http_status", 404, "HTTP 404", id="demo-404"),
        pytest.param("/weather/Paris?invalid=1", "invalid_json", None, "not valid JSON", id="cut"),
        pytest.param("/weather/Paris?html=1", "invalid_json", None, "text/html, not", id="html"),
        pytest.param(
            "/weather/Paris?size=200000", "too_large", None, "larger than 10000", id="too-large"
        ),
    ],
)
async def test_demo_failure_kinds(
    demo: DemoProcess,
    engine_client: httpx.AsyncClient,
    path: str,
    kind: str,
    upstream_status: int | None,
    detail: str,
) -> None:
    result = await fetch(engine_client, "src", upstream(demo.url + path), {}, max_body=10_000)

    assert result.status == kind
    assert result.upstream_status == upstream_status
    assert result.detail is not None
    assert detail in result.detail
    assert result.data is None
    assert not result.ok
    assert result.name == "src"
    assert result.ms < 5000  # a prompt answer, far from any timeout (timing: test_ms_is_...)


@pytest.mark.integration
async def test_demo_success_is_validated(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    config = upstream(f"{demo.url}/weather/{{city}}", schema=WEATHER)

    result = await fetch(engine_client, "weather", config, {"city": "Paris"}, max_body=10_000)

    assert result.ok, result
    assert result.data["city"] == "Paris"
    assert set(result.data) == {"city", "temperature_c", "conditions", "updated_at"}
    assert (result.detail, result.upstream_status, result.locations) == (None, None, [])


@pytest.mark.integration
async def test_demo_wrong_shape_reports_pydantic_locations(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    config = upstream(f"{demo.url}/stocks/{{user_id}}?shape=wrong", schema=STOCKS)

    result = await fetch(engine_client, "stocks", config, {"user_id": 7}, max_body=10_000)

    assert result.status == "validation"
    assert result.locations == ["user_id", "quotes"]
    assert result.detail == "the payload does not match Stocks (2 errors)"
    assert result.data is None


@pytest.mark.integration
async def test_demo_nested_validation_locations(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    config = upstream(
        f"{demo.url}/recommendations/7?shape=wrong",
        schema="aggregator.demo.models:Recommendations",
    )

    result = await fetch(engine_client, "reco", config, {}, max_body=10_000)

    assert result.status == "validation"
    assert "items.0.title" in result.locations
    assert "items.0.score" in result.locations


@pytest.mark.integration
async def test_too_large_by_content_length_stops_before_the_body(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    # The body would drip for 5 s: answering at once proves only the header was read.
    config = upstream(f"{demo.url}/weather/Paris?size=500000&drip=5", timeout=4.0)
    started = time.monotonic()

    result = await fetch(engine_client, "big", config, {}, max_body=10_000)

    assert result.status == "too_large"
    assert time.monotonic() - started < 2.0


@pytest.mark.integration
async def test_body_at_the_limit_is_accepted(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    result = await fetch(
        engine_client, "w", upstream(f"{demo.url}/weather/Paris?size=5000"), {}, max_body=5000
    )

    assert result.ok, result
    assert len(result.data["padding"]) > 4000


@pytest.mark.integration
async def test_dripping_body_times_out_on_the_total_timeout(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    # Every chunk arrives well within a read timeout; only the total bound can stop this.
    config = upstream(f"{demo.url}/weather/Paris?drip=5", timeout=0.5)
    started = time.monotonic()

    result = await fetch(engine_client, "drip", config, {}, max_body=10_000)

    elapsed = time.monotonic() - started
    assert result.status == "timeout"
    assert result.detail == "no full answer within 0.5 s"
    assert elapsed < 2.5
    assert 400 <= result.ms < 2500


@pytest.mark.integration
async def test_slow_headers_time_out(demo: DemoProcess, engine_client: httpx.AsyncClient) -> None:
    config = upstream(f"{demo.url}/weather/Paris?delay=5", timeout=0.3)
    started = time.monotonic()

    result = await fetch(engine_client, "slow", config, {}, max_body=10_000)

    assert result.status == "timeout"
    assert time.monotonic() - started < 2.5


async def test_closed_port_is_connect(engine_client: httpx.AsyncClient) -> None:
    config = upstream(f"http://127.0.0.1:{closed_port()}/x", timeout=2.0)

    result = await fetch(engine_client, "down", config, {}, max_body=10_000)

    assert result.status == "connect"
    assert result.upstream_status is None
    assert result.ms < 2000


async def test_redirect_is_not_followed(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    respx_mock.get(f"{BASE}/old").respond(302, headers={"Location": f"{BASE}/new"})

    result = await fetch(httpx_client, "r", upstream(f"{BASE}/old"), {}, max_body=10_000)

    assert (result.status, result.upstream_status) == ("http_status", 302)


# --- a body with no Content-Length, larger than the limit --------------------------------------


class EndlessBody:
    """An async byte stream that counts how much of it was pulled."""

    def __init__(self, chunk: int = 1024, limit: int = 20_000) -> None:
        self.chunk = chunk
        self.limit = limit
        self.pulled = 0

    def __aiter__(self) -> EndlessBody:
        return self

    async def __anext__(self) -> bytes:
        if self.pulled >= self.limit:
            raise StopAsyncIteration
        self.pulled += 1
        return b" " * self.chunk


@pytest.mark.respx(base_url=BASE)
async def test_streamed_body_over_the_limit_stops_early(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    body = EndlessBody()
    route = respx_mock.get("/big").mock(return_value=httpx.Response(200, content=body))

    result = await fetch(httpx_client, "big", upstream(f"{BASE}/big"), {}, max_body=10_000)

    assert result.status == "too_large"
    assert "content-length" not in route.calls.last.response.headers
    # 10 chunks reach the limit; the 11th passes it. Reading on would pull all 20 000.
    assert body.pulled <= 12


@pytest.fixture
async def endless_server() -> AsyncIterator[tuple[str, list[int]]]:
    """An in-process server streaming a chunked body (no Content-Length) until the client leaves."""
    sent: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        total = 0
        deadline = time.monotonic() + 10
        try:
            await response.write(b'["')
            while time.monotonic() < deadline:
                await response.write(b"x" * 65536)
                total += 65536
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sent.append(total)
        return response

    app = web.Application()
    app.router.add_get("/endless", endless)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/endless")), sent


async def test_chunked_body_over_the_limit_stops_early(
    engine_client: httpx.AsyncClient, endless_server: tuple[str, list[int]]
) -> None:
    url, sent = endless_server
    started = time.monotonic()

    result = await fetch(engine_client, "endless", upstream(url, timeout=8.0), {}, max_body=100_000)

    # The body never ends: only stopping at the limit gives too_large (not timeout) quickly.
    assert result.status == "too_large"
    assert result.detail == "the body is larger than 100000 bytes"
    assert time.monotonic() - started < 5.0
    # And the connection was dropped rather than drained: the server's writes fail soon.
    async with asyncio.timeout(5):
        while not sent:
            await asyncio.sleep(0.01)
    assert sent[0] < 50_000_000


class Chunks:
    """An async byte stream of fixed parts, so httpx does not decode it while building."""

    def __init__(self, *parts: bytes) -> None:
        self.parts = list(parts)

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        if not self.parts:
            raise StopAsyncIteration
        return self.parts.pop(0)


# --- broken HTTP from a raw socket, on both engines ---------------------------------------------


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """Serve one fixed byte string (whatever it is) to every request, then close."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/x"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        pytest.param(b"", "connect", id="closed-without-answer"),
        pytest.param(b"this is not http\r\n\r\n", "connect", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            "connect",
            id="bad-chunk",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}",
            "connect",
            id="truncated-body",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 8\r\n"
            b"Connection: close\r\n\r\nnot gzip",
            "invalid_json",
            id="bad-gzip",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            "ok",
            id="well-formed",
        ),
    ],
)
async def test_broken_http_never_raises(
    engine_client: httpx.AsyncClient,
    raw_server: Callable[[bytes], Awaitable[str]],
    answer: bytes,
    kind: str,
) -> None:
    url = await raw_server(answer)

    result = await fetch(engine_client, "raw", upstream(url, timeout=3.0), {}, max_body=10_000)

    assert result.status == kind, result
    assert result.ms < 3000


# --- respx: the httpx engine's exceptions, one by one ------------------------------------------


@pytest.mark.respx(base_url=BASE)
@pytest.mark.parametrize(
    ("side_effect", "kind"),
    [
        pytest.param(httpx.ConnectError, "connect", id="connect-error"),
        pytest.param(httpx.ConnectTimeout, "timeout", id="connect-timeout"),
        pytest.param(httpx.ReadTimeout, "timeout", id="read-timeout"),
        pytest.param(httpx.PoolTimeout, "timeout", id="pool-timeout"),
        pytest.param(httpx.RemoteProtocolError, "connect", id="remote-protocol-error"),
        pytest.param(httpx.ReadError, "connect", id="read-error"),
        pytest.param(httpx.WriteError, "connect", id="write-error"),
        pytest.param(ConnectionResetError, "connect", id="os-error"),
    ],
)
async def test_transport_exceptions_map_to_kinds(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    side_effect: type[Exception],
    kind: str,
) -> None:
    respx_mock.get("/x").mock(side_effect=side_effect)

    result = await fetch(httpx_client, "x", upstream(f"{BASE}/x", timeout=2.0), {}, max_body=100)

    assert result.status == kind
    assert result.data is None
    assert result.detail


@pytest.mark.respx(base_url=BASE)
@pytest.mark.parametrize("status", [200, 503, None], ids=["ok", "http-503", "read-error"])
async def test_ms_is_the_time_the_call_took(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient, status: int | None
) -> None:
    delay = 0.3

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(delay)
        if status is None:
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(status, json={})

    respx_mock.get("/timed").mock(side_effect=slow)

    result = await fetch(httpx_client, "t", upstream(f"{BASE}/timed", timeout=5.0), {}, max_body=99)

    assert result.status == {200: "ok", 503: "http_status", None: "connect"}[status]
    # At least the upstream's delay; the upper bound is generous for a busy machine.
    assert delay * 1000 <= result.ms < delay * 1000 + 3000, result.ms


@pytest.mark.respx(base_url=BASE)
async def test_connect_error_detail_names_the_cause(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    respx_mock.get("/x").mock(side_effect=httpx.ConnectError)

    result = await fetch(httpx_client, "x", upstream(f"{BASE}/x"), {}, max_body=100)

    assert result.detail is not None
    assert result.detail.startswith("cannot reach the upstream (")


@pytest.mark.respx(base_url=BASE)
async def test_read_timeout_detail(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    respx_mock.get("/x").mock(side_effect=httpx.ReadTimeout)

    result = await fetch(httpx_client, "x", upstream(f"{BASE}/x", timeout=1.5), {}, max_body=100)

    assert result.detail == "no answer within 1.5 s"


# respx records a call only once its side effect returns, and this one is cancelled first.
@pytest.mark.respx(base_url=BASE, assert_all_called=False)
async def test_slow_side_effect_times_out(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    entered = asyncio.Event()
    finished = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.sleep(5)
        finished.set()
        return httpx.Response(200, json={})

    respx_mock.get("/slow").mock(side_effect=slow)
    started = time.monotonic()

    result = await fetch(httpx_client, "s", upstream(f"{BASE}/slow", timeout=0.2), {}, max_body=99)

    assert result.status == "timeout"
    assert result.detail == "no full answer within 0.2 s"
    assert time.monotonic() - started < 2.0
    assert entered.is_set()
    assert not finished.is_set()


@pytest.mark.respx(base_url=BASE)
async def test_success_with_schema_returns_validated_data(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    respx_mock.get("/weather/Paris").respond(
        json={
            "city": "Paris",
            "temperature_c": "21",
            "conditions": "sunny",
            "updated_at": "2024-05-01T12:00:00+00:00",
            "extra": "dropped by the model",
        }
    )
    config = upstream(f"{BASE}/weather/{{city}}", schema=WEATHER)

    result = await fetch(httpx_client, "weather", config, {"city": "Paris"}, max_body=10_000)

    assert result.ok, result
    assert result.data == {
        "city": "Paris",
        "temperature_c": 21.0,
        "conditions": "sunny",
        "updated_at": "2024-05-01T12:00:00Z",
    }


@pytest.mark.respx(base_url=BASE)
async def test_success_without_schema_returns_raw_json(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    respx_mock.get("/any").respond(json=[1, {"a": None}])

    result = await fetch(httpx_client, "any", upstream(f"{BASE}/any"), {}, max_body=10_000)

    assert result.ok
    assert result.data == [1, {"a": None}]


@pytest.mark.respx(base_url=BASE)
@pytest.mark.parametrize(
    ("response", "kind"),
    [
        pytest.param(httpx.Response(200, content=b""), "invalid_json", id="empty-body"),
        pytest.param(httpx.Response(200, content=b"\xff\xfe{"), "invalid_json", id="not-utf8"),
        pytest.param(httpx.Response(200, content=b"[" * 5000), "invalid_json", id="deep"),
        pytest.param(
            httpx.Response(200, content=Chunks(b"not gzip"), headers={"Content-Encoding": "gzip"}),
            "invalid_json",
            id="bad-gzip",
        ),
        pytest.param(
            httpx.Response(200, json=["x"] * 20_000), "too_large", id="too-large-by-length"
        ),
        pytest.param(
            httpx.Response(
                200,
                content=Chunks(gzip.compress(b" " * 50_000)),
                headers={"Content-Encoding": "gzip"},
            ),
            "too_large",
            id="gzip-bomb-decoded-size",
        ),
        pytest.param(httpx.Response(204), "invalid_json", id="no-content"),
        pytest.param(httpx.Response(418, json={}), "http_status", id="418"),
    ],
)
async def test_bodies_map_to_kinds(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    response: httpx.Response,
    kind: str,
) -> None:
    respx_mock.get("/b").mock(return_value=response)

    result = await fetch(httpx_client, "b", upstream(f"{BASE}/b"), {}, max_body=10_000)

    assert result.status == kind


@pytest.mark.respx(base_url=BASE)
async def test_timeouts_are_passed_per_phase(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    route = respx_mock.get("/x").respond(json={})
    config = upstream(f"{BASE}/x", timeout=2.5, connect_timeout=0.5)

    await fetch(httpx_client, "x", config, {}, max_body=100)

    timeouts = route.calls.last.request.extensions["timeout"]
    assert timeouts == {"connect": 0.5, "read": 2.5, "write": 2.5, "pool": 2.5}


# --- headers and secrets ------------------------------------------------------------------------


@pytest.mark.respx(base_url=BASE)
async def test_config_headers_are_sent(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_TOKEN", SECRET)
    config = parse_config(
        f"""
[upstreams.x]
url = "{BASE}/x"
headers = {{ Authorization = "Bearer ${{TEST_UPSTREAM_TOKEN}}", X-Tenant = "acme" }}

[aggregates.a]
path = "/a"
sources = ["x"]
""",
        "t.toml",
    )
    route = respx_mock.get("/x").respond(json={})

    result = await fetch(httpx_client, "x", config.upstreams["x"], {}, max_body=100)

    assert result.ok
    sent = route.calls.last.request.headers
    assert sent["authorization"] == f"Bearer {SECRET}"
    assert sent["x-tenant"] == "acme"


@pytest.mark.integration
@pytest.mark.parametrize("knobs", ["", "status=500", "invalid=1", "drip=5", "shape=wrong"])
async def test_secret_header_reaches_upstream_but_never_logs_or_results(
    demo: DemoProcess,
    engine_client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    knobs: str,
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_TOKEN", SECRET)
    config = parse_config(
        f"""
[upstreams.checked]
url = "{demo.url}/echo/x?{knobs}"
timeout = 0.5
schema = "{WEATHER}"
headers = {{ Authorization = "Bearer ${{TEST_UPSTREAM_TOKEN}}" }}

[upstreams.raw]
url = "{demo.url}/echo/x?{knobs}"
timeout = 0.5
headers = {{ Authorization = "Bearer ${{TEST_UPSTREAM_TOKEN}}" }}

[aggregates.a]
path = "/a"
sources = ["checked", "raw"]
""",
        "t.toml",
    )
    caplog.set_level(logging.DEBUG)
    # our own DEBUG line per call, whatever an earlier test's logging set-up left
    caplog.set_level(logging.DEBUG, logger="aggregator")
    monkeypatch.setattr(logging.getLogger("aggregator"), "propagate", True)

    results = [
        await fetch(engine_client, name, config.upstreams[name], {}, max_body=10_000)
        for name in ("checked", "raw")
    ]

    checked, raw = results
    assert not checked.ok  # the echo never matches Weather: a failure with a detail
    assert checked.detail
    if knobs == "":
        assert raw.data["headers"]["authorization"] == f"Bearer {SECRET}"
    assert caplog.records, "the upstream call should log a line"
    for record in caplog.records:
        assert SECRET not in record.getMessage()
    assert SECRET not in caplog.text
    for result in results:
        assert SECRET not in (result.detail or "")
        assert SECRET not in repr(result.locations)


# --- clients ------------------------------------------------------------------------------------


async def test_build_client_defaults_to_the_aiohttp_engine() -> None:
    async with build_client(Settings(pool_max_connections=7)) as own:
        assert isinstance(own, HttpxAiohttpClient)
        assert isinstance(own._transport, AiohttpTransport)
        assert own._transport.limits.max_connections == 7
        assert own.follow_redirects is False
        assert own.trust_env is False


async def test_build_client_httpx_engine() -> None:
    async with build_client(Settings(engine="httpx", pool_max_connections=7)) as own:
        assert isinstance(own, httpx.AsyncClient)
        assert not isinstance(own, HttpxAiohttpClient)
        transport = own._transport
        assert isinstance(transport, httpx.AsyncHTTPTransport)
        assert transport._pool._max_connections == 7
        assert own.follow_redirects is False
        assert own.trust_env is False


@pytest.mark.parametrize("engine", ENGINES)
async def test_borrow_client_without_a_shared_one_is_short_lived(engine: Engine) -> None:
    settings = Settings(engine=engine)

    clients = UpstreamClients(settings)
    async with clients.borrow() as borrowed:
        assert clients.shared() is None
        assert not borrowed.is_closed

    assert borrowed.is_closed


async def test_borrow_client_prefers_the_shared_one() -> None:
    settings = Settings(engine="httpx")
    clients = UpstreamClients(settings)
    shared = await clients.open()
    try:
        async with clients.borrow() as borrowed:
            assert borrowed is shared
        assert not shared.is_closed
    finally:
        await clients.close()

    assert shared.is_closed
    assert clients.shared() is None


async def test_each_engine_has_its_own_shared_client() -> None:
    # Two apps in one process (tests, an embedding app) never share, nor close, each other's.
    first, second = UpstreamClients(Settings()), UpstreamClients(Settings())
    client = await first.open()
    try:
        assert second.shared() is None
        await second.close()
        assert first.shared() is client and not client.is_closed
    finally:
        await first.close()


# --- decoding: pydantic-core's parser where it decides as json.loads would ---------------------

_WEATHER_BODY = (
    b'{"city": "Paris", "temperature_c": 21, "conditions": "sunny",'
    b' "updated_at": "2024-05-01T12:00:00+00:00"}'
)


def test_a_body_with_a_model_is_parsed_by_pydantic_not_json_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_json_loads(body: bytes) -> object:
        raise AssertionError("json.loads ran on a body pydantic-core can parse")

    monkeypatch.setattr(json, "loads", no_json_loads)  # the module checks.py calls
    config = upstream(f"{BASE}/weather/{{city}}", schema=WEATHER)
    data = checks.decode("weather", config, _WEATHER_BODY)
    assert data["temperature_c"] == 21.0 and data["updated_at"] == "2024-05-01T12:00:00Z"


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        pytest.param(_WEATHER_BODY, "ok", id="plain"),
        pytest.param(b"\xef\xbb\xbf" + _WEATHER_BODY, "ok", id="utf8-bom"),
        pytest.param(_WEATHER_BODY.decode().encode("utf-16"), "ok", id="utf-16"),
        pytest.param(_WEATHER_BODY.replace(b"sunny", b"\\ud800"), "ok", id="lone-surrogate"),
        pytest.param(_WEATHER_BODY[:-1], "invalid_json", id="cut"),
        pytest.param(b'{"city": [' + b"[" * 200 + b"]" * 200 + b"]}", "invalid_json", id="deep"),
        pytest.param(b'{"city": "Paris"}', "validation", id="wrong-shape"),
    ],
)
def test_decoding_with_a_model_decides_as_json_loads_then_validation(
    body: bytes, outcome: str
) -> None:
    """The fast parser is an optimisation: every body is accepted or refused as before."""
    config = upstream(f"{BASE}/weather/{{city}}", schema=WEATHER)
    assert config.model is not None
    try:
        expected: object = config.model.model_validate(json.loads(body)).model_dump(mode="json")
    except ValueError:
        expected = None  # invalid JSON or a validation error (both are ValueErrors)
    try:
        data = checks.decode("weather", config, body)
    except UpstreamInvalidPayloadError as exc:
        assert exc.kind == outcome, exc.detail
        assert expected is None
        if outcome == "validation":
            assert "temperature_c" in exc.locations
    else:
        assert outcome == "ok" and data == expected
