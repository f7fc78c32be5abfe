"""The source cache: Cache-Control parsing, TTL decisions, entries on a fake clock, real stack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import pytest
import respx
from flask import Flask
from flask.testing import FlaskClient

from aggregator import create_app, create_asgi_app
from aggregator.cache import AggregateCache, CacheUnavailableError, SourceCache, purge
from aggregator.cache.backends import build_cache
from aggregator.cache.entries import SourceEntry, source_key
from aggregator.cache.sources import MAX_SOURCE_TTL, source_ttl
from aggregator.cache.store import CacheStore
from aggregator.config import AppConfig, UpstreamConfig, parse_config
from aggregator.demo.process import DemoProcess
from aggregator.engine import engine_of
from aggregator.fanout import fan_out
from aggregator.merge import merge
from aggregator.models import CacheControl, SourceResult
from aggregator.params import ParamValue
from aggregator.settings import Settings
from aggregator.upstream import fetch
from aggregator.upstream.cachecontrol import parse_cache_control
from aggregator.upstream.engines import build_client
from tests.support.demo import demo_stats, reset_demo

BASE = "http://upstream.test"
MAX_AGE_60 = "cc=max-age%3D60"
PARIS: dict[str, ParamValue] = {"city": "Paris"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# -- what the upstream said: Cache-Control parsing (upstream.py) -------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(None, CacheControl(), id="absent"),
        pytest.param("", CacheControl(), id="empty"),
        pytest.param("max-age=60", CacheControl(max_age=60), id="max-age"),
        pytest.param("Max-Age=60", CacheControl(max_age=60), id="case-insensitive"),
        pytest.param('max-age="60"', CacheControl(max_age=60), id="quoted-value"),
        pytest.param(" max-age = 60 ,", CacheControl(max_age=60), id="spaces-and-trailing-comma"),
        pytest.param(
            "public, max-age=60, s-maxage=300",
            CacheControl(max_age=60, s_maxage=300),
            id="s-maxage",
        ),
        pytest.param("max-age=0", CacheControl(max_age=0), id="max-age-zero"),
        pytest.param("max-age=-5", CacheControl(max_age=0), id="negative-is-stale"),
        pytest.param("max-age=1.5", CacheControl(max_age=0), id="fraction-is-stale"),
        pytest.param("max-age", CacheControl(max_age=0), id="no-value-is-stale"),
        pytest.param("max-age=soon", CacheControl(max_age=0), id="word-is-stale"),
        pytest.param("max-age=٣٠", CacheControl(max_age=0), id="non-ascii-digits-are-stale"),
        pytest.param(
            "max-age=99999999999999", CacheControl(max_age=2.0**31), id="huge-capped-at-2^31"
        ),
        pytest.param("max-age=60, max-age=5", CacheControl(max_age=60), id="first-of-repeated"),
        pytest.param("no-store", CacheControl(no_store=True), id="no-store"),
        pytest.param("NO-CACHE", CacheControl(no_cache=True), id="no-cache"),
        pytest.param("private, max-age=60", CacheControl(max_age=60, private=True), id="private"),
        pytest.param(
            'no-cache="Set-Cookie, X-Foo", max-age=60',
            CacheControl(max_age=60, no_cache=True),
            id="qualified-no-cache-with-comma-in-quotes",
        ),
        pytest.param(
            'private="X-User", max-age=5', CacheControl(max_age=5, private=True), id="qualified"
        ),
        pytest.param(
            'max-age=60, no-store, must-revalidate, immutable, x-ext="a,b"',
            CacheControl(max_age=60, no_store=True),
            id="unknown-directives-ignored",
        ),
        pytest.param("no store, max-age=9", CacheControl(max_age=9), id="garbage-element-ignored"),
        pytest.param(",,max-age=7,,", CacheControl(max_age=7), id="empty-elements"),
    ],
)
def test_cache_control_parsing(header: str | None, expected: CacheControl) -> None:
    assert parse_cache_control(header) == expected


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        pytest.param(None, 0.0, id="absent"),
        pytest.param("30", 30.0, id="seconds"),
        pytest.param("30, 40", 30.0, id="list-takes-first"),
        pytest.param("-3", 0.0, id="invalid-ignored"),
        pytest.param("soon", 0.0, id="word-ignored"),
    ],
)
def test_age_header_parsing(age: str | None, expected: float) -> None:
    assert parse_cache_control("max-age=60", age).age == expected


@pytest.mark.respx(base_url=BASE)
async def test_fetch_reports_the_headers_of_successful_calls_only(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    headers = {"Cache-Control": "max-age=60, s-maxage=30", "Age": "5"}
    respx_mock.get("/ok").respond(json={}, headers=headers)
    respx_mock.get("/bad").respond(500, json={}, headers=headers)

    ok = await fetch(httpx_client, "x", UpstreamConfig(url=f"{BASE}/ok"), {}, max_body=100)
    bad = await fetch(httpx_client, "x", UpstreamConfig(url=f"{BASE}/bad"), {}, max_body=100)

    assert ok.cache_control == CacheControl(max_age=60, s_maxage=30, age=5)
    assert ok.cache is None  # fetch knows nothing of caches
    assert bad.status == "http_status" and bad.cache_control is None


# -- the decision: how long to keep a payload (cache/sources.py) -------------------------------


def _upstream(cache_ttl: float | None = None) -> UpstreamConfig:
    return UpstreamConfig(url=f"{BASE}/x", cache_ttl=cache_ttl)


@pytest.mark.parametrize(
    ("cache_ttl", "cc", "ttl"),
    [
        pytest.param(None, CacheControl(max_age=60), 60, id="max-age"),
        pytest.param(None, CacheControl(max_age=60, s_maxage=10), 10, id="s-maxage-preferred"),
        pytest.param(None, CacheControl(max_age=0, s_maxage=10), 10, id="s-maxage-over-zero"),
        pytest.param(None, CacheControl(max_age=60, age=45), 15, id="age-subtracted"),
        pytest.param(None, CacheControl(max_age=60, age=90), 0, id="already-stale"),
        pytest.param(None, CacheControl(max_age=2.0**31), MAX_SOURCE_TTL, id="capped"),
        pytest.param(None, CacheControl(max_age=0), 0, id="max-age-zero"),
        pytest.param(None, CacheControl(), 0, id="no-max-age-never"),
        pytest.param(None, None, 0, id="no-header-info-never"),
        pytest.param(None, CacheControl(max_age=60, no_store=True), 0, id="no-store-never"),
        pytest.param(None, CacheControl(max_age=60, no_cache=True), 0, id="no-cache-never"),
        pytest.param(None, CacheControl(s_maxage=60, private=True), 0, id="private-never"),
        pytest.param(30, CacheControl(max_age=60), 30, id="override-wins"),
        pytest.param(30, CacheControl(), 30, id="override-without-max-age"),
        pytest.param(30, CacheControl(max_age=60, no_store=True), 30, id="override-beats-no-store"),
        pytest.param(0, CacheControl(max_age=60), 0, id="zero-override-never"),
        pytest.param(0, CacheControl(s_maxage=60), 0, id="zero-override-beats-s-maxage"),
    ],
)
def test_ttl_decision(cache_ttl: float | None, cc: CacheControl | None, ttl: float) -> None:
    assert source_ttl(_upstream(cache_ttl), cc) == ttl


def test_envelope_reports_cache_only_where_a_source_cache_applied() -> None:
    results = {
        "a": SourceResult(name="a", status="ok", ms=0.0, data=1, cache="hit"),
        "b": SourceResult(name="b", status="ok", ms=9.0, data=2, cache="miss"),
        "c": SourceResult(name="c", status="ok", ms=9.0, data=3),
        "d": SourceResult(name="d", status="timeout", ms=9.0, detail="slow"),
    }

    envelope, status = merge(results, required=[])

    sources = envelope.model_dump(mode="json", exclude_none=True)["sources"]
    assert {name: info.get("cache") for name, info in sources.items()} == {
        "a": "hit",
        "b": "miss",
        "c": None,
        "d": None,
    }
    assert status == 200


# -- SourceCache on a fake clock (no HTTP) ----------------------------------------------------

UNIT_CONFIG = """
[upstreams.weather]
url = "http://127.0.0.1:9/weather/{{city}}"
schema = "aggregator.demo.models:Weather"
{weather_extra}

[upstreams.raw]
url = "http://127.0.0.1:9/raw/{{city}}"

[upstreams.never]
url = "http://127.0.0.1:9/never"
cache_ttl = 0

[aggregates.all]
path = "/all"
sources = ["weather", "raw", "never"]
params = {{ city = "str" }}
"""

WEATHER = {
    "city": "Paris",
    "temperature_c": 21.0,
    "conditions": "sunny",
    "updated_at": "2024-05-01T12:00:00Z",
}


def make_source_cache(weather_extra: str = "") -> tuple[SourceCache, AppConfig, Clock]:
    config = parse_config(UNIT_CONFIG.format(weather_extra=weather_extra), "test")
    settings = Settings(cache_type="simple")
    store = CacheStore(build_cache(Flask("t"), settings), settings)
    clock = Clock()
    return SourceCache(store, config, clock=clock), config, clock


def ok(name: str, data: Any, cc: CacheControl | None) -> SourceResult:
    return SourceResult(name=name, status="ok", ms=100.0, data=data, cache_control=cc)


async def test_stored_payload_is_a_hit_until_its_ttl_runs_out() -> None:
    cache, config, clock = make_source_cache()
    agg = config.aggregates["all"]
    assert await cache.lookup(agg, PARIS) == {}  # no upstream has said it may be cached yet

    await cache.store(PARIS, {"weather": ok("weather", WEATHER, CacheControl(max_age=10))})
    clock.now += 9.9
    found = await cache.lookup(agg, PARIS)
    clock.now += 0.1
    expired = await cache.lookup(agg, PARIS)

    hit = found["weather"]
    assert hit is not None
    assert (hit.status, hit.cache, hit.data) == ("ok", "hit", WEATHER)
    assert hit.ms < 50
    assert "raw" not in found  # never answered cacheably: not asked
    assert expired["weather"] is None


async def test_only_upstreams_that_may_be_cached_are_looked_up() -> None:
    cache, config, _ = make_source_cache("cache_ttl = 30")
    agg = config.aggregates["all"]
    asked: list[tuple[str, ...]] = []
    real_get_many = cache.cache_store.get_many

    async def spy(*keys: str) -> list[Any]:
        asked.append(keys)
        return await real_get_many(*keys)

    cache.cache_store.get_many = spy  # type: ignore[method-assign]
    first = await cache.lookup(agg, PARIS)
    await cache.store(PARIS, {"raw": ok("raw", [], CacheControl(max_age=60, no_store=True))})
    still = await cache.lookup(agg, PARIS)
    await cache.store(PARIS, {"raw": ok("raw", [1], CacheControl(max_age=60))})
    learned = await cache.lookup(agg, PARIS)
    # Another process sharing the store has not seen raw's answer: it does not ask for it yet.
    other = SourceCache(cache.cache_store, config, clock=cache.clock)
    elsewhere = await other.lookup(agg, PARIS)

    assert list(first) == ["weather"] == list(still)  # explicit cache_ttl: asked from the start
    assert list(learned) == ["weather", "raw"] and learned["raw"] is not None
    assert list(elsewhere) == ["weather"]
    assert all(not any("never" in k for k in keys) for keys in asked)


async def test_payloads_are_keyed_by_the_rendered_url() -> None:
    cache, config, _ = make_source_cache()
    agg = config.aggregates["all"]
    await cache.store(PARIS, {"raw": ok("raw", [1, None], CacheControl(max_age=60))})

    same_url = await cache.lookup(agg, {"city": "Paris", "unused": 7})
    other_url = await cache.lookup(agg, {"city": "Oslo"})

    hit = same_url["raw"]
    assert hit is not None and hit.data == [1, None]  # no model: JSON as stored
    assert other_url["raw"] is None


async def test_failures_hits_and_uncacheable_results_are_not_stored() -> None:
    cache, config, _ = make_source_cache()
    writes: list[str] = []
    real_set = cache.cache_store.set

    async def spy(key: str, value: bytes, timeout: int) -> None:
        writes.append(key)
        await real_set(key, value, timeout)

    cache.cache_store.set = spy  # type: ignore[method-assign]
    failed = SourceResult(name="weather", status="timeout", ms=1.0)
    hit = SourceResult(name="raw", status="ok", ms=0.0, data=[], cache="hit")
    never = ok("never", {}, CacheControl(max_age=60))

    await cache.store(PARIS, {"weather": failed, "raw": hit, "never": never})
    await cache.store(PARIS, {"raw": ok("raw", [], CacheControl(max_age=60, no_store=True))})

    assert writes == []


async def test_entries_stored_before_an_upstream_purge_are_misses() -> None:
    cache, config, clock = make_source_cache()
    agg = config.aggregates["all"]
    service = AggregateCache(cache.cache_store, config, Settings(), _no_fill, clock=clock)
    cc = CacheControl(max_age=60)
    await cache.store(PARIS, {"weather": ok("weather", WEATHER, cc), "raw": ok("raw", 1, cc)})
    clock.now += 1

    await purge(service, upstream="weather")
    found = await cache.lookup(agg, PARIS)
    clock.now += 1
    await cache.store(PARIS, {"weather": ok("weather", WEATHER, cc)})
    healed = await cache.lookup(agg, PARIS)

    assert found["weather"] is None
    assert found["raw"] is not None  # only the purged upstream
    assert healed["weather"] is not None


async def _no_fill(name: str, params: Mapping[str, ParamValue], **_: Any) -> Any:
    raise AssertionError("no fill expected")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x80garbage", id="not-json"),
        pytest.param(b'{"v": 2, "stored": 1000000, "ttl": 60, "data": {}}', id="other-format"),
        pytest.param(b'{"stored": "soon", "ttl": 60, "data": {}}', id="bad-meta"),
        pytest.param(
            b'{"v": 1, "stored": 1000000, "ttl": 60, "data": {"city": 42}}', id="fails-model"
        ),
        pytest.param(7, id="an-int-not-bytes"),  # what the serializer hands back for b"#7"
    ],
)
async def test_unreadable_entries_are_misses(raw: object) -> None:
    cache, config, _ = make_source_cache("cache_ttl = 30")
    url = config.upstreams["weather"].template.render(PARIS)
    cache.cache_store.backend.set(source_key("weather", url), raw, timeout=60)

    found = await cache.lookup(config.aggregates["all"], PARIS)

    assert found["weather"] is None


async def test_one_get_many_for_every_source_and_marker() -> None:
    cache, config, _ = make_source_cache()
    calls: list[tuple[str, ...]] = []
    real_get_many = cache.cache_store.get_many

    async def spy(*keys: str) -> list[Any]:
        calls.append(keys)
        return await real_get_many(*keys)

    cache.cache_store.get_many = spy  # type: ignore[method-assign]
    cc = CacheControl(max_age=60)  # both have answered cacheably (for another city)
    await cache.store(
        {"city": "Oslo"}, {"weather": ok("weather", WEATHER, cc), "raw": ok("raw", 1, cc)}
    )

    await cache.lookup(config.aggregates["all"], PARIS)

    assert len(calls) == 1
    keys = calls[0]
    assert sorted(k for k in keys if k.startswith("src:")) == sorted(
        source_key(n, config.upstreams[n].template.render(PARIS)) for n in ("weather", "raw")
    )
    assert sorted(k for k in keys if k.startswith("purged:")) == [
        "purged:src:raw",
        "purged:src:weather",
    ]


async def test_cache_errors_mean_no_source_caching(monkeypatch: pytest.MonkeyPatch) -> None:
    cache, config, _ = make_source_cache()

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise CacheUnavailableError("down")

    monkeypatch.setattr(cache.cache_store, "get_many", down)
    monkeypatch.setattr(cache.cache_store, "set", down)

    assert await cache.lookup(config.aggregates["all"], PARIS) == {}
    await cache.store(PARIS, {"weather": ok("weather", WEATHER, CacheControl(max_age=60))})


async def test_explicit_cache_ttl_is_the_entry_ttl() -> None:
    cache, config, clock = make_source_cache("cache_ttl = 5")
    agg = config.aggregates["all"]
    await cache.store(PARIS, {"weather": ok("weather", WEATHER, CacheControl(max_age=600))})
    clock.now += 4.9
    assert (await cache.lookup(agg, PARIS))["weather"] is not None
    clock.now += 0.1
    assert (await cache.lookup(agg, PARIS))["weather"] is None


# -- fan_out with a source cache (fake cache, real demo) ---------------------------------------


class FakeSourceCache:
    """Hits for `hits`, misses for the rest; records what fan_out stores."""

    def __init__(self, hits: Mapping[str, Any]) -> None:
        self.hits = hits
        self.stored: list[dict[str, SourceResult]] = []

    async def lookup_sources(
        self, sources: Iterable[str], values: Mapping[str, ParamValue]
    ) -> dict[str, SourceResult | None]:
        return {
            name: SourceResult(name=name, status="ok", ms=0.0, data=self.hits[name], cache="hit")
            if name in self.hits
            else None
            for name in sources
        }

    async def store(
        self, values: Mapping[str, ParamValue], results: Mapping[str, SourceResult]
    ) -> None:
        self.stored.append(dict(results))


def _fanout_config(demo_url: str) -> AppConfig:
    return parse_config(
        f"""
[upstreams.fast]
url = "{demo_url}/profile/{{user_id}}?delay=0"
[upstreams.broken]
url = "{demo_url}/profile/{{user_id}}?status=503"
[upstreams.hanging]
url = "{demo_url}/stocks/{{user_id}}?delay=5"
timeout = 60

[aggregates.mixed]
path = "/mixed"
sources = ["hanging", "fast", "broken"]
params = {{ user_id = "int" }}
deadline = 0.5
""",
        "test",
    )


@pytest.mark.integration
async def test_fan_out_calls_only_the_misses_and_stores_their_successes(
    demo: DemoProcess,
) -> None:
    config = _fanout_config(demo.url)
    cache = FakeSourceCache({"hanging": {"cached": True}})
    reset_demo(demo)
    async with build_client(Settings()) as client:
        results = await fan_out(
            client,
            config,
            config.aggregates["mixed"],
            {"user_id": 7},
            max_body=10_000,
            source_cache=cache,
        )

    assert list(results) == ["hanging", "fast", "broken"]  # config order, hits included
    assert results["hanging"].cache == "hit" and results["hanging"].data == {"cached": True}
    assert (results["fast"].status, results["fast"].cache) == ("ok", "miss")
    assert (results["broken"].status, results["broken"].cache) == ("http_status", None)
    assert [list(s) for s in cache.stored] == [["fast"]]
    assert demo_stats(demo)["requests"]["stocks"] == 0  # the hit was not called


@pytest.mark.integration
async def test_fan_out_with_every_source_cached_calls_nothing(demo: DemoProcess) -> None:
    config = _fanout_config(demo.url)
    cache = FakeSourceCache({"hanging": 1, "fast": 2, "broken": 3})
    reset_demo(demo)
    async with build_client(Settings()) as client:
        results = await fan_out(
            client,
            config,
            config.aggregates["mixed"],
            {"user_id": 7},
            max_body=1,
            source_cache=cache,
        )

    assert {n: (r.data, r.cache) for n, r in results.items()} == {
        "hanging": (1, "hit"),
        "fast": (2, "hit"),
        "broken": (3, "hit"),
    }
    assert cache.stored == []
    assert demo_stats(demo)["total_requests"] == 0


@pytest.mark.integration
async def test_fan_out_with_a_source_cache_keeps_deadline_and_cancellation_hygiene(
    demo: DemoProcess,
) -> None:
    config = _fanout_config(demo.url)
    cache = FakeSourceCache({})
    async with build_client(Settings()) as client:
        results = await fan_out(
            client,
            config,
            config.aggregates["mixed"],
            {"user_id": 7},
            max_body=10_000,
            source_cache=cache,
        )
        assert results["hanging"].status == "deadline" and results["hanging"].cache is None
        assert [list(s) for s in cache.stored] == [["fast"]]

        task = asyncio.create_task(
            fan_out(
                client,
                config,
                config.aggregates["mixed"],
                {"user_id": 7},
                max_body=10_000,
                source_cache=cache,
            )
        )
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("upstream:")]
    assert leftovers == []
    # A source that answered before the cancel is kept as it landed; nothing else is stored.
    assert [list(s) for s in cache.stored[1:]] in ([], [["fast"]])


# -- the real stack: demo upstreams, Flask test client and ASGI in-process ----------------------


def stack_config(demo_url: str, weather_query: str = MAX_AGE_60, weather_extra: str = "") -> str:
    return f"""
[upstreams.weather]
url = "{demo_url}/weather/{{city}}?delay=0&{weather_query}"
schema = "aggregator.demo.models:Weather"
{weather_extra}

[upstreams.profile]
url = "{demo_url}/profile/{{user_id}}?delay=0"
schema = "aggregator.demo.models:Profile"

[aggregates.city]
path = "/city"
sources = ["weather"]
params = {{ city = "str" }}

[aggregates.board]
path = "/board"
sources = ["weather", "profile"]
params = {{ city = "str", user_id = "int", units = {{ type = "str", default = "metric" }} }}
"""


def stack_client(write_config: Any, text: str) -> tuple[FlaskClient, Flask]:
    app = create_app(Settings(config=write_config(text)))
    return app.test_client(), app


def weather_calls(demo: DemoProcess) -> int:
    calls: int = demo_stats(demo)["requests"]["weather"]
    return calls


def weather_cache(response: Any) -> str | None:
    value: str | None = response.json["sources"]["weather"].get("cache")
    return value


def weather_key(app: Flask) -> str:
    config: AppConfig = engine_of(app).config
    return source_key("weather", config.upstreams["weather"].template.render(PARIS))


@pytest.mark.integration
def test_one_call_serves_other_aggregates_and_params_with_the_same_url(demo, write_config):
    client, _ = stack_client(write_config, stack_config(demo.url))
    reset_demo(demo)

    first = client.get("/city?city=Paris")
    second = client.get("/board?user_id=7&city=Paris")

    assert first.status_code == 200 and second.status_code == 200
    # The first answer is how this process learns weather may be cached: not looked up before.
    assert (weather_cache(first), weather_cache(second)) == (None, "hit")
    assert second.json is not None and first.json is not None
    assert second.json["data"]["weather"] == first.json["data"]["weather"]
    assert second.json["sources"]["weather"]["ms"] < 50
    assert "cache" not in second.json["sources"]["profile"]  # never cacheable: not looked up
    assert weather_calls(demo) == 1


@pytest.mark.integration
async def test_source_cache_on_the_server_loop(demo, write_config):
    adapter = create_asgi_app(Settings(config=write_config(stack_config(demo.url))))
    reset_demo(demo)
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]
    async with adapter.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        first = await c.get("/board?city=Paris&user_id=7")
        second = await c.get("/city?city=Paris")
        other_city = await c.get("/city?city=Oslo")
    assert [r.json()["sources"]["weather"].get("cache") for r in (first, second, other_city)] == [
        None,
        "hit",
        "miss",
    ]
    assert weather_calls(demo) == 2


@pytest.mark.integration
@pytest.mark.parametrize(
    ("query", "extra", "label"),
    [
        pytest.param("cc=no-store", "", None, id="no-store"),
        pytest.param("cc=private%2C%20max-age%3D60", "", None, id="private"),
        pytest.param("cc=no-cache%2C%20max-age%3D60", "", None, id="no-cache"),
        pytest.param("x=1", "", None, id="no-cache-control"),
        pytest.param(MAX_AGE_60, "cache_ttl = 0", None, id="cache-ttl-0-beats-max-age"),
    ],
)
def test_uncacheable_sources_are_called_every_time(demo, write_config, query, extra, label):
    client, _ = stack_client(write_config, stack_config(demo.url, query, extra))
    reset_demo(demo)

    responses = [client.get("/city?city=Paris") for _ in range(3)]

    assert all(r.status_code == 200 for r in responses)
    # None: never looked up (it never answered cacheably, or the config says never)
    assert [weather_cache(r) for r in responses] == [label] * 3
    assert weather_calls(demo) == 3


@pytest.mark.integration
def test_explicit_cache_ttl_caches_without_cache_control(demo, write_config):
    client, _ = stack_client(write_config, stack_config(demo.url, "x=1", "cache_ttl = 60"))
    reset_demo(demo)

    responses = [client.get("/city?city=Paris") for _ in range(3)]

    assert [weather_cache(r) for r in responses] == ["miss", "hit", "hit"]
    assert weather_calls(demo) == 1


@pytest.mark.integration
def test_failed_sources_are_not_cached_and_carry_no_cache_field(demo, write_config):
    # retries = 0: one call per request, so the count below shows nothing was served from cache
    config = stack_config(demo.url, f"{MAX_AGE_60}&status=503", "retries = 0")
    client, _ = stack_client(write_config, config)
    reset_demo(demo)

    responses = [client.get("/city?city=Paris") for _ in range(2)]

    for response in responses:
        assert response.json is not None
        info = response.json["sources"]["weather"]
        assert info["status"] == "http_status" and "cache" not in info
    assert weather_calls(demo) == 2


@pytest.mark.integration
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x80 not an entry", id="corrupted"),
        pytest.param(
            SourceEntry(stored=time.time(), ttl=60, data={"city": "Paris", "temperature_c": "hot"})
            .model_dump_json()
            .encode(),
            id="no-longer-validates",
        ),
    ],
)
def test_unreadable_source_entry_is_a_miss_and_is_refetched(demo, write_config, raw):
    client, app = stack_client(write_config, stack_config(demo.url))
    client.get("/city?city=Paris")
    store: CacheStore = engine_of(app).sources.cache_store
    store.backend.set(weather_key(app), raw, timeout=60)
    reset_demo(demo)

    refetched = client.get("/city?city=Paris")
    healed = client.get("/city?city=Paris")

    assert refetched.status_code == 200 and refetched.json is not None
    assert refetched.json["data"]["weather"]["city"] == "Paris"
    assert (weather_cache(refetched), weather_cache(healed)) == ("miss", "hit")
    assert weather_calls(demo) == 1


@pytest.mark.integration
@pytest.mark.parametrize("broken", ["get_many", "set"])
def test_requests_succeed_when_the_source_cache_is_down(demo, write_config, monkeypatch, broken):
    client, app = stack_client(write_config, stack_config(demo.url))
    store: CacheStore = engine_of(app).sources.cache_store

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise CacheUnavailableError("down")

    monkeypatch.setattr(store, broken, down)
    reset_demo(demo)

    responses = [client.get("/board?city=Paris&user_id=7") for _ in range(2)]

    assert all(r.status_code == 200 for r in responses)
    assert all(r.json is not None and r.json["complete"] for r in responses)
    # The first answer teaches that weather may be cached; with the lookup down it stays None.
    expected = None if broken == "get_many" else "miss"
    assert [weather_cache(r) for r in responses] == [None, expected]
    assert weather_calls(demo) == 2


@pytest.mark.integration
def test_purging_an_upstream_makes_its_next_call_a_miss(demo, write_config):
    client, app = stack_client(write_config, stack_config(demo.url))
    service: AggregateCache = engine_of(app).cache
    reset_demo(demo)

    before = [client.get("/city?city=Paris") for _ in range(2)]
    purged = asyncio.run(purge(service, upstream="weather"))
    after = [client.get("/board?city=Paris&user_id=7") for _ in range(2)]

    assert "upstream weather" in purged
    assert [weather_cache(r) for r in before + after] == [None, "hit", "miss", "hit"]
    assert weather_calls(demo) == 2


@pytest.mark.integration
def test_one_get_many_per_fan_out(demo, write_config, monkeypatch):
    client, app = stack_client(write_config, stack_config(demo.url))
    store: CacheStore = engine_of(app).sources.cache_store
    calls: list[tuple[str, ...]] = []
    real_get_many = store.get_many

    async def spy(*keys: str) -> list[Any]:
        calls.append(keys)
        return await real_get_many(*keys)

    monkeypatch.setattr(store, "get_many", spy)

    for city in ("Paris", "Oslo", "Rome"):
        assert client.get(f"/board?city={city}&user_id=7").status_code == 200

    source_lookups = [keys for keys in calls if any(k.startswith("src:") for k in keys)]
    # None before weather first answered cacheably; then one per fan-out, for weather and its
    # purge marker only (profile never says it may be cached, so it is never looked up).
    assert len(source_lookups) == 2
    assert all(len(keys) == 2 for keys in source_lookups)
