"""Between measured loads: the demo upstreams' counters, and waiting until everything is quiet.

Shared by the bench and the soak. A run starts only once the previous one's abandoned requests
have ended, or their upstream calls would load the shared demo during the next run.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

from aggregator.bench.servers import ServerProcess
from aggregator.demo.process import DemoProcess

DRAIN_TIMEOUT = 60.0


def settle(server: ServerProcess, demo: DemoProcess) -> bool:
    """Wait until the server answers promptly and no upstream call is in flight.

    Requests the generator abandoned may still be queued (serial mode) or running in threads
    (the sync twins); their upstream calls would load the shared demo during the next run.
    """
    deadline = time.monotonic() + DRAIN_TIMEOUT
    quiet = 0
    while time.monotonic() < deadline:
        if demo_call(demo, "GET", "/_stats")["in_flight"] == 0:
            quiet += 1
            if quiet >= 3:
                return server.drain(max(0.1, deadline - time.monotonic()))
        else:
            quiet = 0
        time.sleep(0.1)
    return False


def demo_call(demo: DemoProcess, method: str, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(demo.host, demo.port, timeout=10)
    try:
        conn.request(method, path)
        body = conn.getresponse().read()
    finally:
        conn.close()
    parsed: dict[str, Any] = json.loads(body) if body else {}
    return parsed
