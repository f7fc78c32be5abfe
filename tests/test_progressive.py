"""Progressive aggregates in-process: Server-Sent Events and NDJSON, one event per source as it
lands, then `done` with the JSON answer's status; from the cache all at once; coalesced requests
hearing one fill live; views on the extension too. The ASGI app under its lifespan (httpx's
transport reads each answer whole, so these check content and order; the timing over the wire
is in test_progressive_serving.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask

from aggregator import Aggregator, create_app, to_asgi
from aggregator.demo.models import Profile
from aggregator.demo.process import DemoProcess
from aggregator.events import wanted_stream
from aggregator.settings import Settings
from tests.support.demo import demo_stats, reset_demo
from tests.support.events import NDJSON, SSE, done_of, parse_ndjson, parse_sse, sources_of
from tests.support.servers import serving

pytestmark = pytest.mark.integration


def progressive_config(demo_url: str) -> str:
    """`slow` is listed first and lands last: live events come in landing order, stored ones in
    the envelope's (config) order."""
    return f"""
[upstreams.slow]
url = "{demo_url}/weather/{{city}}?delay=0.4"

[upstreams.fast]
url = "{demo_url}/profile/{{user_id}}?delay=0.05"

[upstreams.broken]
url = "{demo_url}/echo/broken?status=503"
retries = 0

[upstreams.stuck]
url = "{demo_url}/echo/stuck?delay=2"

[aggregates.pair]
path = "/api/pair"
sources = ["slow", "fast"]
required = ["fast"]
params = {{ city = "str", user_id = "int" }}
cache_ttl = 30

[aggregates.open]
path = "/api/open"
sources = ["slow", "fast"]
params = {{ city = "str", user_id = "int" }}

[aggregates.strict]
path = "/api/strict"
sources = ["fast", "broken"]
required = ["broken"]
params = {{ user_id = "int" }}
cache_ttl = 30

[aggregates.late]
path = "/api/late"
sources = ["fast", "stuck"]
required = ["stuck"]
deadline = 0.3
params = {{ user_id = "int" }}
"""


@pytest.fixture
def config(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    return write_config(progressive_config(demo.url))


def events_of(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    if response.headers["content-type"].startswith("application/x-ndjson"):
        return parse_ndjson(response.text)
    return parse_sse(response.text)


@pytest.mark.parametrize(
    ("accept", "kind"),
    [
        ("text/event-stream", "sse"),
        ("application/x-ndjson", "ndjson"),
        ("application/json;q=0.5, text/event-stream", "sse"),
        ("application/json, text/event-stream", ""),  # a tie: JSON, as the server prefers
        ("*/*", ""),
        ("text/*", ""),
        ("", ""),
    ],
)
def test_the_accept_header_chooses_the_kind(accept: str, kind: str) -> None:
    assert wanted_stream(accept) == kind


MODES = pytest.mark.parametrize("mode", ["loop", "threads", "serial"])


@MODES
async def test_a_miss_streams_each_source_as_it_lands_then_done(config: Path, mode: str) -> None:
    async with serving(config, mode=mode) as (_, client):
        r = await client.get("/api/pair?city=Paris&user_id=7", headers=SSE)
        events = parse_sse(r.text)
        plain = await client.get("/api/pair?city=Paris&user_id=7")  # now a hit

    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-store" and r.headers["x-accel-buffering"] == "no"
    assert "etag" not in r.headers and "x-request-id" in r.headers
    assert sources_of(events) == ["fast", "slow"]  # as they landed, not in config order
    fast, slow = (data for kind, data in events if kind == "source")
    assert set(fast) == {"source", "status", "ms", "started", "data"}
    assert (
        fast["status"] == "ok" and fast["data"]["user_id"] == 7 and slow["data"]["city"] == "Paris"
    )
    done = done_of(events)
    assert list(done)[:4] == ["status", "errors", "sources", "complete"]
    assert done["status"] == 200 and done["complete"] is True and done["errors"] == {}
    assert "data" not in done and done["x_cache"] == "MISS" and done["age"] == 0
    assert done["server_timing"].startswith("slow;dur=") and "total;dur=" in done["server_timing"]
    # The fill was stored as the JSON envelope: the next JSON request is a hit with the same data.
    body = plain.json()
    assert plain.headers["x-cache"] == "HIT"
    assert body["data"] == {"slow": slow["data"], "fast": fast["data"]}
    assert body["sources"] == done["sources"]
    for event in (fast, slow):
        info = {k: v for k, v in event.items() if k not in ("source", "data")}
        assert body["sources"][event["source"]] == info


async def test_a_hit_streams_every_event_at_once_from_the_stored_envelope(
    config: Path, demo: DemoProcess
) -> None:
    async with serving(config) as (_, client):
        miss = parse_sse((await client.get("/api/pair?city=Rome&user_id=3", headers=SSE)).text)
        reset_demo(demo)
        hit_sse = parse_sse((await client.get("/api/pair?city=Rome&user_id=3", headers=SSE)).text)
        hit_nd = await client.get("/api/pair?city=Rome&user_id=3", headers=NDJSON)

    assert not any(demo_stats(demo)["requests"].values())  # hits, not fills

    assert sources_of(hit_sse) == ["slow", "fast"]  # the envelope's order
    by_source = {data["source"]: data for kind, data in miss if kind == "source"}
    for _, data in hit_sse[:-1]:
        assert data == by_source[data["source"]]  # the same events, from the stored envelope
    done = done_of(hit_sse)
    assert done["x_cache"] == "HIT" and done["status"] == 200
    assert {k: v for k, v in done.items() if k not in ("x_cache", "age", "server_timing")} == {
        k: v for k, v in done_of(miss).items() if k not in ("x_cache", "age", "server_timing")
    }
    assert done["server_timing"].startswith("cache;dur=")  # a hit waited for no source
    assert hit_nd.headers["content-type"] == "application/x-ndjson"
    nd = parse_ndjson(hit_nd.text)
    assert nd[:-1] == hit_sse[:-1]
    assert {**done_of(nd), "server_timing": ""} == {**done, "server_timing": ""}
    lines = hit_nd.text.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["source", "source", "done"]


@pytest.mark.parametrize(
    ("path", "status", "failed"),
    [
        pytest.param("/api/strict?user_id=1", 502, "broken", id="required-source-failed"),
        pytest.param("/api/late?user_id=1", 504, "stuck", id="required-source-past-deadline"),
    ],
)
async def test_done_carries_the_status_the_json_answer_has(
    config: Path, path: str, status: int, failed: str
) -> None:
    async with serving(config) as (_, client):
        streamed = await client.get(path, headers=SSE)
        plain = await client.get(path)

    assert streamed.status_code == 200 and plain.status_code == status
    events = parse_sse(streamed.text)
    done = done_of(events)
    assert done["status"] == status and done["complete"] is False
    assert done["errors"] == plain.json()["errors"] and failed in done["errors"]
    (event,) = [data for kind, data in events if kind == "source" and data["source"] == failed]
    assert event["error"] == plain.json()["errors"][failed] and "data" not in event
    assert sorted(sources_of(events)) == sorted(plain.json()["sources"])


@pytest.mark.parametrize("mode", ["loop", "threads"])  # (serial: one request at a time)
async def test_requests_coalesced_behind_one_fill_hear_its_sources_live(
    config: Path, demo: DemoProcess, mode: str
) -> None:
    reset_demo(demo)
    async with serving(config, mode=mode) as (_, client):
        url = "/api/pair?city=Oslo&user_id=5"
        first = asyncio.create_task(client.get(url, headers=SSE))
        await asyncio.sleep(0.2)  # fast has landed, slow has not: the others join mid-fill
        others = await asyncio.gather(
            *[client.get(url, headers=SSE) for _ in range(4)],
            client.get(url, headers=NDJSON),
            client.get(url),
        )
        answers = [await first, *others]

    calls = {k: n for k, n in demo_stats(demo)["requests"].items() if n}
    assert calls == {"weather": 1, "profile": 1}  # one fill for all seven
    *streamed, plain = answers
    for r in streamed:
        events = events_of(r)
        # Live, late joiners included: landing order, told at once what landed before them.
        assert sources_of(events) == ["fast", "slow"], r.text
        assert done_of(events)["status"] == 200
    assert plain.headers["x-cache"] == "MISS" and plain.json()["complete"] is True


async def test_the_json_answer_is_unchanged(config: Path) -> None:
    async with serving(config) as (_, client):
        url = "/api/open?city=Lima&user_id=2"
        answers = [
            await client.get(url, headers={"Accept": accept})
            for accept in ("application/json", "*/*", "text/html")
        ]
        answers.append(await client.get(url))

    for r in answers:
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert list(body) == ["data", "errors", "sources", "complete"]
        assert set(body["data"]) == {"slow", "fast"}
        assert r.headers["cache-control"] == "no-store" and "x-cache" not in r.headers


async def test_a_bad_parameter_is_done_with_its_400_and_the_one_error_body(config: Path) -> None:
    async with serving(config) as (_, client):
        r = await client.get("/api/pair?city=Paris&user_id=seven", headers=SSE)
        plain = await client.get("/api/pair?city=Paris&user_id=seven")

    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert parse_sse(r.text) == [("done", {"status": 400, **plain.json()})]
    assert plain.status_code == 400 and plain.json()["field"] == "user_id"


async def test_an_uncached_aggregate_streams_live_too(config: Path) -> None:
    async with serving(config) as (_, client):
        r = await client.get("/api/open?city=Paris&user_id=7", headers=NDJSON)

    events = parse_ndjson(r.text)
    assert sources_of(events) == ["fast", "slow"]
    done = done_of(events)
    assert done["status"] == 200 and "x_cache" not in done


def test_without_a_server_loop_every_event_comes_at_the_end(config: Path) -> None:
    # Flask's test client: no loop outlives the view, so it waits for the answer.
    client = create_app(Settings(config=config, dashboard=False)).test_client()
    r = client.get("/api/pair?city=Paris&user_id=7", headers=SSE)

    events = parse_sse(r.get_data(as_text=True))
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert sources_of(events) == ["slow", "fast"]  # from the answer's envelope
    assert done_of(events)["status"] == 200 and done_of(events)["x_cache"] == "MISS"


# -- views on the extension -------------------------------------------------------------------


def views_app(demo: DemoProcess) -> Flask:
    app = Flask(__name__)
    agg = Aggregator(app, settings=Settings(dashboard=False))
    agg.source("profile", url=f"{demo.url}/profile/{{user_id}}?delay=0.05", schema=Profile)
    agg.source("weather", url=f"{demo.url}/weather/{{city}}?delay=0.3")
    agg.source("news", url=f"{demo.url}/news?delay=0.1")

    @app.get("/api/home")
    @agg.aggregate(required=["profile"], cache_ttl=30)
    async def home(user_id: int) -> dict[str, Any]:
        profile, news = await asyncio.gather(
            agg.fetch("profile", user_id=user_id), agg.fetch("news")
        )
        weather = await agg.fetch("weather", city=profile.city)
        return {"name": profile.name, "news": news is not None, "weather": weather is not None}

    @app.get("/api/sync")
    @agg.aggregate()
    def sync_home(user_id: int) -> dict[str, Any]:
        first = agg.fetch_sync("profile", user_id=user_id)
        again = agg.fetch_sync("profile", user_id=user_id + 1)
        return {"names": [first.name, again.name]}

    return app


async def test_a_views_fetches_are_events_and_done_carries_what_it_returned(
    demo: DemoProcess,
) -> None:
    adapter = to_asgi(views_app(demo))
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's types
    async with (
        adapter.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client,
    ):
        live = parse_sse((await client.get("/api/home?user_id=7", headers=SSE)).text)
        hit = parse_sse((await client.get("/api/home?user_id=7", headers=SSE)).text)
        plain = (await client.get("/api/home?user_id=7")).json()
        twin = parse_ndjson((await client.get("/api/sync?user_id=7", headers=NDJSON)).text)

    assert sources_of(live) == ["profile", "news", "weather"]  # as each awaited fetch ended
    for events in (live, hit):
        for kind, data in events[:-1]:
            assert kind == "source" and "data" not in data  # a view says what it returns
            assert data["status"] == "ok"
        done = done_of(events)
        assert done["status"] == 200 and done["data"] == plain["data"]
        assert done["sources"] == plain["sources"]
    assert done_of(hit)["x_cache"] == "HIT"
    assert sources_of(twin) == ["profile", "profile~2"]  # a `def` view's calls, each its key
    assert done_of(twin)["data"]["names"][0] == plain["data"]["name"]


def test_openapi_documents_both_media_types_for_every_aggregate(config: Path) -> None:
    client = create_app(Settings(config=config, dashboard=False)).test_client()
    document = client.get("/openapi.json").get_json()
    for path in ("/api/pair", "/api/open", "/api/strict", "/api/late"):
        ok = document["paths"][path]["get"]["responses"]["200"]
        assert {"application/json", "text/event-stream", "application/x-ndjson"} <= set(
            ok["content"]
        ), path
