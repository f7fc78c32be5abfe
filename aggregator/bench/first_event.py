"""Time to first event vs time to the whole answer: `python -m aggregator.bench.first_event`.

Against a running server (loopback only), each request a cache miss (a `city` of its own, so
the fill really fans out): at each concurrency, `requests` SSE requests (`concurrency` in
flight, each on its own connection) record when the first `event: source` and when
`event: done` arrived, and as many plain JSON requests record when their whole body did. Rounds
interleave SSE and JSON at each concurrency, so drift (the demo warming up, another process on
the machine) lands on both. Prints one JSON line per concurrency with the medians and p95s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid

import httpx

from aggregator.bench.loadgen import check_loopback


async def _sse(client: httpx.AsyncClient, url: str) -> tuple[float, float]:
    """Seconds to the first `source` event and to `done`."""
    started = time.perf_counter()
    first = done = 0.0
    seen = b""
    async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as response:
        async for chunk in response.aiter_raw():
            seen += chunk
            now = time.perf_counter() - started
            if not first and b"event: source" in seen:
                first = now
            if b"event: done" in seen:
                done = now
    return first or done, done


async def _json(client: httpx.AsyncClient, url: str) -> float:
    started = time.perf_counter()
    response = await client.get(url)
    response.raise_for_status()
    return time.perf_counter() - started


async def _batch(base: str, concurrency: int, requests: int, kind: str) -> list[tuple[float, ...]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(trust_env=False, timeout=30, limits=limits) as client:

        async def one() -> tuple[float, ...]:
            url = f"{base}&city=b{uuid.uuid4().hex[:12]}"  # a key nobody filled: a miss
            async with gate:
                return await _sse(client, url) if kind == "sse" else (await _json(client, url),)

        return list(await asyncio.gather(*[one() for _ in range(requests)]))


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


async def measure(
    url: str, concurrencies: list[int], requests: int, rounds: int
) -> list[dict[str, float]]:
    """One summary per concurrency: first event, done, and the JSON answer (ms)."""
    got: dict[int, dict[str, list[float]]] = {
        c: {"first": [], "done": [], "json": []} for c in concurrencies
    }
    for _ in range(rounds):
        for c in concurrencies:
            for first, done in await _batch(url, c, max(requests, c), "sse"):
                got[c]["first"].append(first)
                got[c]["done"].append(done)
            got[c]["json"] += [t for (t,) in await _batch(url, c, max(requests, c), "json")]
    return [
        {
            "concurrency": c,
            "requests_per_kind": len(v["json"]),
            **{f"{name}_p50_ms": _ms(v[name], 0.5) for name in ("first", "done", "json")},
            **{f"{name}_p95_ms": _ms(v[name], 0.95) for name in ("first", "done", "json")},
            "first_over_done_p50": round(
                statistics.median(v["first"]) / statistics.median(v["done"]), 2
            ),
        }
        for c, v in got.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:8000/api/dashboard?user_id=7",
        help="the aggregate, with its parameters but `city` (each request gets its own)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--requests", type=int, default=64, help="per kind, round and level")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    check_loopback(args.url)
    for line in asyncio.run(measure(args.url, args.concurrency, args.requests, args.rounds)):
        print(json.dumps(line), file=sys.stdout)


if __name__ == "__main__":
    main()
