"""Resilience on real Hypercorn against the real demo upstreams (faults injected by its knobs).

Each test starts its own server (one worker, so one set of guards) and counts, on the demo's
/_stats, the calls each upstream really received. Timing bounds are generous on purpose.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.demo.process import DemoProcess
from tests.support.demo import demo_stats, reset_demo
from tests.support.servers import Server

pytestmark = pytest.mark.integration

FALLBACK = {"user_id": 0, "items": [{"id": "static", "title": "Popular", "score": 1.0}]}


def resilience_config(demo_url: str) -> str:
    """One upstream per mechanism, each on its own demo service so its calls count apart."""
    return f"""
[upstreams.dead]                      # weather: always 503, retried within the budget
url = "{demo_url}/weather/{{city}}?delay=0&status=503"
timeout = 2.0
retries = 2
retry_backoff = 0.01
breaker_failures = 0

[upstreams.flaky]                     # news: fails while ?fail=1, trips the breaker
url = "{demo_url}/news?topic=x&delay=0&fail={{fail}}"
timeout = 2.0
retries = 0
breaker_failures = 3
breaker_cooldown = 1.0

[upstreams.slow]                      # stocks: slow on request, at most 2 calls at once
url = "{demo_url}/stocks/{{user_id}}?delay={{slow}}"
timeout = 5.0
max_concurrency = 2

[upstreams.fast]                      # profile: always quick
url = "{demo_url}/profile/{{user_id}}?delay=0.05"
timeout = 2.0

[upstreams.reco]                      # recommendations: down, answered from its fallback
url = "{demo_url}/recommendations/{{user_id}}?delay=0&status=503"
timeout = 2.0
retries = 0
breaker_failures = 2
breaker_cooldown = 60
schema = "aggregator.demo.models:Recommendations"
fallback = {{ user_id = 0, items = [{{ id = "static", title = "Popular", score = 1.0 }}] }}

[aggregates.dead]
path = "/api/dead"
sources = ["dead"]
params = {{ city = "str" }}
deadline = 5

[aggregates.flaky]
path = "/api/flaky"
sources = ["flaky"]
params = {{ fail = {{ type = "str", default = "0" }} }}

[aggregates.pair]
path = "/api/pair"
sources = ["slow", "fast"]
params = {{ user_id = "int", slow = {{ type = "str", default = "0" }} }}
deadline = 5

[aggregates.reco]
path = "/api/reco"
sources = ["fast", "reco"]
required = ["reco"]
params = {{ user_id = "int" }}
"""


@pytest.fixture
def server_config(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    """What conftest's `server` serves here."""
    return write_config(resilience_config(demo.url))


@pytest.fixture(autouse=True)
def counted_from_zero(demo: DemoProcess, server: Server) -> None:
    """Every test counts the demo's calls from when its server is up."""
    reset_demo(demo)


def calls(demo: DemoProcess, service: str) -> int:
    count: int = demo_stats(demo)["requests"][service]
    return count


def get(server: Server, path: str) -> dict[str, Any]:
    response = httpx.get(server.url + path, trust_env=False, timeout=10)
    body: dict[str, Any] = response.json()
    return body


async def test_a_dead_upstream_sees_at_most_1_2x_its_traffic(
    demo: DemoProcess, server: Server
) -> None:
    requests = 200
    limit = asyncio.Semaphore(8)  # sustained traffic, 8 dashboards at a time

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        async with limit:
            return await client.get("/api/dead?city=Paris")

    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as client:
        responses = await asyncio.gather(*(one(client) for _ in range(requests)))

    assert {r.status_code for r in responses} == {502}  # its only source failed
    assert {r.json()["errors"]["dead"]["kind"] for r in responses} == {"http_status"}
    seen = calls(demo, "weather")
    # retries = 2 without a budget would be 3x (600); the budget allows 0.2 x calls + 3
    assert requests + 3 <= seen <= 1.2 * requests + 3, (
        f"dead upstream: {seen} calls for {requests} requests ({seen / requests:.2f}x)"
    )


def test_the_breaker_stops_calls_and_recovers_after_its_cooldown(
    demo: DemoProcess, server: Server
) -> None:
    def status(fail: int) -> str:
        kind: str = get(server, f"/api/flaky?fail={fail}")["sources"]["flaky"]["status"]
        return kind

    assert [status(1) for _ in range(3)] == ["http_status"] * 3
    assert calls(demo, "news") == 3

    # Open: refused at once, the upstream's count stops rising (even for would-be successes).
    assert [status(1) for _ in range(5)] + [status(0)] == ["circuit_open"] * 6
    body = get(server, "/api/flaky?fail=1")
    assert body["errors"]["flaky"]["kind"] == "circuit_open"
    assert body["sources"]["flaky"]["ms"] < 250  # refused at once (a call would be a failure)
    assert calls(demo, "news") == 3

    # After the cool-down, one probe: it fails, so the breaker opens again at once.
    time.sleep(1.2)
    assert status(1) == "http_status"
    assert status(0) == "circuit_open"
    assert calls(demo, "news") == 4

    # After another cool-down a successful probe closes it and calls flow again.
    time.sleep(1.2)
    assert [status(0) for _ in range(3)] == ["ok"] * 3
    assert calls(demo, "news") == 7


async def test_the_bulkhead_fails_fast_without_slowing_a_fast_sibling(
    demo: DemoProcess, server: Server
) -> None:
    baseline = get(server, "/api/pair?user_id=1")["sources"]["fast"]["ms"]
    reset_demo(demo)

    async def timed(client: httpx.AsyncClient) -> tuple[float, dict[str, Any]]:
        started = time.monotonic()
        response = await client.get("/api/pair?user_id=1&slow=1.5")
        return time.monotonic() - started, response.json()

    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as client:
        answers = await asyncio.gather(*(timed(client) for _ in range(6)))

    refused = [(s, b) for s, b in answers if b["sources"]["slow"]["status"] == "overloaded"]
    served = [(s, b) for s, b in answers if b["sources"]["slow"]["status"] == "ok"]
    assert len(served) <= 2 and len(refused) >= 3
    assert len(served) + len(refused) == 6
    assert calls(demo, "stocks") == len(served) <= 2
    for seconds, body in refused:
        assert body["errors"]["slow"]["kind"] == "overloaded"
        assert body["sources"]["slow"]["ms"] < 250  # refused at once, not queued for 1.5 s
        assert seconds < 1.2  # the answer did not wait for the 1.5 s calls
    fast = [body["sources"]["fast"]["ms"] for _, body in answers]
    assert all(body["sources"]["fast"]["status"] == "ok" for _, body in answers)
    assert max(fast) < baseline + 300, (
        f"fast sibling: {baseline} ms alone, {max(fast)} ms at most beside the overload"
    )

    # The slots are back once the slow calls ended.
    recovered = get(server, "/api/pair?user_id=1&slow=0")
    assert recovered["sources"]["slow"]["status"] == "ok"


def test_a_fallback_is_served_flagged_with_its_error_kept(
    demo: DemoProcess, server: Server
) -> None:
    responses = [
        httpx.get(f"{server.url}/api/reco?user_id=7", trust_env=False, timeout=10) for _ in range(3)
    ]

    for response in responses:
        # reco is required, but its fallback keeps the answer usable: 200, partial.
        assert response.status_code == 200
        assert response.headers["X-Aggregate-Complete"] == "false"
        body = response.json()
        assert body["complete"] is False
        assert body["data"]["reco"] == FALLBACK
        assert body["data"]["fast"]["user_id"] == 7
        assert body["sources"]["reco"]["fallback"] is True
        assert "fallback" not in body["sources"]["fast"]
    kinds = [r.json()["errors"]["reco"]["kind"] for r in responses]
    # two real failures open its breaker; the third is refused and still served from fallback
    assert kinds == ["http_status", "http_status", "circuit_open"]
    assert [r.json()["sources"]["reco"]["status"] for r in responses] == kinds
    assert calls(demo, "recommendations") == 2
