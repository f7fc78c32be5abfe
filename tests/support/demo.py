"""Reading and resetting the demo upstream's counters and request recorder."""

from __future__ import annotations

from typing import Any

import httpx

from aggregator.demo.process import DemoProcess

#: Where each demo service lives (the demo records paths, not services).
SERVICE_PATHS = {"echo": "/echo/", "weather": "/weather/", "profile": "/profile/"}


def demo_stats(demo: DemoProcess) -> dict[str, Any]:
    """The demo's counters (connections seen, requests per service)."""
    stats: dict[str, Any] = httpx.get(f"{demo.url}/_stats", trust_env=False).json()
    return stats


def reset_demo(demo: DemoProcess) -> None:
    httpx.post(f"{demo.url}/_reset", trust_env=False).raise_for_status()


def received(demo: DemoProcess, service: str | None = None) -> list[dict[str, Any]]:
    """What the demo services received since the last reset, oldest first, with headers (the
    demo's own endpoints left out)."""
    listed: list[dict[str, Any]] = httpx.get(
        f"{demo.url}/_requests?headers=1", trust_env=False
    ).json()["requests"]
    prefix = "/" if service is None else SERVICE_PATHS[service]
    return [
        r
        for r in listed
        if r["raw_path"].startswith(prefix) and not r["raw_path"].startswith(("/_", "/healthz"))
    ]
