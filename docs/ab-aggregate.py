"""Two trees of this project served side by side on the bench's aggregate, interleaved.

    git worktree add /tmp/before <commit>
    .venv/bin/python docs/ab-aggregate.py /tmp/before . [--rounds 4] [--duration 8] [-c 64]

Each tree is served as shipped (`aggregator serve` from its own directory, so it imports that
tree's code: hypercorn.toml, one worker, INFO access log, metrics on) with the bench's config:
5 demo sources of 100 ms and ~2 KB each, one demo process for both. `wrk -t2` on the uncached
`/bench` aggregate, the order swapped each round; the server's CPU (all its threads) is read
from psutil around each run. Prints each run, then per tree the median (min-max) of requests/s
and of CPU ms per request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from aggregator.bench.load_tools import run_load
from aggregator.bench.plan import Workload
from aggregator.bench.servers import cpu_seconds, probe
from aggregator.demo.process import free_port, start_demo_process

PATH = "/bench?city=Paris&user_id=7"


def serve(tree: Path, port: int, config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AGGREGATOR_CONFIG": str(config), "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "aggregator", "serve", f"--bind=127.0.0.1:{port}"]
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(port: int) -> None:
    for _ in range(150):
        if probe(port, "/healthz", 1.0) == 200:
            return
        time.sleep(0.2)
    raise SystemExit(f"server on {port} did not start")


def run(port: int, process: psutil.Process, duration: int, concurrency: int) -> tuple[float, float]:
    """One wrk run: requests/s and the server's CPU ms per request (its children included)."""
    processes = [process, *process.children(recursive=True)]
    before = cpu_seconds(processes)
    load = run_load("wrk", f"http://127.0.0.1:{port}{PATH}", concurrency, duration)
    used = cpu_seconds(processes) - before
    return load.rps, used / max(load.requests, 1) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    with (
        tempfile.TemporaryDirectory() as tmp,
        start_demo_process(latency=0.1, payload_kb=2) as demo,
    ):
        config = Path(tmp) / "bench.toml"
        config.write_text(Workload(payload_kb=2).config_toml(demo.url))
        ports = {name: free_port() for name in trees}
        servers = {
            name: serve(tree, ports[name], config, Path(tmp) / f"{name}.log")
            for name, tree in trees.items()
        }
        try:
            for name in trees:
                wait_ready(ports[name])
                run(ports[name], psutil.Process(servers[name].pid), 2, 16)  # warm-up
            for rnd in range(args.rounds):
                order = list(trees) if rnd % 2 == 0 else list(trees)[::-1]
                for name in order:
                    process = psutil.Process(servers[name].pid)
                    rate, ms = run(ports[name], process, args.duration, args.concurrency)
                    seen[name].append((rate, ms))
                    print(f"round {rnd + 1} {name}: {rate:.1f} req/s, {ms:.2f} ms CPU/request")
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(10)
    for name, values in seen.items():
        rates, cpus = [v[0] for v in values], [v[1] for v in values]
        print(
            f"{name}: {statistics.median(rates):.1f} req/s ({min(rates):.1f}-{max(rates):.1f}), "
            f"{statistics.median(cpus):.2f} ms CPU/request ({min(cpus):.2f}-{max(cpus):.2f})"
        )


if __name__ == "__main__":
    main()
