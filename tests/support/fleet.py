"""A fleet on loopback: several `aggregator serve -w N` processes sharing one Redis, driven at
a dead demo upstream; the calls that reach it, shared resilience state vs local.

Used by tests/test_shared_resilience_serving.py, and by hand for docs/resilience.md:

    .venv/bin/python -m tests.support.fleet --processes 3 --workers 2 --seconds 60
    .venv/bin/python -m tests.support.fleet --lease-cost 2000   # one fleet lease's cost

(starts its own demo; needs Redis on 127.0.0.1:6379; everything stops by itself).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from aggregator.demo.process import DemoProcess, free_port, start_demo_process
from tests.support.demo import demo_stats, reset_demo
from tests.support.paths import ROOT
from tests.support.redis import SHARED_REDIS_URL, shared_prefix
from tests.support.servers import Server, wait_for_workers, wait_healthy

DEAD_SERVICE = "news"
#: Seconds a server may take to answer: several start at once on a shared 2-core machine.
START_TIMEOUT = 60.0


def dead_config(demo_url: str, *, cooldown: float) -> str:
    """One aggregate of one upstream that always answers 503 at once (a dead upstream)."""
    return f"""
[upstreams.dead]
url = "{demo_url}/news?topic=x&delay=0&status=503"
timeout = 2.0
retries = 0
breaker_failures = 3
breaker_cooldown = {cooldown}

[aggregates.dead]
path = "/api/dead"
sources = ["dead"]
"""


@contextlib.contextmanager
def fleet(
    log_dir: Path,
    config: Path,
    prefix: str,
    *,
    processes: int,
    workers: int,
    shared: bool,
    **extra: str,
) -> Iterator[list[Server]]:
    """`processes` x `aggregator serve -w workers`, one Redis cache, every worker answering."""
    settings = {
        "cache_type": "redis",
        "cache_redis_url": SHARED_REDIS_URL,
        "cache_key_prefix": prefix,
        "shared_resilience": "redis" if shared else "off",
        "metrics": "off",
        "log_level": "WARNING",
    } | extra
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    env.update({f"AGGREGATOR_{k.upper()}": v for k, v in settings.items()})
    servers: list[Server] = []
    try:
        for _ in range(processes):  # all at once: a busy machine starts them in parallel
            port = free_port()
            log = log_dir / f"fleet-{port}.log"
            cmd = [sys.executable, "-m", "aggregator", "serve", "-w", str(workers)]
            cmd += ["--config", str(config), "--bind", f"127.0.0.1:{port}"]
            with log.open("wb") as out:
                popen = subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            servers.append(Server(f"http://127.0.0.1:{port}", popen, log))
        for server in servers:
            wait_healthy(server.url, server.popen, server.log_path, timeout=START_TIMEOUT)
            if workers > 1:  # one worker is served by the supervising process itself
                wait_for_workers(server, workers, timeout=START_TIMEOUT)
        yield servers
    finally:
        for server in servers:
            server.stop()


async def drive(servers: list[Server], seconds: float, concurrency: int) -> int:
    """`concurrency` requests at a time to each server for `seconds`; requests answered."""
    answered = 0
    ends = time.monotonic() + seconds

    async def loop(client: httpx.AsyncClient) -> None:
        nonlocal answered
        while time.monotonic() < ends:
            await client.get("/api/dead")
            answered += 1

    clients = [
        httpx.AsyncClient(
            base_url=s.url,
            trust_env=False,
            timeout=10,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=0),
        )
        for s in servers
    ]
    try:
        await asyncio.gather(*(loop(c) for c in clients for _ in range(concurrency)))
    finally:
        for client in clients:
            await client.aclose()
    return answered


def dead_calls(
    demo: DemoProcess,
    log_dir: Path,
    config: Path,
    *,
    processes: int,
    workers: int,
    seconds: float,
    shared: bool,
    concurrency: int = 8,
    **extra: str,
) -> tuple[int, int]:
    """Calls reaching the dead upstream while the fleet is driven for `seconds`, and requests."""
    with (
        shared_prefix() as prefix,
        fleet(
            log_dir, config, prefix, processes=processes, workers=workers, shared=shared, **extra
        ) as servers,
    ):
        reset_demo(demo)
        answered = asyncio.run(drive(servers, seconds, concurrency))
        calls: int = demo_stats(demo)["requests"][DEAD_SERVICE]
    return calls, answered


async def lease_cost(calls: int, batches: int) -> list[tuple[float, float]]:
    """Per fleet-lease (acquire awaited, release queued): (wall µs, this process's CPU µs), one
    pair per batch of `calls` sequential leases on the shared Redis."""
    from aggregator.resilience.shared import SharedState
    from aggregator.settings import Settings

    out = []
    with shared_prefix() as prefix:
        settings = Settings(
            cache_type="redis",
            cache_redis_url=SHARED_REDIS_URL,
            cache_key_prefix=prefix,
            shared_resilience="redis",
        )
        state = SharedState(settings)
        await state.start()
        try:
            for _ in range(batches):
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    lease = await state.lease("up", 1_000_000, 10)
                    assert lease, "the lease was refused or not enforced"
                    state.report("release", "up", lease)
                    await asyncio.sleep(0)  # the release goes out in the background
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                out.append((wall / calls * 1e6, cpu / calls * 1e6))
        finally:
            await state.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--lease-cost", type=int, default=0, help="time N fleet leases instead (5 batches)"
    )
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--cooldown", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.lease_cost:
        pairs = asyncio.run(lease_cost(args.lease_cost, 5))
        walls, cpus = sorted(w for w, _ in pairs), sorted(c for _, c in pairs)
        print(
            f"fleet lease: wall {walls[2]:.0f} µs/call (min {walls[0]:.0f}, max {walls[-1]:.0f}), "
            f"client CPU {cpus[2]:.0f} µs/call (min {cpus[0]:.0f}, max {cpus[-1]:.0f})"
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        with start_demo_process(latency=0.0, log_path=log_dir / "demo.log") as demo:
            config = log_dir / "dead.toml"
            config.write_text(dead_config(demo.url, cooldown=args.cooldown))
            for round_ in range(args.rounds):
                for shared in (False, True):  # interleaved: local, shared, local, shared...
                    calls, answered = dead_calls(
                        demo,
                        log_dir,
                        config,
                        processes=args.processes,
                        workers=args.workers,
                        seconds=args.seconds,
                        shared=shared,
                        concurrency=args.concurrency,
                    )
                    mode = "shared" if shared else "local"
                    print(
                        f"round {round_ + 1} {mode}: {calls} calls reached the dead upstream "
                        f"in {args.seconds:g} s ({answered} requests answered)",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
