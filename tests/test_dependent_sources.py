"""Dependent sources through the fan-outs (respx): the async graph and both sync twins give the
same results, a source that cannot get what it needs fails as `dependency` without being
called, fallbacks lend their data, and the deadline covers the whole graph."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import pytest
import respx

from aggregator.config import AppConfig, parse_config
from aggregator.fanout import fan_out
from aggregator.models import SourceResult
from aggregator.params import ParamValue
from aggregator.twins.fanout import fan_out_in_turn, fan_out_threads

BASE = "http://upstream.test"
MAX_BODY = 100_000
PARAMS: dict[str, ParamValue] = {"user_id": 7}
PROFILE = {"user_id": 7, "city": "Paris", "team": {"id": 3}}

Style = Literal["async", "in-turn", "threads"]
STYLES: list[Style] = ["async", "in-turn", "threads"]


def graph_config(*, profile: str = "", weather: str = "", deadline: float = 5.0) -> AppConfig:
    """weather needs profile, tip needs weather, news needs nobody; dependents listed first."""
    return parse_config(
        f"""
[upstreams.profile]
url = "{BASE}/profile/{{user_id}}"
retries = 0
{profile}

[upstreams.weather]
url = "{BASE}/weather/{{profile.city}}?team={{profile.team.id}}"
retries = 0
{weather}

[upstreams.tip]
url = "{BASE}/tip/{{weather.conditions}}"

[upstreams.news]
url = "{BASE}/news"

[aggregates.g]
path = "/g"
sources = ["tip", "weather", "news", "profile"]
params = {{ user_id = "int" }}
deadline = {deadline}
""",
        "graph",
    )


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor


async def run(
    style: Style, config: AppConfig, async_client: httpx.AsyncClient, pool: ThreadPoolExecutor
) -> dict[str, SourceResult]:
    aggregate = config.aggregates["g"]
    if style == "async":
        return await fan_out(async_client, config, aggregate, PARAMS, max_body=MAX_BODY)
    with httpx.Client() as client:
        if style == "in-turn":
            return await asyncio.to_thread(
                fan_out_in_turn, client, config, aggregate, PARAMS, max_body=MAX_BODY
            )
        return await asyncio.to_thread(
            fan_out_threads, client, config, aggregate, PARAMS, max_body=MAX_BODY, executor=pool
        )


def outcome(results: dict[str, SourceResult]) -> dict[str, tuple[str, Any, str | None, bool]]:
    """What must not depend on the style: status, data, detail, fallback."""
    return {n: (r.status, r.data, r.detail, r.fallback) for n, r in results.items()}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.respx(base_url=BASE)
async def test_a_dependent_source_is_called_with_the_fields_it_needs(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    pool: ThreadPoolExecutor,
    style: Style,
) -> None:
    respx_mock.get("/profile/7").respond(json=PROFILE)
    weather = respx_mock.get("/weather/Paris", params={"team": "3"}).respond(
        json={"conditions": "rainy"}
    )
    tip = respx_mock.get("/tip/rainy").respond(json={"tip": "umbrella"})
    respx_mock.get("/news").respond(json={"n": 1})

    results = await run(style, graph_config(), httpx_client, pool)

    assert outcome(results) == {
        "tip": ("ok", {"tip": "umbrella"}, None, False),
        "weather": ("ok", {"conditions": "rainy"}, None, False),
        "news": ("ok", {"n": 1}, None, False),
        "profile": ("ok", PROFILE, None, False),
    }
    assert (weather.call_count, tip.call_count) == (1, 1)
    assert str(weather.calls.last.request.url) == f"{BASE}/weather/Paris?team=3"
    started = {name: r.started for name, r in results.items()}
    assert all(s is not None for s in started.values()), started
    profile, w, t = results["profile"], results["weather"], results["tip"]
    assert profile.started is not None and w.started is not None and t.started is not None
    # Each starts once what it needs has ended (ms are rounded to 0.1: allow that much).
    assert w.started >= profile.started + profile.ms - 0.2
    assert t.started >= w.started + w.ms - 0.2


ANSWERS = [
    pytest.param(
        httpx.Response(503),
        "needs profile.city, profile.team.id: profile failed (http_status)",
        id="failed",
    ),
    pytest.param(
        httpx.Response(200, json={"team": {"id": 3}}),
        "needs profile.city: profile.city is missing",
        id="missing",
    ),
    pytest.param(
        httpx.Response(200, json={"city": None, "team": {"id": 3}}),
        "needs profile.city: profile.city is missing (null)",
        id="null",
    ),
    pytest.param(
        httpx.Response(200, json={"city": {"name": "Paris"}, "team": {"id": 3}}),
        "needs profile.city: profile.city is an object, not a value",
        id="object",
    ),
    pytest.param(
        httpx.Response(200, json={"city": ["Paris"], "team": 3}),
        "needs profile.city: profile.city is a list, not a value; "
        "needs profile.team.id: profile.team.id is missing",
        id="list-and-missing",
    ),
]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize(("answer", "detail"), ANSWERS)
@pytest.mark.respx(base_url=BASE, assert_all_called=False)
async def test_a_source_whose_needs_cannot_be_had_fails_as_dependency_uncalled(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    pool: ThreadPoolExecutor,
    style: Style,
    answer: httpx.Response,
    detail: str,
) -> None:
    respx_mock.get("/profile/7").mock(return_value=answer)
    weather = respx_mock.get(path__startswith="/weather/").respond(json={"conditions": "x"})
    tip = respx_mock.get(path__startswith="/tip/").respond(json={})
    respx_mock.get("/news").respond(json={"n": 1})

    results = await run(style, graph_config(), httpx_client, pool)

    assert (weather.call_count, tip.call_count) == (0, 0)
    assert results["weather"].status == "dependency"
    assert results["weather"].detail == detail
    assert results["weather"].ms == 0.0 and results["weather"].started is not None
    # What depends on a source that failed as `dependency` fails the same way, naming it.
    assert (results["tip"].status, results["tip"].detail) == (
        "dependency",
        "needs weather.conditions: weather failed (dependency)",
    )
    assert results["news"].ok


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.respx(base_url=BASE)
async def test_a_failed_dependency_lends_its_fallback(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    pool: ThreadPoolExecutor,
    style: Style,
) -> None:
    config = graph_config(profile='fallback = { city = "Lima", team = { id = 1 } }')
    respx_mock.get("/profile/7").respond(503)
    weather = respx_mock.get("/weather/Lima", params={"team": "1"}).respond(
        json={"conditions": "foggy"}
    )
    respx_mock.get("/tip/foggy").respond(json={"tip": "lights"})
    respx_mock.get("/news").respond(json={"n": 1})

    results = await run(style, config, httpx_client, pool)

    assert outcome(results) == {
        "tip": ("ok", {"tip": "lights"}, None, False),
        "weather": ("ok", {"conditions": "foggy"}, None, False),
        "news": ("ok", {"n": 1}, None, False),
        "profile": ("http_status", {"city": "Lima", "team": {"id": 1}}, "answered HTTP 503", True),
    }
    assert weather.call_count == 1


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.respx(base_url=BASE, assert_all_called=False)
async def test_a_source_failed_as_dependency_serves_its_own_fallback(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    pool: ThreadPoolExecutor,
    style: Style,
) -> None:
    config = graph_config(weather='fallback = { conditions = "unknown" }')
    respx_mock.get("/profile/7").respond(json={"team": {"id": 3}})  # no city
    weather = respx_mock.get(path__startswith="/weather/").respond(json={})
    respx_mock.get("/tip/unknown").respond(json={"tip": "look outside"})
    respx_mock.get("/news").respond(json={"n": 1})

    results = await run(style, config, httpx_client, pool)

    assert weather.call_count == 0
    assert outcome(results)["weather"] == (
        "dependency",
        {"conditions": "unknown"},
        "needs profile.city: profile.city is missing",
        True,
    )
    assert outcome(results)["tip"] == ("ok", {"tip": "look outside"}, None, False)


@pytest.mark.respx(base_url=BASE, assert_all_called=False)  # weather is cut off mid-call
async def test_the_deadline_covers_the_whole_graph(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    async def slow_profile(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.25)
        return httpx.Response(200, json=PROFILE)

    async def slow_weather(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json={"conditions": "x"})

    respx_mock.get("/profile/7").mock(side_effect=slow_profile)
    respx_mock.get("/weather/Paris").mock(side_effect=slow_weather)
    respx_mock.get("/news").respond(json={"n": 1})
    config = graph_config(deadline=0.5)
    begun = time.monotonic()

    results = await fan_out(httpx_client, config, config.aggregates["g"], PARAMS, max_body=MAX_BODY)

    elapsed = time.monotonic() - begun
    assert 0.45 <= elapsed < 2.0
    assert {n: r.status for n, r in results.items()} == {
        "tip": "deadline",
        "weather": "deadline",
        "news": "ok",
        "profile": "ok",
    }
    weather_started = results["weather"].started
    assert weather_started is not None and weather_started >= 240  # after profile's 0.25 s
    assert results["tip"].started is None  # it was still waiting for weather: never started
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("upstream:")]
    assert leftovers == []


@pytest.mark.respx(base_url=BASE, assert_all_called=False)
async def test_cancelling_a_graph_cancels_what_waits_too(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=PROFILE)

    respx_mock.get("/profile/7").mock(side_effect=slow)
    respx_mock.get("/news").respond(json={"n": 1})
    config = graph_config()
    task = asyncio.create_task(
        fan_out(httpx_client, config, config.aggregates["g"], PARAMS, max_body=MAX_BODY)
    )
    await asyncio.sleep(0.1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("upstream:")]
    assert leftovers == []
