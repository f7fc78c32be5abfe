"""Server-Timing: one entry per source a request waited for, plus `cache` and `total`."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from aggregator.cache import Caller
from aggregator.cache.headers import Answer
from aggregator.serving.fastpath import FastPath
from tests.support.configs import cached_config
from tests.support.fake_cache import P, headers, make_cache

_ENTRY = re.compile(r'^([\w-]+)(?:;dur=([0-9.]+))?(?:;desc="([^"]*)")?(?:;start=([0-9.]+))?$')


def timing(source: Answer | httpx.Response) -> dict[str, tuple[float, str | None, float | None]]:
    """Parse Server-Timing into {name: (dur, desc, start)}; every entry must have a duration."""
    raw = (
        headers(source)["Server-Timing"]
        if isinstance(source, Answer)
        else source.headers["server-timing"]
    )
    entries: dict[str, tuple[float, str | None, float | None]] = {}
    for part in raw.split(", "):
        match = _ENTRY.match(part)
        assert match is not None, f"malformed Server-Timing entry {part!r} in {raw!r}"
        name, dur, desc, start = match.groups()
        assert dur is not None, f"entry without dur: {part!r}"
        assert name not in entries, f"{name} twice in {raw!r}"
        entries[name] = (float(dur), desc, None if start is None else float(start))
    return entries


async def test_miss_has_its_sources_then_cache_and_total():
    service, upstream, _ = make_cache()
    upstream.delay = 0.03
    miss = await service.answer("dash", P, None)
    entries = timing(miss)
    assert list(entries) == ["a", "cache", "total"]
    assert entries["cache"][1] == "miss"
    assert entries["total"][0] >= 30  # the fill took 30 ms of this request
    assert entries["cache"][0] < entries["total"][0]


async def test_hit_has_cache_and_total_but_no_source_that_did_not_run():
    service, _, _ = make_cache()
    await service.answer("dash", P, None)
    hit = await service.answer("dash", P, None)
    assert headers(hit)["X-Cache"] == "HIT"
    entries = timing(hit)
    assert list(entries) == ["cache", "total"]
    assert entries["cache"][1] == "hit"
    assert entries["cache"][0] <= entries["total"][0] < 50


async def test_fast_path_hit_times_the_whole_fast_answer():
    service, _, _ = make_cache()
    await service.answer("dash", P, None)
    answer, _ = await FastPath(service, service.config)("/dash", "city=Paris", [])
    assert answer is not None
    entries = timing(answer)
    assert list(entries) == ["cache", "total"] and entries["cache"][1] == "hit"


async def test_cache_time_includes_the_store_of_a_miss():
    service, _, _ = make_cache()
    real_set = service.store.set

    async def slow_set(key: str, value: bytes, timeout: int) -> None:
        await asyncio.sleep(0.05)
        await real_set(key, value, timeout)

    service.store.set = slow_set  # type: ignore[method-assign]
    miss = await service.answer("dash", P, None)
    entries = timing(miss)
    assert entries["cache"][0] >= 50
    assert entries["total"][0] >= entries["cache"][0]


async def test_cache_time_includes_a_slow_lookup_of_a_hit():
    service, _, _ = make_cache()
    await service.answer("dash", P, None)
    real_get = service.store.get_many

    async def slow_get(*keys: str) -> list[object]:
        await asyncio.sleep(0.03)
        return await real_get(*keys)

    service.store.get_many = slow_get  # type: ignore[method-assign]
    hit = await service.answer("dash", P, None)
    assert timing(hit)["cache"][0] >= 30


async def test_an_uncached_aggregate_says_cache_off():
    service, _, _ = make_cache("cache_ttl = 0")
    entries = timing(await service.answer("dash", P, None))
    assert list(entries) == ["a", "cache", "total"]
    assert entries["cache"][1] == "off"


async def test_bypass_says_so():
    service, _, _ = make_cache()
    service.store._down_until = float("inf")  # the backend failed a moment ago
    answer = await service.answer("dash", P, None)
    assert headers(answer)["X-Cache"] == "BYPASS"
    assert timing(answer)["cache"][1] == "bypass"


async def test_stale_answer_says_stale():
    service, _, clock = make_cache("cache_ttl = 10\nstale_ttl = 30")
    await service.answer("dash", P, None)
    clock.now += 15
    stale = await service.answer("dash", P, None)
    assert headers(stale)["X-Cache"] == "STALE"
    assert list(timing(stale)) == ["cache", "total"]
    assert timing(stale)["cache"][1] == "stale"


async def test_not_modified_carries_timing_too():
    service, _, _ = make_cache()
    first = await service.answer("dash", P, None)
    again = await service.answer("dash", P, Caller(headers(first)["ETag"]))
    assert again.status == 304
    assert list(timing(again)) == ["cache", "total"]


@pytest.mark.integration
def test_over_hypercorn_total_covers_the_slowest_source_and_hits_are_quick(
    serve, demo, write_config
):
    server = serve(write_config(cached_config(demo.url, delay=0.1)))
    url = f"{server.url}/api/five?city=Paris&user_id=7"
    miss = httpx.get(url, trust_env=False, timeout=10)
    hit = httpx.get(url, trust_env=False, timeout=10)
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    entries = timing(miss)
    sources = ["weather", "stocks", "news", "profile", "recommendations"]
    assert list(entries) == [*sources, "cache", "total"]
    slowest = max(entries[name][0] for name in sources)
    assert slowest >= 100
    assert entries["total"][0] >= slowest
    assert set(miss.json()["sources"]) == set(sources)
    # Every source started at once (none needs another), and says when, here and in the body.
    starts = [entries[name][2] for name in sources]
    assert all(start is not None and 0 <= start < 50 for start in starts), entries
    assert [miss.json()["sources"][name]["started"] for name in sources] == starts
    assert entries["cache"][2] is None and entries["total"][2] is None
    hit_entries = timing(hit)
    assert list(hit_entries) == ["cache", "total"]
    assert hit_entries["total"][0] < 100  # answered from the cache, no source ran
