"""The aggregate cache's rules, with a fake fill and a fake clock (no HTTP, no sleeping)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from aggregator import create_app, create_asgi_app
from aggregator.cache import Caller, purge
from aggregator.cache.entries import aggregate_key, canonical_params, etag_for
from aggregator.config import parse_config
from aggregator.errors import CacheUnavailableError
from aggregator.params import ParamValue
from aggregator.settings import Settings
from tests.support.demo import demo_stats, reset_demo
from tests.support.fake_cache import CONFIG, P, headers, make_cache


async def test_miss_then_hit_with_age_and_shrinking_max_age():
    service, upstream, clock = make_cache()
    first = await service.answer("dash", P, None)
    clock.now += 4
    second = await service.answer("dash", P, None)
    assert upstream.calls == 1
    assert headers(first)["X-Cache"] == "MISS"
    assert headers(first)["Cache-Control"] == "max-age=10"
    assert headers(second)["X-Cache"] == "HIT"
    assert headers(second)["Age"] == "4"
    assert headers(second)["Cache-Control"] == "max-age=6"
    assert second.body == first.body
    assert headers(second)["ETag"] == headers(first)["ETag"]


def test_key_ignores_order_and_spelling_of_the_query():
    config = parse_config(CONFIG.format(extra="cache_ttl = 10"), "t").aggregates["dash"]
    a = config.parse_params({"city": ["Paris"], "n": ["07"]})
    b = config.parse_params({"n": ["+7"], "city": ["Paris"]})
    assert aggregate_key("dash", a) == aggregate_key("dash", b) == "agg:dash:city=Paris&n=7"
    assert canonical_params({"city": "a&b=c"}) == "city=a%26b%3Dc"  # values cannot forge keys


async def test_expired_entry_is_a_miss():
    service, upstream, clock = make_cache()
    await service.answer("dash", P, None)
    clock.now += 10.01
    again = await service.answer("dash", P, None)
    assert headers(again)["X-Cache"] == "MISS" and upstream.calls == 2


@pytest.mark.parametrize(
    ("extra", "stored"),
    [
        pytest.param("cache_ttl = 10", False, id="partial-not-cached-by-default"),
        pytest.param("cache_ttl = 10\ncache_partial_ttl = 2", True, id="partial-ttl-set"),
    ],
)
async def test_partial_answers_are_cached_only_with_cache_partial_ttl(extra, stored):
    service, upstream, clock = make_cache(extra)
    upstream.complete = False
    first = await service.answer("dash", P, None)
    await service.answer("dash", P, None)
    assert headers(first)["X-Aggregate-Complete"] == "false"
    assert upstream.calls == (1 if stored else 2)
    if stored:
        assert headers(first)["Cache-Control"] == "max-age=2"
        clock.now += 2.5
        await service.answer("dash", P, None)
        assert upstream.calls == 2  # the short partial TTL ran out
    else:
        assert headers(first)["Cache-Control"] == "no-store"


async def test_failed_answers_are_never_cached():
    service, upstream, _ = make_cache()
    upstream.status = 502
    first = await service.answer("dash", P, None)
    await service.answer("dash", P, None)
    assert first.status == 502 and upstream.calls == 2
    assert headers(first)["Cache-Control"] == "no-store"


async def test_etag_and_if_none_match_give_304_without_a_body():
    service, _, _ = make_cache()
    miss = await service.answer("dash", P, None)
    etag = headers(miss)["ETag"]
    hit_304 = await service.answer("dash", P, Caller(etag))
    assert etag.startswith('W/"')  # weak: over the content, not the bytes (sources' ms)
    # Weak comparison: in a list, and with or without the W/ prefix.
    weak_list = await service.answer("dash", P, Caller(f'"other", {etag.removeprefix("W/")}'))
    changed = await service.answer("dash", P, Caller('"something-else"'))
    assert (hit_304.status, hit_304.body) == (304, b"")
    assert headers(hit_304)["ETag"] == etag
    assert weak_list.status == 304
    assert changed.status == 200 and changed.body == miss.body
    # a miss with a matching If-None-Match (another replica served it) is a 304 too
    service2, _, _ = make_cache()
    assert (await service2.answer("dash", P, Caller(etag))).status == 304


async def test_stale_while_revalidate_serves_at_once_and_refreshes_once_in_background():
    service, upstream, clock = make_cache("cache_ttl = 10\nstale_ttl = 30")
    await service.start()  # as the lifespan does: background refreshes need the server loop
    try:
        first = await service.answer("dash", P, None)
        clock.now += 15
        upstream.delay = 0.2  # a slow refresh must not slow the stale answers
        stale = await asyncio.gather(*[service.answer("dash", P, None) for _ in range(5)])
        assert {headers(a)["X-Cache"] for a in stale} == {"STALE"}
        assert {headers(a)["X-Cache-Stale"] for a in stale} == {"refreshing"}
        for answer in stale:  # the stored answer, saying it is stale and why
            body = json.loads(answer.body)
            assert body.pop("stale") == {"age": 15.0, "reason": "refreshing"}
            assert body == json.loads(first.body)
        assert headers(stale[0])["ETag"] == headers(first)["ETag"]  # the content is the same
        assert headers(stale[0])["Cache-Control"] == "max-age=0"
        await asyncio.sleep(0.4)
        assert upstream.calls == 2  # one refresh for five stale answers
        fresh = await service.answer("dash", P, None)
        assert headers(fresh)["X-Cache"] == "HIT" and fresh.body != first.body
    finally:
        await service.stop()


async def test_stale_if_error_serves_the_last_good_answer_instead_of_a_502():
    service, upstream, clock = make_cache("cache_ttl = 10\nstale_if_error_ttl = 100")
    good = await service.answer("dash", P, None)
    upstream.status = 502
    clock.now += 50
    answer = await service.answer("dash", P, None)
    body = json.loads(answer.body)
    assert answer.status == 200 and body.pop("stale") == {
        "age": 50.0,
        "reason": "refresh_failed",
        "detail": 'status=502; failed="a"',
    }
    assert body == json.loads(good.body)  # the last good answer, saying why it is served
    assert headers(answer)["X-Cache"] == "STALE"
    assert headers(answer)["X-Cache-Stale"] == 'refresh-failed; status=502; failed="a"'
    clock.now += 100  # past the stale-if-error window: the failure shows
    assert (await service.answer("dash", P, None)).status == 502


async def test_single_flight_one_fill_for_many_concurrent_misses():
    service, upstream, _ = make_cache()
    upstream.delay = 0.1
    answers = await asyncio.gather(*[service.answer("dash", P, None) for _ in range(100)])
    assert upstream.calls == 1
    assert len({a.body for a in answers}) == 1


async def test_single_flight_wait_is_bounded_then_requests_fill_alone():
    service, upstream, _ = make_cache(singleflight_wait=0.05)
    upstream.delay = 0.3
    answers = await asyncio.gather(*[service.answer("dash", P, None) for _ in range(3)])
    assert all(a.status == 200 for a in answers)
    assert upstream.calls == 1 + 3  # the shared fill, then each waiter's own


async def test_a_cancelled_requester_does_not_cancel_the_fill_others_wait_for():
    service, upstream, _ = make_cache()
    upstream.delay = 0.2
    leader = asyncio.create_task(service.answer("dash", P, None))
    await asyncio.sleep(0.05)
    follower = asyncio.create_task(service.answer("dash", P, None))
    await asyncio.sleep(0.01)
    leader.cancel()
    answer = await follower
    assert answer.status == 200 and upstream.calls == 1


async def test_a_cache_outage_does_not_multiply_upstream_load():
    service, upstream, _ = make_cache()
    upstream.delay = 0.1

    async def down(*keys: str) -> list[Any]:
        raise CacheUnavailableError("down")

    service.store.get_many = down  # type: ignore[method-assign]
    answers = await asyncio.gather(*[service.answer("dash", P, None) for _ in range(50)])
    assert {headers(a)["X-Cache"] for a in answers} == {"BYPASS"}
    assert {headers(a)["Cache-Control"] for a in answers} == {"no-store"}
    assert upstream.calls == 1  # one shared fan-out, not fifty


async def test_purge_one_entry_or_the_whole_aggregate():
    service, upstream, clock = make_cache()
    other: dict[str, ParamValue] = {"city": "Oslo", "n": 1}
    await service.answer("dash", P, None)
    await service.answer("dash", other, None)
    await purge(service, aggregate="dash", params=P)
    assert headers(await service.answer("dash", P, None))["X-Cache"] == "MISS"
    assert headers(await service.answer("dash", other, None))["X-Cache"] == "HIT"
    clock.now += 1
    await purge(service, aggregate="dash")
    assert headers(await service.answer("dash", other, None))["X-Cache"] == "MISS"


async def test_garbage_under_the_key_is_a_miss_that_heals():
    service, upstream, _ = make_cache()
    service.store.backend.set(aggregate_key("dash", P), b"\x80garbage\n{", timeout=60)
    first = await service.answer("dash", P, None)
    second = await service.answer("dash", P, None)
    assert headers(first)["X-Cache"] == "MISS" and headers(second)["X-Cache"] == "HIT"


async def test_a_tampered_body_fails_its_etag_check_and_is_a_miss():
    service, upstream, _ = make_cache()
    await service.answer("dash", P, None)
    key = aggregate_key("dash", P)
    raw = service.store.backend.get(key)
    service.store.backend.set(key, raw.replace(b'"call": 1', b'"call": 9'), timeout=60)
    assert headers(await service.answer("dash", P, None))["X-Cache"] == "MISS"
    assert upstream.calls == 2


async def test_near_cache_skips_the_backend_for_hot_keys_and_a_purge_clears_it():
    service, upstream, _ = make_cache(cache_local_ttl=30)
    reads = 0
    real_get_many = service.store.get_many

    async def counting_get_many(*keys: str) -> list[Any]:
        nonlocal reads
        reads += 1
        return await real_get_many(*keys)

    service.store.get_many = counting_get_many  # type: ignore[method-assign]
    await service.answer("dash", P, None)  # miss: one read, then stored (and remembered)
    hits = [await service.answer("dash", P, None) for _ in range(20)]
    assert {headers(h)["X-Cache"] for h in hits} == {"HIT"} and reads == 1
    await purge(service, aggregate="dash", params=P)
    assert headers(await service.answer("dash", P, None))["X-Cache"] == "MISS"
    assert reads == 2 and upstream.calls == 2


async def test_near_cache_never_outlives_the_entry_ttl():
    service, upstream, clock = make_cache(cache_local_ttl=30)
    await service.answer("dash", P, None)
    clock.now += 10.5  # the entry's own TTL (10 s) has run out, though the near cache's has not
    assert headers(await service.answer("dash", P, None))["X-Cache"] == "MISS"
    assert upstream.calls == 2


# -- through the real stack ------------------------------------------------------------------


def _cached_config(demo_url: str) -> str:
    return f"""
[upstreams.weather]
url = "{demo_url}/weather/{{city}}?delay=0.05"
schema = "aggregator.demo.models:Weather"

[aggregates.w]
path = "/w"
sources = ["weather"]
params = {{ city = "str", units = {{ type = "str", default = "metric" }} }}
cache_ttl = 60
"""


@pytest.mark.integration
async def test_fresh_hits_are_answered_before_flask(demo, write_config):
    path = write_config(_cached_config(demo.url))
    settings = Settings(config=path)
    adapter = create_asgi_app(settings)
    entered_flask: list[str] = []
    adapter.app.before_request(lambda: entered_flask.append("x"))
    reset_demo(demo)
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]
    async with adapter.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        miss = await c.get("/w", params={"city": "Paris"})
        hits = [await c.get("/w?units=metric&city=Paris") for _ in range(5)]
        not_modified = await c.get("/w?city=Paris", headers={"If-None-Match": miss.headers["etag"]})
        head = await c.head("/w?city=Paris")
    assert miss.headers["x-cache"] == "MISS"
    assert [h.headers["x-cache"] for h in hits] == ["HIT"] * 5
    assert all(h.content == miss.content for h in hits)
    assert hits[0].headers["content-type"] == "application/json"
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert head.status_code == 200 and head.content == b"" and head.headers["x-cache"] == "HIT"
    assert entered_flask == ["x"]  # only the miss went through Flask
    assert demo_stats(demo)["requests"]["weather"] == 1


@pytest.mark.integration
def test_flask_test_client_path_caches_too(demo, write_config):
    client = create_app(Settings(config=write_config(_cached_config(demo.url)))).test_client()
    first = client.get("/w?city=Oslo")
    second = client.get("/w?city=Oslo")
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.json == first.json


@pytest.mark.integration
def test_bad_parameters_still_get_a_400_not_a_cache_answer(demo, write_config):
    client = create_app(Settings(config=write_config(_cached_config(demo.url)))).test_client()
    r = client.get("/w?city=")
    assert r.status_code == 400 and r.json is not None and r.json["field"] == "city"


def test_the_etag_is_over_the_content_not_the_timings() -> None:
    def body(data: str, ms: float, complete: str = "true") -> bytes:
        return (
            b'{"data":{"a":' + data.encode() + b'},"errors":{},"sources":{"a":{"status":"ok",'
            b'"ms":%r}},"complete":' % ms + complete.encode() + b"}"
        )

    same = etag_for(body('"x"', 1.5)), etag_for(body('"x"', 97.0))
    assert same[0] == same[1] and same[0].startswith('W/"')
    assert etag_for(body('"y"', 1.5)) != same[0]  # other data
    assert etag_for(body('"x"', 1.5, "false")) != same[0]  # other completeness
    assert etag_for(body('"x"', 1.5), status=502) != same[0]  # other status
    # A payload with keys like the envelope's own: only the envelope's `sources` is skipped.
    nested = '{"n":1,"sources":2,"complete":3}'
    assert etag_for(body(nested, 1.0)) == etag_for(body(nested, 2.0))
    assert etag_for(body(nested, 1.0)) != etag_for(body(nested.replace("2", "9"), 1.0))
