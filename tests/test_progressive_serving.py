"""Progressive aggregates over the wire: real Hypercorn, the real demo upstreams, httpx reading
the stream as it arrives. A fast source (50 ms) and a slow one (500 ms): the first `source`
event must arrive well before the slow source has answered (that needs the streaming adapter),
`done` carries the JSON answer's status, a hit streams every event at once, NDJSON works, and
requests coalesced behind one fill all get their events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.demo.process import DemoProcess
from tests.support.demo import demo_stats, reset_demo
from tests.support.events import NDJSON, SSE, done_of, parse_ndjson, parse_sse, sources_of
from tests.support.servers import Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def wire_config(demo_url: str) -> str:
    return f"""
[upstreams.fast]
url = "{demo_url}/profile/{{user_id}}?delay=0.05"

[upstreams.slow]
url = "{demo_url}/weather/{{city}}?delay=0.5"

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

[aggregates.strict]
path = "/api/strict"
sources = ["fast", "broken"]
required = ["broken"]
params = {{ user_id = "int" }}

[aggregates.late]
path = "/api/late"
sources = ["fast", "stuck"]
required = ["stuck"]
deadline = 0.3
params = {{ user_id = "int" }}
"""


@pytest.fixture(params=["loop", "threads"])
def server(
    request: pytest.FixtureRequest,
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
) -> Server:
    return serve(write_config(wire_config(demo.url)), mode=request.param)


async def timed_stream(
    client: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> tuple[str, list[tuple[float, bytes]], httpx.Response]:
    """The body, each chunk with the seconds since the request was sent, and the response."""
    chunks: list[tuple[float, bytes]] = []
    started = time.perf_counter()
    async with client.stream("GET", url, headers=headers) as response:
        async for chunk in response.aiter_raw():
            chunks.append((time.perf_counter() - started, chunk))
    return b"".join(c for _, c in chunks).decode(), chunks, response


def first_event_at(chunks: list[tuple[float, bytes]], marker: bytes) -> float:
    seen = b""
    for at, chunk in chunks:
        seen += chunk
        if marker in seen:
            return at
    raise AssertionError(f"no {marker!r} in {seen!r}")


def fresh_city() -> str:
    return "c" + uuid.uuid4().hex[:8]  # a key nobody has filled


async def test_the_first_event_arrives_before_the_slowest_source_answers(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as client:
        await client.get("/healthz")  # the connection is open before the clock starts
        url = f"/api/pair?city={fresh_city()}&user_id=7"
        text, chunks, response = await timed_stream(client, url, SSE)

    first = first_event_at(chunks, b"event: source")
    done = first_event_at(chunks, b"event: done")
    assert sources_of(parse_sse(text)) == ["fast", "slow"]
    assert done >= 0.5 and first < 0.3, (first, done)


async def test_over_the_wire_the_events_are_right_and_done_has_the_json_status(
    server: Server, demo: DemoProcess
) -> None:
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as client:
        city = fresh_city()
        text, _, response = await timed_stream(client, f"/api/pair?city={city}&user_id=7", SSE)
        hit_text, hit_chunks, _ = await timed_stream(
            client, f"/api/pair?city={city}&user_id=7", SSE
        )
        nd_text, _, nd = await timed_stream(client, f"/api/pair?city={city}&user_id=7", NDJSON)
        plain = await client.get(f"/api/pair?city={city}&user_id=7")
        failures = {
            path: (parse_sse((await timed_stream(client, path, SSE))[0]), await client.get(path))
            for path in ("/api/strict?user_id=1", "/api/late?user_id=1")
        }

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-accel-buffering"] == "no"
    events = parse_sse(text)
    assert sources_of(events) == ["fast", "slow"]  # as they landed
    assert done_of(events)["status"] == 200 and done_of(events)["x_cache"] == "MISS"

    # A hit: every event at once, from the stored envelope (its order), in one chunk or so.
    hit = parse_sse(hit_text)
    assert sources_of(hit) == ["slow", "fast"] and done_of(hit)["x_cache"] == "HIT"
    assert hit_chunks[-1][0] - hit_chunks[0][0] < 0.05, hit_chunks
    assert nd.headers["content-type"] == "application/x-ndjson"
    assert [kind for kind, _ in parse_ndjson(nd_text)] == ["source", "source", "done"]
    assert plain.headers["x-cache"] == "HIT"
    assert plain.json()["data"] == {
        data["source"]: data["data"] for kind, data in events if kind == "source"
    }

    for path, status in (("/api/strict?user_id=1", 502), ("/api/late?user_id=1", 504)):
        streamed, json_answer = failures[path]
        assert json_answer.status_code == status
        assert done_of(streamed)["status"] == status, path
        assert done_of(streamed)["errors"] == json_answer.json()["errors"]
    assert "Traceback" not in server.log()
    del demo


async def test_over_the_wire_coalesced_requests_all_get_their_events(
    server: Server, demo: DemoProcess
) -> None:
    reset_demo(demo)
    url = f"{server.url}/api/pair?city={fresh_city()}&user_id=3"
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(trust_env=False, timeout=10, limits=limits) as client:
        streams = [timed_stream(client, url, SSE if i % 2 else NDJSON) for i in range(16)]
        answers: list[Any] = await asyncio.gather(*streams, client.get(url))

    *streamed, plain = answers
    calls = {name: n for name, n in demo_stats(demo)["requests"].items() if n}
    assert calls == {"profile": 1, "weather": 1}  # one fill for all seventeen
    for text, _, response in streamed:
        if response.headers["content-type"] == "text/event-stream":
            events = parse_sse(text)
        else:
            events = parse_ndjson(text)
        assert sources_of(events) == ["fast", "slow"], text  # heard live
        assert done_of(events)["status"] == 200
    assert plain.status_code == 200 and plain.headers["content-type"] == "application/json"
