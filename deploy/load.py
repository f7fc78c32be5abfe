"""Bounded load on the local cluster, one record per request, and what the scenarios count.

The load goes only to the topology's own addresses (or to loopback, from inside one of its
namespaces): `check_target` refuses anything else, as the bench's generator refuses anything
but loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from aggregator.bench.loadgen import designed_failure
from deploy.local_cluster import DASHBOARD, REQUIRED, SUBNET


def check_target(url: str) -> None:
    """Load is only ever sent to this topology's own addresses (or loopback inside a netns)."""
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    address = ipaddress.ip_address(host)
    if address not in SUBNET and not address.is_loopback:
        raise ValueError(f"refusing to send load to {host}: not a local-cluster address")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request of a load run: when it started and ended (s since the run began), and how."""

    start: float
    end: float
    status: int  # 0: no HTTP answer (connection error or time-out)
    cache: str
    served_by: str
    #: The exception's name when there was no answer; "designed" for a 502/504 that names the
    #: required source (its upstream failed or was too slow: the config's answer, not ours).
    error: str = ""


async def _drive(
    urls: Sequence[str],
    concurrency: int,
    duration: float,
    max_requests: int,
    timeout: float,
    began: float,
    stop: threading.Event,
) -> list[Outcome]:
    for url in urls:
        check_target(url)
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=0)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def worker(w: int) -> None:
            n = w
            while time.monotonic() < stop_at and len(outcomes) < max_requests and not stop.is_set():
                url = urls[n % len(urls)]
                n += concurrency
                t0 = time.monotonic() - began
                try:
                    async with session.get(url) as resp:
                        body = await resp.read()
                        designed = designed_failure(resp.status, body, REQUIRED)
                        outcomes.append(
                            Outcome(
                                t0,
                                time.monotonic() - began,
                                resp.status,
                                resp.headers.get("X-Cache", ""),
                                resp.headers.get("X-Served-By", ""),
                                "designed" if designed else "",
                            )
                        )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    t1 = time.monotonic() - began
                    outcomes.append(Outcome(t0, t1, 0, "", "", type(exc).__name__))

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return outcomes


def drive(
    urls: Sequence[str],
    *,
    concurrency: int = 32,
    duration: float = 15,
    max_requests: int = 1_000_000,
    timeout: float = 10,
    began: float | None = None,
    stop: threading.Event | None = None,
) -> list[Outcome]:
    """Bounded closed-loop load over `urls` (round robin), one record per request.

    Times are seconds since `began` (a `time.monotonic()` value; default: now), so a caller
    that injects faults from another thread can place them on the same clock; setting `stop`
    ends the run early (`duration` stays the bound).
    """
    start = time.monotonic() if began is None else began
    stop = threading.Event() if stop is None else stop
    return asyncio.run(_drive(urls, concurrency, duration, max_requests, timeout, start, stop))


def dashboard_urls(base: str, n: int) -> list[str]:
    """`n` distinct dashboard keys (spread over the cluster's hash slots)."""
    cities = ["Paris", "Oslo", "Lima", "Rome", "Kyiv", "Doha", "Baku", "Riga"]
    return [f"{base}{DASHBOARD}?city={cities[i % 8]}&user_id={i // 8 + 1}" for i in range(n)]


def bypass_timeline(outcomes: Sequence[Outcome], window: float = 1.0) -> list[int]:
    """Per window of start times: the percentage of answers that were BYPASS (uncached)."""
    buckets: dict[int, list[Outcome]] = {}
    for o in outcomes:
        buckets.setdefault(int(o.start / window), []).append(o)
    last = max(buckets, default=-1)
    timeline = []
    for index in range(last + 1):
        answers = buckets.get(index, [])
        bypassed = sum(o.cache == "BYPASS" for o in answers)
        timeline.append(round(100 * bypassed / len(answers)) if answers else 0)
    return timeline


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts a scenario reports: sent, answered (2xx), failed, and by status and X-Cache."""
    by_status: dict[str, int] = {}
    by_cache: dict[str, int] = {}
    for o in outcomes:
        by_status[str(o.status or o.error)] = by_status.get(str(o.status or o.error), 0) + 1
        if o.cache:
            by_cache[o.cache] = by_cache.get(o.cache, 0) + 1
    ok = sum(200 <= o.status < 300 for o in outcomes)
    designed = sum(o.error == "designed" for o in outcomes)
    return {
        "sent": len(outcomes),
        "answered": ok,
        "designed_5xx": designed,
        "failed": len(outcomes) - ok - designed,
        "by_status": by_status,
        "by_cache": by_cache,
    }
