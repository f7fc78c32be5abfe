"""CPU per call of httpx's own engine, 64 calls at once: its default pool (100/20) vs 1024/256.

Why `fastapi-plain:async:httpx` (the peer as most FastAPI users run it, with the pool raised
like ours) costs so much (docs/benchmarks.md, 2026-12-04):

    .venv/bin/python docs/httpx-pool-cost.py

One process, uvloop, GC tuned as aggregator ships it, the demo's weather source (20 ms, 2 KB),
2,000 calls per rep, 3 interleaved reps per pool size; process CPU per call, median (min-max).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time

import httpx
import uvloop

from aggregator.demo.process import start_demo_process

POOLS = {
    "default (100/20)": httpx.Limits(max_connections=100, max_keepalive_connections=20),
    "1024/256": httpx.Limits(max_connections=1024, max_keepalive_connections=256),
}


async def cpu_per_call(client: httpx.AsyncClient, url: str, n: int, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            (await client.get(url)).raise_for_status()

    await asyncio.gather(*(one() for _ in range(200)))  # warm the pool
    started = time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    return (time.process_time() - started) / n * 1e6


async def main(url: str) -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000)
    seen: dict[str, list[float]] = {name: [] for name in POOLS}
    for rep in range(3):
        order = list(POOLS.items()) if rep % 2 == 0 else list(POOLS.items())[::-1]
        for name, limits in order:
            async with httpx.AsyncClient(limits=limits) as client:
                seen[name].append(await cpu_per_call(client, url, 2000, 64))
    for name, values in seen.items():
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"{name}: {statistics.median(values):.0f} us/call ({spread})")


if __name__ == "__main__":
    with start_demo_process(latency=0.02, payload_kb=2) as demo:
        uvloop.run(main(demo.url + "/weather/Paris"))
