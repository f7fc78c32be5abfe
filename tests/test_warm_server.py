"""The server side of warming: AggregateCache.warm, POST /admin/warm, config warm targets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from aggregator import create_app
from aggregator.config import parse_config
from aggregator.errors import CacheUnavailableError, ConfigError
from aggregator.serving import AggregatorFlask
from aggregator.settings import Settings
from tests.support.configs import five_sources_config
from tests.support.fake_cache import P, headers, make_cache


async def test_warm_forces_a_refresh_of_a_fresh_entry():
    service, upstream, clock = make_cache()
    first = await service.answer("dash", P, None)
    clock.now += 3
    result = await service.warm("dash", P)
    assert result.outcome == "warmed" and result.status == 200
    assert upstream.calls == 2
    again = await service.answer("dash", P, None)
    assert headers(again)["X-Cache"] == "HIT" and headers(again)["Age"] == "0"
    assert again.body != first.body  # the refreshed answer is what is served now


async def test_only_missing_skips_fresh_entries():
    service, upstream, _ = make_cache()
    await service.answer("dash", P, None)
    result = await service.warm("dash", P, only_missing=True)
    other = await service.warm("dash", {"city": "Oslo", "n": 1}, only_missing=True)
    assert result.outcome == "skipped" and other.outcome == "warmed"
    assert upstream.calls == 2


@pytest.mark.parametrize(
    ("extra", "complete", "status", "outcome"),
    [
        pytest.param("cache_ttl = 10", False, 200, "partial", id="partial-not-stored"),
        pytest.param("cache_ttl = 10\ncache_partial_ttl = 5", False, 200, "partial", id="partial"),
        pytest.param("cache_ttl = 10", True, 502, "failed", id="required-source-down"),
    ],
)
async def test_outcomes_name_what_happened(extra, complete, status, outcome):
    service, upstream, _ = make_cache(extra)
    upstream.complete, upstream.status = complete, status
    result = await service.warm("dash", P)
    assert result.outcome == outcome
    assert result.status == status
    if status != 200:
        assert result.sources_failed == ("a",)


async def test_warming_an_uncached_aggregate_or_a_dead_cache_is_a_failure():
    off, _, _ = make_cache("cache_ttl = 0")
    assert (await off.warm("dash", P)).outcome == "failed"
    service, upstream, _ = make_cache()

    async def down(*args: Any, **kwargs: Any) -> None:
        raise CacheUnavailableError("down")

    service.store.set = down  # type: ignore[method-assign]
    result = await service.warm("dash", P)
    assert result.outcome == "failed" and "cache" in result.detail


async def test_warming_joins_a_live_fill_instead_of_stampeding():
    service, upstream, _ = make_cache()
    upstream.delay = 0.2
    live = asyncio.create_task(service.answer("dash", P, None))
    await asyncio.sleep(0.05)
    result, answer = await asyncio.gather(service.warm("dash", P), live)
    assert result.outcome == "warmed" and answer.status == 200
    assert upstream.calls == 1


def test_config_warm_targets_are_validated_at_load():
    base = """
[upstreams.a]
url = "http://127.0.0.1:9/a/{city}"
[aggregates.b]
path = "/b"
sources = ["a"]
params = { city = "str", n = { type = "int", default = 1 } }
cache_ttl = 10
"""
    ok = parse_config(base + 'warm = [{city = "Paris"}, {city = "Oslo", n = 2}]', "t")
    assert ok.aggregates["b"].warm == [{"city": "Paris"}, {"city": "Oslo", "n": 2}]
    with pytest.raises(ConfigError, match=r"aggregates\.b\.warm\[1\]\.n: must be an integer"):
        parse_config(base + 'warm = [{city = "Paris"}, {city = "Oslo", n = "two"}]', "t")
    with pytest.raises(ConfigError, match=r"aggregates\.b\.warm\[0\]\.cty: unknown parameter"):
        parse_config(base + 'warm = [{cty = "Paris"}]', "t")


def _app(config_path: Path, tmp_path: Path, **settings: Any) -> AggregatorFlask:
    return create_app(
        Settings(config=config_path, admin_token="s3cret-token", cache_dir=tmp_path, **settings)
    )


AUTH = {"Authorization": "Bearer s3cret-token"}
TARGET = {"aggregate": "five", "params": {"city": "Paris", "user_id": 7}}


@pytest.mark.integration
def test_admin_warm_fills_a_shared_cache(demo, write_config, tmp_path):
    config = write_config(_five_cached(demo.url))
    app = _app(config, tmp_path, cache_type="filesystem")
    client = app.test_client()
    r = client.post("/admin/warm", json=TARGET, headers=AUTH)
    assert r.status_code == 200, r.json
    assert r.json == {
        "outcome": "warmed",
        "status": 200,
        "sources_failed": [],
        "detail": "",
        "cache": {"type": "filesystem", "shared": True},
    }
    assert client.get("/api/five?city=Paris&user_id=7").headers["X-Cache"] == "HIT"
    # another process with the same settings sees it: the point of warming a shared cache
    other = _app(config, tmp_path, cache_type="filesystem").test_client()
    assert other.get("/api/five?user_id=07&city=Paris").headers["X-Cache"] == "HIT"


def _five_cached(demo_url: str) -> str:
    return five_sources_config(demo_url, delay=0.05) + "cache_ttl = 60\n"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("body", "auth", "status", "needle"),
    [
        pytest.param(TARGET, {}, 401, "Bearer", id="no-token"),
        pytest.param(TARGET, {"Authorization": "Bearer nope-nope-no"}, 401, "wrong", id="bad"),
        pytest.param({"aggregate": "nope"}, AUTH, 404, "unknown aggregate", id="unknown-agg"),
        pytest.param({"params": {}}, AUTH, 400, "aggregate", id="no-aggregate"),
        pytest.param({**TARGET, "extra": 1}, AUTH, 400, "unknown key", id="unknown-key"),
        pytest.param(
            {"aggregate": "five", "params": {"city": "Paris", "user_id": "x"}},
            AUTH,
            400,
            "params.user_id",
            id="bad-param",
        ),
        pytest.param({**TARGET, "only_missing": "yes"}, AUTH, 400, "only_missing", id="bad-flag"),
    ],
)
def test_admin_warm_rejects_bad_requests(demo, write_config, tmp_path, body, auth, status, needle):
    app = _app(write_config(_five_cached(demo.url)), tmp_path, cache_type="filesystem")
    r = app.test_client().post("/admin/warm", json=body, headers=auth)
    assert r.status_code == status
    assert needle in r.get_data(as_text=True)
    assert "s3cret-token" not in r.get_data(as_text=True)


@pytest.mark.integration
def test_admin_warm_refuses_a_per_process_cache(demo, write_config, tmp_path):
    app = _app(write_config(_five_cached(demo.url)), tmp_path, cache_type="simple")
    r = app.test_client().post("/admin/warm", json=TARGET, headers=AUTH)
    assert r.status_code == 409
    assert r.json is not None and r.json["cache"] == {"type": "simple", "shared": False}
