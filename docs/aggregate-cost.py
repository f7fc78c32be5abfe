"""CPU per aggregate in our app and in the plain FastAPI peer, called in process (no server).

Separates what the apps cost from what their servers cost (docs/benchmarks.md, issue 16):

    .venv/bin/python docs/aggregate-cost.py [--reps 5] [--n 1500] [--profile ours|peer]

One process, uvloop, both ASGI apps started (lifespan) side by side on one loop with the bench's
config (5 demo sources, 2 KB each, 0 ms unless `--latency`: only work), the shipped settings (INFO
access log, metrics, GC tuned) for ours; 64 requests at once, reps interleaved. CPU is this
process's `time.process_time` per aggregate (the demo runs in its own process), median
(min-max). `--profile` runs one side under cProfile and prints its top entries instead;
`--only` measures one side alone (under py-spy, say).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from aggregator.bench.plan import Workload
from aggregator.demo.process import start_demo_process

ASGIApp = Callable[..., Awaitable[None]]
QUERY = b"city=Paris&user_id=7"


class Lifespan:
    """Drive an ASGI app's lifespan by hand: startup on enter, shutdown on exit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "lifespan.startup"})
        message = await self.outbox.get()
        assert message["type"] == "lifespan.startup.complete", message
        self.state = scope["state"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.outbox.get()
        await self.task


async def get(app: ASGIApp, state: dict[str, Any], path: str) -> int:
    """One GET through the ASGI app; its status (the body is read and checked for size)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": QUERY,
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": dict(state),
    }
    sent = False
    status = 0
    size = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # a client that stays: never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            size += len(message.get("body", b""))

    await app(scope, receive, send)
    assert status == 200 and size > 5000, (status, size)
    return status


async def cpu_per_request(
    app: ASGIApp, state: dict[str, Any], path: str, n: int, concurrency: int
) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await get(app, state, path)

    started = time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    return (time.process_time() - started) / n * 1e6


def build_apps(workload: Workload, demo_url: str, work: Path) -> dict[str, ASGIApp]:
    config = work / "bench.toml"
    config.write_text(workload.config_toml(demo_url))
    os.environ.update(
        AGGREGATOR_CONFIG=str(config),
        AGGREGATOR_MODE="loop",
        AGGREGATOR_ENGINE="aiohttp",
        AGGREGATOR_WORKERS="1",
        PLAIN_UPSTREAMS=json.dumps({name: url for name, _, url in workload.upstreams(demo_url)}),
        PLAIN_ENGINE="aiohttp",
    )
    from aggregator.bench import fastapi_plain
    from aggregator.ops.serve import worker_app

    return {"ours": worker_app(), "peer": fastapi_plain.app}


async def main(args: argparse.Namespace) -> None:
    workload = Workload(latency=args.latency, payload_kb=2)
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_demo_process(latency=args.latency, payload_kb=2) as demo,
    ):
        apps = build_apps(workload, demo.url, Path(tmp))
        async with Lifespan(apps["ours"]) as ours, Lifespan(apps["peer"]) as peer:
            states = {"ours": ours.state, "peer": peer.state}
            for name, app in apps.items():  # warm: pools, lazy imports
                await cpu_per_request(app, states[name], "/bench", 300, args.concurrency)
            if args.only:  # for an outside profiler: `py-spy record -- python ... --only ours`
                apps = {args.only: apps[args.only]}
            elif args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                await cpu_per_request(
                    apps[args.profile], states[args.profile], "/bench", args.n, args.concurrency
                )
                profiler.disable()
                pstats.Stats(profiler).sort_stats(args.sort).print_stats(args.top)
                return
            seen: dict[str, list[float]] = {name: [] for name in apps}
            for rep in range(args.reps):
                order = list(apps) if rep % 2 == 0 else list(apps)[::-1]
                for name in order:
                    seen[name].append(
                        await cpu_per_request(
                            apps[name], states[name], "/bench", args.n, args.concurrency
                        )
                    )
    for name, values in seen.items():
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(f"{name}: {statistics.median(values):.0f} us/aggregate ({spread})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.0, help="each source's, in seconds")
    parser.add_argument("--profile", choices=("ours", "peer"))
    parser.add_argument("--only", choices=("ours", "peer"), help="measure one side alone")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=40)
    sys.exit(uvloop.run(main(parser.parse_args())))
