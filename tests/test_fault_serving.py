"""Upstream faults over the wire (real Hypercorn, real demo upstreams, both engines): each request
answers within its bounds, and afterwards nothing is left behind: /readyz shows no upstream
connection in use or awaited, the demo sees exactly the connections our pool keeps idle (a leaked
or half-read one would be open at the demo and not idle here), and the next request succeeds."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from aggregator.demo.process import DemoProcess
from tests.support.clients import ENGINES, closed_port
from tests.support.leaks import assert_nothing_left_behind
from tests.support.servers import Server

pytestmark = pytest.mark.integration


def faults_config(demo: str) -> str:
    params = 'params = { city = "str", user_id = "int" }'
    return f"""
[upstreams.fast]
url = "{demo}/profile/{{user_id}}?delay=0.05"
schema = "aggregator.demo.models:Profile"

[upstreams.drip]                 # every chunk on time, the whole body never
url = "{demo}/weather/{{city}}?drip=5"
timeout = 0.5

[upstreams.hang]                 # far longer than any bound below, even on a busy machine
url = "{demo}/stocks/{{user_id}}?delay=10"
timeout = 60

[upstreams.drip_long]
url = "{demo}/news?topic={{city}}&drip=10"
timeout = 60

[upstreams.broken]
url = "{demo}/weather/{{city}}?status=500"

[upstreams.garbled]
url = "{demo}/news?topic={{city}}&invalid=1"

[upstreams.html]
url = "{demo}/recommendations/{{user_id}}?html=1"

[upstreams.down]
url = "http://127.0.0.1:{closed_port()}/x"

[aggregates.fast]
path = "/fast"
sources = ["fast"]
{params}

[aggregates.drip]
path = "/drip"
sources = ["fast", "drip"]
deadline = 5
{params}

[aggregates.dead]
path = "/dead"
sources = ["broken", "garbled", "html", "down"]
{params}

[aggregates.cut]
path = "/cut"
sources = ["fast", "hang", "drip_long"]
deadline = 0.6
{params}

[aggregates.slow]                # only a client leaving can end this one early
path = "/slow"
sources = ["fast", "hang", "drip_long"]
deadline = 30
{params}

[aggregates.cut_required]
path = "/cut-required"
sources = ["fast", "hang", "drip_long"]
required = ["hang"]
deadline = 0.6
{params}
"""


@pytest.fixture
def server_config(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    """What conftest's `server` serves here..."""
    return write_config(faults_config(demo.url))


@pytest.fixture(params=ENGINES)
def server_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """...on each upstream engine."""
    return {"engine": request.param}


def timed(server: Server, path: str) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    r = httpx.get(f"{server.url}{path}", trust_env=False, timeout=20)
    return time.monotonic() - started, r


def test_a_slow_drip_is_cut_at_the_source_timeout(server: Server, demo: DemoProcess) -> None:
    elapsed, r = timed(server, "/drip?city=Paris&user_id=7")

    assert r.status_code == 200, r.text
    assert r.json()["errors"]["drip"] == {
        "kind": "timeout",
        "detail": "no full answer within 0.5 s",
    }
    assert r.json()["data"]["fast"]["user_id"] == 7
    assert elapsed < 2.5  # the source's 0.5 s, not the 5 s drip
    assert_nothing_left_behind(server, demo)


def test_when_every_source_fails_the_answer_is_502_listing_each(
    server: Server, demo: DemoProcess
) -> None:
    elapsed, r = timed(server, "/dead?city=Paris&user_id=7")

    assert r.status_code == 502, r.text
    body = r.json()
    assert body["data"] == {} and body["complete"] is False
    kinds = {name: error["kind"] for name, error in body["errors"].items()}
    assert kinds == {
        "broken": "http_status",
        "garbled": "invalid_json",
        "html": "invalid_json",
        "down": "connect",
    }
    assert body["errors"]["broken"]["status"] == 500
    assert elapsed < 5
    assert_nothing_left_behind(server, demo)


@pytest.mark.parametrize(("path", "status"), [("/cut", 200), ("/cut-required", 504)])
def test_the_deadline_mid_fan_out_answers_on_time(
    server: Server, demo: DemoProcess, path: str, status: int
) -> None:
    elapsed, r = timed(server, f"{path}?city=Paris&user_id=7")

    assert r.status_code == status, r.text
    body = r.json()
    assert body["data"]["fast"]["user_id"] == 7
    assert {body["errors"][n]["kind"] for n in ("hang", "drip_long")} == {"deadline"}
    assert elapsed < 2.5  # the 0.6 s deadline, not the 10 s upstreams
    assert_nothing_left_behind(server, demo)


def test_clients_leaving_mid_fan_out_leave_nothing_behind(
    server: Server, demo: DemoProcess
) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    request = b"GET /slow?city=Oslo&user_id=3 HTTP/1.1\r\nHost: t\r\n\r\n"
    for _ in range(20):  # twenty dashboards that give up while their sources are still out
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request)
            time.sleep(0.05)

    # Well before the upstreams' 10 s: only cancelling the calls frees their connections.
    assert_nothing_left_behind(server, demo, within=6.0)
