"""What a fault may not leave behind: upstream connections in use or awaited, or connections open
at the demo that our pool does not hold idle (a leaked or half-read one)."""

from __future__ import annotations

import re
import time

import httpx

from aggregator.demo.process import DemoProcess
from tests.support.demo import demo_stats
from tests.support.servers import Server

_POOL = re.compile(r"upstream connections: (\d+) in use, (\d+) idle, (\d+) waiting")


def pool(server: Server) -> tuple[int, int, int]:
    """(in use, idle, waiting) of the server's upstream pool, from /readyz."""
    r = httpx.get(f"{server.url}/readyz", trust_env=False, timeout=5)
    found = _POOL.search(r.json()["checks"]["client"]["detail"])
    assert found, r.text
    in_use, idle, waiting = (int(n) for n in found.groups())
    return in_use, idle, waiting


def assert_nothing_left_behind(server: Server, demo: DemoProcess, within: float = 5.0) -> None:
    """No connection in use or awaited, and every connection open at the demo is an idle one."""
    deadline = time.monotonic() + within
    while True:
        in_use, idle, waiting = pool(server)
        open_at_demo = demo_stats(demo)["open_connections"]
        if (in_use, waiting) == (0, 0) and open_at_demo == idle:
            break
        assert time.monotonic() < deadline, (
            f"after {within} s: {in_use} in use, {idle} idle, {waiting} waiting; "
            f"{open_at_demo} open at the demo; server log:\n{server.log()[-3000:]}"
        )
        time.sleep(0.05)
    r = httpx.get(f"{server.url}/fast?city=Paris&user_id=7", trust_env=False, timeout=5)
    assert r.status_code == 200 and r.json()["data"]["fast"]["user_id"] == 7
    assert "Traceback" not in server.log()
