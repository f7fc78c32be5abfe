"""Tests for the demo upstreams, so the knobs other tests rely on behave as documented."""

from __future__ import annotations

import gzip
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pydantic
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from aggregator.demo.knobs import Knobs
from aggregator.demo.models import News, Profile, Recommendations, Stocks, Weather
from aggregator.demo.process import DemoProcess, free_port, start_demo_process
from aggregator.demo.server import create_demo_app

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def demo_client() -> AsyncIterator[Client]:
    """Serve the app in-process with no default latency, so unit tests are fast."""
    async with TestClient(TestServer(create_demo_app(Knobs(latency=0.0)))) as test_client:
        yield test_client


def test_knobs_reject_nonsense() -> None:
    """Bad server-wide knobs must fail at startup rather than on every request."""
    with pytest.raises(ValueError, match="failure_rate"):
        Knobs(failure_rate=1.5)
    with pytest.raises(ValueError, match="latency"):
        Knobs(latency=-1)
    assert Knobs() == Knobs(latency=0.1, jitter=0.0, failure_rate=0.0)


async def test_payloads_match_models_and_are_deterministic(
    demo_client: Client,
) -> None:
    """Every service answers its model, and the same input gives the same data."""
    cases: list[tuple[str, Callable[[bytes], object]]] = [
        ("/weather/Paris", Weather.model_validate_json),
        ("/stocks/7", Stocks.model_validate_json),
        ("/news?topic=tech", News.model_validate_json),
        ("/profile/7", Profile.model_validate_json),
        ("/recommendations/7", Recommendations.model_validate_json),
    ]
    for path, validate in cases:
        first = await demo_client.get(path)
        assert first.status == 200, path
        assert first.content_type == "application/json"
        validate(await first.read())
        second = await demo_client.get(path)
        assert await second.read() == await first.read()
    weather = Weather.model_validate_json(await (await demo_client.get("/weather/Paris")).read())
    assert weather.city == "Paris" and weather.temperature_c == 2.3
    news = News.model_validate(await (await demo_client.get("/news")).json())
    assert news.topic == "general" and len(news.articles) == 5
    profile = Profile.model_validate(await (await demo_client.get("/profile/7")).json())
    assert (profile.user_id, profile.plan) == (7, "free")


async def test_non_integer_user_and_unknown_path_are_json_404(
    demo_client: Client,
) -> None:
    """Path errors stay JSON so callers can report them uniformly."""
    for path in ("/profile/abc", "/stocks/x", "/nope"):
        response = await demo_client.get(path)
        assert response.status == 404
        assert "error" in await response.json()


async def test_failure_knobs(demo_client: Client) -> None:
    """status, fail, html, invalid and shape each produce the promised failure."""
    response = await demo_client.get("/weather/Paris?status=502")
    assert response.status == 502 and "error" in await response.json()
    response = await demo_client.get("/weather/Paris?fail=1")
    assert response.status == 503 and "error" in await response.json()
    response = await demo_client.get("/weather/Paris?html=1")
    assert response.status == 200 and response.content_type == "text/html"
    assert (await response.text()).startswith("<html>")
    response = await demo_client.get("/weather/Paris?invalid=1")
    assert response.status == 200 and response.content_type == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(await response.read())
    wrong: list[tuple[str, Callable[[bytes], object]]] = [
        ("/weather/Paris", Weather.model_validate_json),
        ("/profile/7", Profile.model_validate_json),
    ]
    for path, validate in wrong:
        response = await demo_client.get(f"{path}?shape=wrong")
        assert response.status == 200
        with pytest.raises(pydantic.ValidationError):
            validate(await response.read())


async def test_bad_knob_is_400_naming_it(demo_client: Client) -> None:
    """A typo in a knob must be loud, not silently ignored."""
    for query, knob in [("delay=abc", "delay"), ("fail=2", "fail"), ("status=99", "status")]:
        response = await demo_client.get(f"/weather/Paris?{query}")
        assert response.status == 400
        assert (await response.json())["knob"] == knob


async def test_cc_knob_sets_cache_control_verbatim(demo_client: Client) -> None:
    """cc lets tests play an upstream that allows (or forbids) caching its answer."""
    plain = await demo_client.get("/weather/Paris")
    cached = await demo_client.get("/weather/Paris?cc=max-age%3D60%2C%20s-maxage%3D30")
    failed = await demo_client.get("/weather/Paris?cc=no-store&status=503")
    dripped = await demo_client.get("/weather/Paris?cc=private&drip=0.1")
    broken = await demo_client.get("/weather/Paris?cc=max-age%3D1%0D%0AX-Evil%3A%201")
    assert "Cache-Control" not in plain.headers
    assert cached.status == 200 and cached.headers["Cache-Control"] == "max-age=60, s-maxage=30"
    assert failed.status == 503 and failed.headers["Cache-Control"] == "no-store"
    assert dripped.headers["Cache-Control"] == "private"
    assert Weather.model_validate_json(await dripped.read()).city == "Paris"
    assert broken.status == 400 and (await broken.json())["knob"] == "cc"


async def test_hostile_knobs(demo_client: Client) -> None:
    """redirect, gzip, ctype and depth play the hostile upstreams of the fault tests."""
    moved = await demo_client.get(
        "/weather/Paris?redirect=ftp%3A%2F%2Fx%2Fy", allow_redirects=False
    )
    assert moved.status == 302 and moved.headers["Location"] == "ftp://x/y"
    permanent = await demo_client.get("/news?redirect=%2Fnews&status=308", allow_redirects=False)
    assert permanent.status == 308 and permanent.headers["Location"] == "/news"
    not_a_redirect = await demo_client.get("/news?redirect=%2Fnews&status=200")
    assert not_a_redirect.status == 400 and (await not_a_redirect.json())["knob"] == "status"

    packed = await demo_client.get("/weather/Paris?gzip=1", auto_decompress=False)
    assert packed.headers["Content-Encoding"] == "gzip"
    assert Weather.model_validate_json(gzip.decompress(await packed.read())).city == "Paris"
    # a bomb: 64 MiB of padding inflate from well under 1 MiB sent
    bomb = await demo_client.get(f"/weather/Paris?gzip=1&size={64 << 20}", auto_decompress=False)
    raw = await bomb.read()
    assert len(raw) < 1 << 20 and len(gzip.decompress(raw)) == 64 << 20

    typed = await demo_client.get("/weather/Paris?ctype=text%2Fplain")
    assert typed.headers["Content-Type"] == "text/plain"
    assert Weather.model_validate_json(await typed.read()).city == "Paris"

    deep = await demo_client.get("/weather/Paris?depth=3")
    assert await deep.read() == b"[[[]]]"


async def test_delay_and_size(demo_client: Client) -> None:
    """delay slows the answer and size pads it while keeping it valid JSON."""
    started = time.perf_counter()
    response = await demo_client.get("/weather/Paris?delay=0.2")
    assert response.status == 200
    assert time.perf_counter() - started >= 0.2
    response = await demo_client.get("/weather/Paris?size=1000000")
    body = await response.read()
    assert len(body) >= 1_000_000
    assert Weather.model_validate_json(body).city == "Paris"


async def test_tail_knobs_add_a_long_delay_to_some_calls(demo_client: Client) -> None:
    """tail_every=2: the 1st and 3rd call since the reset take tail_delay more, the 2nd not;
    tail=1 always, tail=0 never; bad values are 400s naming the knob."""

    async def took(query: str) -> float:
        started = time.perf_counter()
        response = await demo_client.get(f"/weather/Paris?{query}")
        assert response.status == 200
        return time.perf_counter() - started

    await demo_client.post("/_reset")
    every = [await took("tail_every=2&tail_delay=0.3") for _ in range(3)]
    assert every[0] >= 0.3 and every[1] < 0.25 and every[2] >= 0.3, every
    assert await took("tail=1&tail_delay=0.3") >= 0.3
    assert await took("tail=0&tail_delay=0.3") < 0.25
    for bad in ("tail=2", "tail_delay=-1", "tail_every=0"):
        response = await demo_client.get(f"/weather/Paris?{bad}")
        body = await response.json()
        assert (response.status, body["knob"]) == (400, bad.split("=")[0])


async def test_echo_reports_raw_path_query_and_headers(demo_client: Client) -> None:
    """Echo shows exactly what arrived, so encoding bugs are visible."""
    response = await demo_client.get(
        "/echo/a%2Fb/S%C3%A3o%20Paulo?q=a%20b&x=1", headers={"X-Trace": "t1"}
    )
    payload = await response.json()
    assert payload["path"] == "/echo/a%2Fb/S%C3%A3o%20Paulo"
    assert payload["query"] == "q=a%20b&x=1"
    assert payload["args"] == {"q": "a b", "x": "1"}
    assert payload["headers"]["x-trace"] == "t1"


async def test_every_request_is_recorded_with_host_and_raw_path(demo_client: Client) -> None:
    """The recorder sees every path as sent, routed or not, until a reset."""
    await demo_client.get("/echo/a%2F..%2Fb?q=%0D%0A", headers={"Host": "upstream.test:81"})
    await demo_client.get("/nowhere/x%2Fy")
    await demo_client.post("/profile/7")
    listed = await (await demo_client.get("/_requests")).json()
    assert listed["requests"][:3] == [
        {"method": "GET", "host": "upstream.test:81", "raw_path": "/echo/a%2F..%2Fb?q=%0D%0A"},
        {"method": "GET", "host": listed["requests"][1]["host"], "raw_path": "/nowhere/x%2Fy"},
        {"method": "POST", "host": listed["requests"][1]["host"], "raw_path": "/profile/7"},
    ]
    await demo_client.post("/_reset")
    after = await (await demo_client.get("/_requests")).json()
    assert [r["raw_path"] for r in after["requests"]] == ["/_requests"]


async def test_stats_count_requests_and_reset(demo_client: Client) -> None:
    """Stats count service calls only, and reset zeroes them."""
    await demo_client.get("/weather/Paris")
    await demo_client.get("/weather/Oslo")
    await demo_client.get("/healthz")
    stats = await (await demo_client.get("/_stats")).json()
    assert stats["requests"]["weather"] == 2 and stats["total_requests"] == 2
    assert stats["connections"] >= 1 and stats["max_in_flight"] >= 1
    await demo_client.post("/_reset")
    stats = await (await demo_client.get("/_stats")).json()
    assert stats["total_requests"] == 0 and stats["connections"] == 0
    assert set(stats["requests"]) >= {"weather", "stocks", "news", "profile", "recommendations"}


@pytest.mark.integration
def test_subprocess_serves_and_counts_connections(demo: DemoProcess) -> None:
    """Two keep-alive clients are two connections, however many requests they send."""
    assert demo.url == f"http://127.0.0.1:{demo.port}"
    httpx.post(f"{demo.url}/_reset", trust_env=False).raise_for_status()
    for _ in range(2):
        with httpx.Client(base_url=demo.url, trust_env=False) as http:
            for city in ("Paris", "Lima", "Oslo"):
                response = http.get(f"/weather/{city}")
                assert Weather.model_validate_json(response.content).city == city
    stats = httpx.get(f"{demo.url}/_stats", trust_env=False).json()
    assert stats["connections"] == 2
    assert stats["requests"]["weather"] == 6 and stats["total_requests"] == 6


@pytest.mark.integration
def test_subprocess_drip_sends_headers_first(demo: DemoProcess) -> None:
    """drip delivers headers promptly and the body over the requested time."""
    with httpx.Client(trust_env=False) as http:
        started = time.perf_counter()
        with http.stream("GET", f"{demo.url}/weather/Paris?drip=1.0") as response:
            headers_at = time.perf_counter() - started
            body = response.read()
        total = time.perf_counter() - started
    assert headers_at < 0.5 < 0.9 < total, (headers_at, total)  # headers at once, body dripped
    assert Weather.model_validate_json(body).city == "Paris"


@pytest.mark.integration
def test_subprocess_stops_on_sigterm(tmp_path: Path) -> None:
    """The child announces its address, then exits cleanly on SIGTERM."""
    log = tmp_path / "demo.log"
    process = start_demo_process(port=free_port(), log_path=log)
    with process:
        assert f"demo upstreams on {process.url}" in log.read_text()
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(5) == 0


@pytest.mark.integration
def test_start_failure_raises_with_log_tail() -> None:
    """A child that cannot start must raise with its output, not hang."""
    with pytest.raises(RuntimeError, match="failure_rate"):
        start_demo_process(failure_rate=7.0, timeout=5.0)


@pytest.mark.integration
def test_subprocess_stall_lasts_until_the_caller_gives_up(tmp_path: Path) -> None:
    """stall=1 answers nothing; the call ends when the caller closes, so none is left behind."""
    with start_demo_process(latency=0.0, stall_rate=1.0, log_path=tmp_path / "d.log") as demo:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{demo.url}/profile/7", timeout=0.5, trust_env=False)  # server default
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{demo.url}/profile/7?stall=1", timeout=0.5, trust_env=False)
        unstalled = httpx.get(f"{demo.url}/profile/7?stall=0", timeout=5, trust_env=False)
        bad = httpx.get(f"{demo.url}/profile/7?stall=2", timeout=5, trust_env=False)
        deadline = time.monotonic() + 5
        while httpx.get(f"{demo.url}/_stats", trust_env=False).json()["in_flight"]:
            assert time.monotonic() < deadline, "stalled calls outlived their callers"
            time.sleep(0.05)
    assert Profile.model_validate_json(unstalled.content).user_id == 7
    assert (bad.status_code, bad.json()["knob"]) == (400, "stall")
    with pytest.raises(ValueError, match="stall_rate"):
        Knobs(stall_rate=-0.1)


# -- payload size (`payload_kb`, `kb=`) ---------------------------------------------------------

_SERVICES: list[tuple[str, str | int, type[pydantic.BaseModel]]] = [
    ("weather", "Paris", Weather),
    ("stocks", 7, Stocks),
    ("news", "general", News),
    ("profile", 7, Profile),
    ("recommendations", 7, Recommendations),
]


def test_default_payloads_are_unchanged_by_the_size_knob() -> None:
    """Without a size, the bytes are today's: no growth list appears, not even an empty one."""
    from aggregator.demo.payloads import cached_body

    sizes = {service: len(cached_body(service, key)) for service, key, _ in _SERVICES}
    assert sizes == {
        "weather": 93,
        "stocks": 237,
        "news": 672,
        "profile": 54,
        "recommendations": 285,
    }
    for service, key, model in _SERVICES:
        body = cached_body(service, key)
        assert b"forecast" not in body and b"activity" not in body
        # Validated and dumped as the aggregator's schema check does: still the same JSON.
        assert json.loads(body) == model.model_validate_json(body).model_dump(mode="json")


@pytest.mark.parametrize("kb", [2.0, 8.0])
def test_grown_payloads_are_about_the_size_asked_and_survive_validation(kb: float) -> None:
    from aggregator.demo.payloads import cached_body

    for service, key, model in _SERVICES:
        body = cached_body(service, key, kb)
        assert 0.75 * kb * 1024 <= len(body) <= 1.25 * kb * 1024, (service, len(body))
        # What the aggregator keeps after validating with the demo model is the same size:
        # the bytes are in fields the models keep, not extras that validation drops.
        kept = json.dumps(model.model_validate_json(body).model_dump(mode="json"))
        assert abs(len(kept) - len(body)) <= 0.25 * len(body), (service, len(kept), len(body))
        assert json.loads(body) == model.model_validate_json(body).model_dump(mode="json")
        assert cached_body(service, key, kb) == body  # deterministic


async def test_size_knob_server_wide_and_per_request() -> None:
    assert Knobs().payload_kb == 0.0
    with pytest.raises(ValueError, match="payload_kb"):
        Knobs(payload_kb=-1)
    async with TestClient(TestServer(create_demo_app(Knobs(latency=0.0, payload_kb=2)))) as client:
        grown = await (await client.get("/stocks/7")).read()
        assert 1536 <= len(grown) <= 2560
        Stocks.model_validate_json(grown)
        small = await (await client.get("/stocks/7?kb=0")).read()
        assert len(small) == 237
        bigger = await (await client.get("/news?kb=4")).read()
        assert 3072 <= len(bigger) <= 5120 and len(News.model_validate_json(bigger).articles) > 5
        bad = await client.get("/news?kb=nope")
        assert bad.status == 400 and (await bad.json())["knob"] == "kb"
