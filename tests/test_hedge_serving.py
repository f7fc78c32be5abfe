"""Hedged calls over the wire (real Hypercorn, the real demo upstream with its jitter knob, both
engines): hedges go out and win, the envelope and /metrics say so, the extra calls reach the demo,
and the cancelled losers leave nothing behind in the pool."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from aggregator.demo.process import DemoProcess
from tests.support.clients import ENGINES
from tests.support.demo import demo_stats, reset_demo
from tests.support.leaks import assert_nothing_left_behind
from tests.support.servers import Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

REQUESTS = 16


@pytest.fixture
def server_config(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    return write_config(f"""
[upstreams.fast]
url = "{demo.url}/profile/{{user_id}}?delay=0.01"
schema = "aggregator.demo.models:Profile"

[upstreams.jittery]              # 0..1 s, uniformly: a hedge at 0.1 s often answers first
url = "{demo.url}/weather/{{city}}?jitter=1.0"
schema = "aggregator.demo.models:Weather"
timeout = 3
hedge_after = 0.1
retry_budget = 1.0

[upstreams.stalling]             # the 1st, 3rd, 5th... call stalls 2 s; the hedge is the next
url = "{demo.url}/news?topic={{topic}}&tail_every=2&tail_delay=2"
timeout = 4
hedge_after = 0.1

[upstreams.unhedged]             # the same stall without a hedge: the control
url = "{demo.url}/stocks/{{user_id}}?tail_every=2&tail_delay=2"
timeout = 4

[aggregates.stalling]
path = "/stalling"
sources = ["stalling"]
deadline = 5
params = {{ topic = "str" }}

[aggregates.unhedged]
path = "/unhedged"
sources = ["unhedged"]
deadline = 5
params = {{ user_id = "int" }}

[aggregates.fast]
path = "/fast"
sources = ["fast"]
params = {{ city = "str", user_id = "int" }}

[aggregates.jittery]
path = "/jittery"
sources = ["jittery"]
deadline = 5
params = {{ city = "str" }}
""")


@pytest.fixture(params=ENGINES)
def server_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    return {"engine": request.param, "metrics": "public"}


def test_a_jittery_source_is_hedged_the_hedge_wins_and_nothing_is_left_behind(
    server: Server, demo: DemoProcess
) -> None:
    reset_demo(demo)
    infos = []
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as http:
        for i in range(REQUESTS):
            r = http.get("/jittery", params={"city": f"c{i}"})
            assert r.status_code == 200, r.text
            infos.append(r.json()["sources"]["jittery"])
        metrics = http.get("/metrics").text
    hedged = [i for i in infos if i.get("hedged")]
    won = [i for i in hedged if i.get("hedge_winner") == "hedge"]
    # Uniform 0..1 s: each request is hedged with p = 0.9 and the hedge wins with p ~ 0.4, so
    # none of 16 doing so has a chance below 1e-3.
    assert won, infos
    assert all(i.get("hedged") is None or i["hedge_winner"] in ("first", "hedge") for i in infos)
    # Each hedge is one more request to the upstream (one cancelled just as it left may never
    # have arrived): never more.
    calls = demo_stats(demo)["requests"].get("weather", 0)
    assert REQUESTS < calls <= REQUESTS + len(hedged)
    counted = re.search(
        r'aggregator_hedges_total\{outcome="hedge_won",source="jittery"\} (\S+)', metrics
    )
    assert counted and float(counted.group(1)) == len(won), metrics
    # Every loser was cancelled mid-answer: its connection must be closed or back, not in use.
    assert_nothing_left_behind(server, demo)


def test_a_hedge_cuts_a_deterministic_stall(server: Server, demo: DemoProcess) -> None:
    """Every first attempt stalls 2 s at the demo, the hedge sent at 0.1 s does not: each answer
    comes well under 1 s, while the same stall without a hedge takes its 2 s."""
    reset_demo(demo)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as http:
        began = time.monotonic()
        control = http.get("/unhedged", params={"user_id": 1})
        control_took = time.monotonic() - began
        took = []
        for i in range(3):
            began = time.monotonic()
            r = http.get("/stalling", params={"topic": f"t{i}"})
            took.append(time.monotonic() - began)
            assert r.status_code == 200 and r.json()["complete"], r.text
            info = r.json()["sources"]["stalling"]
            # (the hedge normally wins; were the first attempt's request to reach the demo
            # after the hedge's, the hedge would be the one stalled and the first would win)
            assert info["hedged"] is True and info["hedge_winner"] in ("first", "hedge"), info
    assert control.status_code == 200 and control_took >= 2.0, (control_took, control.text)
    assert max(took) < 1.0, took
    assert demo_stats(demo)["requests"]["news"] == 6  # one hedge per request, no more
    assert_nothing_left_behind(server, demo)
