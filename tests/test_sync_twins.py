"""The sync twins (`/sync<path>`, `/sync-pool<path>`) answer like the async view, in their style."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from flask.testing import FlaskClient

from aggregator import create_app, create_asgi_app
from aggregator.config import UpstreamConfig
from aggregator.demo.process import DemoProcess
from aggregator.serving import AggregatorFlask
from aggregator.settings import Settings
from aggregator.twins import SyncTwins, twins_of
from aggregator.twins.upstream_sync import fetch_sync
from aggregator.upstream.engines import build_sync_client
from tests.support.clients import closed_port
from tests.support.demo import demo_stats, reset_demo

QUERY = "city=Paris&user_id=7"
PREFIXES = [
    pytest.param("", id="async"),
    pytest.param("/sync", id="sequential"),
    pytest.param("/sync-pool", id="pool"),
]
TWINS = [pytest.param("/sync", id="sequential"), pytest.param("/sync-pool", id="pool")]
MAX_BODY = 10_000


def twins_config(demo_url: str, *, delay: float = 0.2) -> str:
    """Three slow sources, fast ones, one source per failure kind, and aggregates of them."""
    return f"""
[upstreams.weather]
url = "{demo_url}/weather/{{city}}?delay={delay}"
schema = "aggregator.demo.models:Weather"
timeout = 3.0

[upstreams.stocks]
url = "{demo_url}/stocks/{{user_id}}?delay={delay}"
schema = "aggregator.demo.models:Stocks"
timeout = 3.0

[upstreams.profile]
url = "{demo_url}/profile/{{user_id}}?delay={delay}"
schema = "aggregator.demo.models:Profile"
timeout = 3.0

[upstreams.fast]
url = "{demo_url}/profile/{{user_id}}?delay=0"
schema = "aggregator.demo.models:Profile"

[upstreams.fast_weather]
url = "{demo_url}/weather/{{city}}?delay=0"
schema = "aggregator.demo.models:Weather"

[upstreams.broken]
url = "{demo_url}/weather/{{city}}?status=503"

[upstreams.dripping]
url = "{demo_url}/weather/{{city}}?drip=5"
timeout = 0.4

[upstreams.big]
url = "{demo_url}/weather/{{city}}?size=200000"

[upstreams.garbled]
url = "{demo_url}/weather/{{city}}?invalid=1"

[upstreams.wrong]
url = "{demo_url}/stocks/{{user_id}}?shape=wrong"
schema = "aggregator.demo.models:Stocks"

[upstreams.unreachable]
url = "http://127.0.0.1:{closed_port()}/nothing"
connect_timeout = 1.0

[upstreams.hanging]
url = "{demo_url}/stocks/{{user_id}}?delay=2"
timeout = 3.0

[aggregates.trio]
path = "/api/trio"
sources = ["weather", "stocks", "profile"]
required = ["profile"]
params = {{ city = "str", user_id = "int" }}
cache_ttl = 30

[aggregates.partial]
path = "/api/partial"
sources = ["fast", "broken"]
required = ["fast"]
params = {{ city = "str", user_id = "int" }}

[aggregates.failing]
path = "/api/failing"
sources = ["fast", "broken"]
required = ["broken"]
params = {{ city = "str", user_id = "int" }}

[aggregates.faults]
path = "/api/faults"
sources = ["fast", "dripping", "big", "garbled", "wrong", "unreachable"]
params = {{ city = "str", user_id = "int" }}

[aggregates.cut]
path = "/api/cut"
sources = ["fast", "hanging", "fast_weather"]
params = {{ city = "str", user_id = "int" }}
deadline = 0.5
"""


@pytest.fixture
def twins_path(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    return write_config(twins_config(demo.url))


@pytest.fixture
def twins_app(twins_path: Path) -> Iterator[AggregatorFlask]:
    app = create_app(Settings(config=twins_path, max_upstream_body=MAX_BODY))
    yield app
    # No lifespan runs under the test client: close what the twins opened ourselves.
    twins_of(app).close()


@pytest.fixture
def twins_client(twins_app: AggregatorFlask) -> FlaskClient:
    return twins_app.test_client()


def _timed_get(client: FlaskClient, url: str) -> tuple[float, Any]:
    started = time.perf_counter()
    response = client.get(url)
    return time.perf_counter() - started, response


# --- same answers as the async view ------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "status", "data", "errors"),
    [
        pytest.param(
            f"/api/trio?{QUERY}", 200, ["weather", "stocks", "profile"], {}, id="complete"
        ),
        pytest.param(
            f"/api/partial?{QUERY}", 200, ["fast"], {"broken": "http_status"}, id="partial"
        ),
        pytest.param(
            f"/api/failing?{QUERY}", 502, ["fast"], {"broken": "http_status"}, id="required-fails"
        ),
    ],
)
def test_twins_answer_like_the_async_view(
    twins_client: FlaskClient,
    path: str,
    status: int,
    data: list[str],
    errors: dict[str, str],
) -> None:
    bodies = {}
    for prefix in ("", "/sync", "/sync-pool"):
        r = twins_client.get(prefix + path)
        assert r.status_code == status, (prefix, r.json)
        assert r.content_type == "application/json"
        body = r.json
        assert body is not None
        assert list(body["data"]) == data, prefix
        assert {k: v["kind"] for k, v in body["errors"].items()} == errors, prefix
        assert body["complete"] is (not errors)
        assert r.headers["X-Aggregate-Complete"] == ("false" if errors else "true")
        # One entry per source, then the cache (the twins never cache) and the total.
        entries = [e.split(";")[0] for e in r.headers["Server-Timing"].split(", ")]
        assert entries == [*body["sources"], "cache", "total"], prefix
        if prefix:
            assert 'cache;dur=0.00;desc="off"' in r.headers["Server-Timing"], prefix
        bodies[prefix] = body
    # Same data, same error details (timings aside) whichever style fetched it.
    assert bodies[""]["data"] == bodies["/sync"]["data"] == bodies["/sync-pool"]["data"]
    assert bodies[""]["errors"] == bodies["/sync"]["errors"] == bodies["/sync-pool"]["errors"]


@pytest.mark.integration
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("query", "field"),
    [
        pytest.param("city=Paris&user_id=seven", "user_id", id="bad-int"),
        pytest.param("user_id=7", "city", id="missing"),
        pytest.param("city=Paris&user_id=7&user_id=8", "user_id", id="twice"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_field(
    twins_client: FlaskClient, prefix: str, query: str, field: str
) -> None:
    r = twins_client.get(f"{prefix}/api/trio?{query}")
    assert r.status_code == 400
    assert r.json is not None
    assert r.json["field"] == field
    assert r.json["message"].startswith(f"{field}: ")


@pytest.mark.integration
@pytest.mark.parametrize("prefix", TWINS)
def test_twins_are_never_cached(twins_client: FlaskClient, demo: DemoProcess, prefix: str) -> None:
    twins_client.get(f"/api/trio?{QUERY}")  # fills the async view's cache (cache_ttl = 30)
    reset_demo(demo)

    first = twins_client.get(f"{prefix}/api/trio?{QUERY}")
    second = twins_client.get(f"{prefix}/api/trio?{QUERY}")

    for r in (first, second):
        assert r.status_code == 200
        assert "X-Cache" not in r.headers
        assert "ETag" not in r.headers
        assert r.headers["Cache-Control"] == "no-store"
    assert demo_stats(demo)["total_requests"] == 6  # every request called all three sources


# --- the point of the comparison: sum versus max --------------------------------------------


#: Source delay of the timing tests: sum (1.5 s) and max (0.5 s) far apart, even on a busy machine.
SLOW = 0.5


@pytest.mark.integration
def test_sequential_takes_the_sum_and_pool_and_async_the_max(
    demo: DemoProcess, write_config: Callable[[str], Path]
) -> None:
    app = create_app(Settings(config=write_config(twins_config(demo.url, delay=SLOW))))
    twins_client = app.test_client()
    url = f"/api/trio?{QUERY}"
    for prefix in ("", "/sync", "/sync-pool"):
        assert twins_client.get(prefix + url).status_code == 200  # warm up connections

    sequential, r1 = _timed_get(twins_client, "/sync" + url)
    pooled, r2 = _timed_get(twins_client, "/sync-pool" + url)
    # The async view cached `url` (cache_ttl = 30): time a fan-out for parameters it has not.
    async_view, r3 = _timed_get(twins_client, "/api/trio?city=Lyon&user_id=8")

    assert [r.status_code for r in (r1, r2, r3)] == [200, 200, 200]
    assert r3.headers["X-Cache"] == "MISS"
    twins_of(app).close()
    seen = f"3 x {SLOW} s: sequential {sequential:.2f}, pool {pooled:.2f}, async {async_view:.2f} s"
    assert sequential >= 3 * SLOW - 0.1, seen  # one after another
    assert pooled < 2 * SLOW, seen  # the slowest one
    assert async_view < 2 * SLOW, seen


# --- limits and error kinds --------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_limit_maps_to_its_error_kind(twins_client: FlaskClient, prefix: str) -> None:
    elapsed, r = _timed_get(twins_client, f"{prefix}/api/faults?{QUERY}")

    assert r.status_code == 200  # nothing required
    body = r.json
    assert body is not None
    assert list(body["data"]) == ["fast"]
    kinds = {name: err["kind"] for name, err in body["errors"].items()}
    assert kinds == {
        "dripping": "timeout",
        "big": "too_large",
        "garbled": "invalid_json",
        "wrong": "validation",
        "unreachable": "connect",
    }
    assert body["errors"]["dripping"]["detail"] == "no full answer within 0.4 s"
    assert body["errors"]["big"]["detail"] == f"the body is larger than {MAX_BODY} bytes"
    assert body["errors"]["wrong"]["locations"] == ["user_id", "quotes"]
    # The dripping source (5 s of body) is cut at its own 0.4 s; the rest are quick.
    assert body["sources"]["dripping"]["ms"] < 1500
    assert elapsed < 3.0


@pytest.mark.integration
@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        # One after another: `hanging` started before the deadline and is waited for; the
        # source after it is never started.
        pytest.param(
            "/sync",
            {"fast": "ok", "hanging": "ok", "fast_weather": "deadline"},
            id="sequential",
        ),
        # All at once: what did not arrive by the deadline is `deadline`, the rest is kept.
        pytest.param(
            "/sync-pool",
            {"fast": "ok", "hanging": "deadline", "fast_weather": "ok"},
            id="pool",
        ),
        pytest.param("", {"fast": "ok", "hanging": "deadline", "fast_weather": "ok"}, id="async"),
    ],
)
def test_aggregate_deadline_marks_what_did_not_arrive(
    twins_client: FlaskClient, prefix: str, expected: dict[str, str]
) -> None:
    elapsed, r = _timed_get(twins_client, f"{prefix}/api/cut?{QUERY}")

    assert r.status_code == 200
    body = r.json
    assert body is not None
    assert {name: info["status"] for name, info in body["sources"].items()} == expected
    late = [name for name, status in expected.items() if status == "deadline"]
    for name in late:
        assert body["errors"][name] == {
            "kind": "deadline",
            "detail": "no answer within the aggregate deadline of 0.5 s",
        }
    if prefix == "/sync":
        assert 1.9 <= elapsed < 3.5, elapsed  # waited for `hanging` (2 s), skipped the rest
    else:
        assert 0.4 <= elapsed < 1.5, elapsed  # answered at the deadline, not after `hanging`


# --- the shared client ------------------------------------------------------------------------


@pytest.mark.integration
def test_one_sync_client_per_process_reused_across_requests_and_threads(
    twins_app: AggregatorFlask, demo: DemoProcess
) -> None:
    twins: SyncTwins = twins_of(twins_app)
    barrier = threading.Barrier(8)

    def race() -> httpx.Client:
        barrier.wait()
        return twins.client.get()

    with ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(lambda _: race(), range(8)))
    assert len({id(c) for c in clients}) == 1

    client = twins_app.test_client()
    client.get(f"/sync/api/trio?{QUERY}")  # opens its connection
    reset_demo(demo)
    for _ in range(3):
        assert client.get(f"/sync/api/trio?{QUERY}").status_code == 200
    assert twins.client.get() is clients[0]
    stats = demo_stats(demo)
    assert stats["total_requests"] == 9
    assert stats["connections"] <= 1  # nine calls, one after another, on one kept-alive connection


@respx.mock(assert_all_called=True)
def test_sync_client_keeps_no_cookies(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.get("http://upstream.test/u/alice").mock(
        return_value=httpx.Response(200, json={}, headers={"Set-Cookie": "session=alice"})
    )
    bob = respx_mock.get("http://upstream.test/u/bob").mock(
        return_value=httpx.Response(200, json={})
    )
    upstream = UpstreamConfig(url="http://upstream.test/u/{user}")
    with build_sync_client(Settings()) as client:
        first = fetch_sync(client, "u", upstream, {"user": "alice"}, max_body=1000)
        second = fetch_sync(client, "u", upstream, {"user": "bob"}, max_body=1000)
        assert len(client.cookies) == 0
        assert client.follow_redirects is False
        assert client.trust_env is False
    assert first.ok and second.ok, (first, second)
    assert route.called
    assert "cookie" not in bob.calls.last.request.headers


@pytest.mark.integration
async def test_lifespan_closes_the_sync_client(twins_path: Path) -> None:
    adapter = create_asgi_app(Settings(config=twins_path))
    twins: SyncTwins = twins_of(adapter.app)
    async with adapter.lifespan():
        transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's types
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.get(f"/sync-pool/api/partial?{QUERY}")
            assert r.status_code == 200
            opened = twins.client.get()
    assert opened.is_closed
    assert twins.pool._shutdown


# --- over the wire --------------------------------------------------------------------------


@pytest.mark.integration
def test_twins_over_hypercorn_in_loop_mode(
    serve: Callable[..., Any], demo: DemoProcess, write_config: Callable[[str], Path]
) -> None:
    server = serve(write_config(twins_config(demo.url, delay=SLOW)), mode="loop")
    with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as http:
        for prefix in ("", "/sync", "/sync-pool"):
            http.get(f"{prefix}/api/trio?{QUERY}")  # warm up
        timings: dict[str, float] = {}
        for prefix in ("/sync", "/sync-pool"):
            started = time.perf_counter()
            r = http.get(f"{prefix}/api/trio?{QUERY}")
            timings[prefix] = time.perf_counter() - started
            assert r.status_code == 200
            assert r.headers["cache-control"] == "no-store"
            assert "x-cache" not in r.headers
            assert r.json()["complete"] is True
        failing = http.get(f"/sync-pool/api/failing?{QUERY}")
        bad = http.get("/sync/api/trio?city=Paris")
    assert timings["/sync"] >= 3 * SLOW - 0.1, timings  # the sum
    assert timings["/sync-pool"] < 2 * SLOW, timings  # the slowest one
    assert failing.status_code == 502
    assert bad.status_code == 400 and bad.json()["field"] == "user_id"
    server.stop()
    assert "Traceback" not in server.log()
