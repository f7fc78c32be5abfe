"""Throughput and CPU per request for 1, 2 and 3 aggregator hosts behind HAProxy.

`python -m deploy.scaling --reps 3 --seconds 10` (as root) builds the local cluster once,
then for each repetition runs the host counts in a rotated order: HAProxy's runtime API puts
the hosts not in the run into maintenance, the project's load generator runs inside the load
balancer's namespace (so it targets 127.0.0.1 there), and the CPU of every process in each
namespace is read from /proc before and after. Every number is printed as one JSON line per
run, then medians with min-max per host count. All of it shares this machine's cores, so the
CPU per request, not the requests per second, is the figure that carries to real hosts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from deploy.local_cluster import DASHBOARD, LB, LB_PORT, LocalCluster, in_netns

URL = f"http://127.0.0.1:{LB_PORT}{DASHBOARD}?city=Paris&user_id=7"


def use_hosts(cluster: LocalCluster, n: int) -> None:
    """Only the first `n` hosts take traffic (the others in maintenance, in both backends)."""
    for i, host in enumerate(cluster.aggs):
        state = "ready" if i < n else "maint"
        for backend in ("ready", "live"):
            cluster.haproxy(f"set server {backend}/{host.name} state {state}")
    cluster.wait_lb_ready(time.monotonic() + 10, servers=n)


def one_run(cluster: LocalCluster, n: int, seconds: float, concurrency: int) -> dict[str, Any]:
    use_hosts(cluster, n)
    hosts = [LB, *cluster.aggs[:n]]
    before = {h.name: cluster.cpu_seconds(h) for h in hosts}
    argv = [cluster.python, "-m", "aggregator.bench.loadgen", URL]
    argv += ["-c", str(concurrency), "-d", str(seconds), "--timeout", "10"]
    out = subprocess.run(
        in_netns(LB, argv), capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    load = json.loads(out.stdout.strip().splitlines()[-1])
    after = {h.name: cluster.cpu_seconds(h) for h in hosts}
    requests = max(1, int(load["requests"]))
    # The generator ran in the lb namespace too, but it has exited before `after` is read:
    # what the namespace gained is HAProxy's (the generator reports its own).
    lb_cpu = after["lb"] - before["lb"]
    agg_cpu = sum(after[h.name] - before[h.name] for h in cluster.aggs[:n])
    return {
        "hosts": n,
        "requests": requests,
        "errors": requests - int(load["ok"]),
        "rps": round(requests / float(load["duration_s"]), 1),
        "p50_ms": load["p50_ms"],
        "p99_ms": load["p99_ms"],
        "agg_cpu_ms_per_req": round(1000 * agg_cpu / requests, 3),
        "haproxy_cpu_ms_per_req": round(1000 * lb_cpu / requests, 3),
        "loadgen_cpu_ms_per_req": round(1000 * float(load["generator_cpu_s"]) / requests, 3),
    }


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):g} ({min(values):g}-{max(values):g})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.scaling", description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/agc-scaling"))
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    with LocalCluster(args.workdir) as cluster:
        one_run(cluster, 3, 3, args.concurrency)  # warm: the entry cached, connections open
        for rep in range(args.reps):
            order = [1, 2, 3][rep % 3 :] + [1, 2, 3][: rep % 3]
            for n in order:
                run = one_run(cluster, n, args.seconds, args.concurrency) | {"rep": rep}
                print(json.dumps(run), flush=True)
                runs.append(run)
    base = statistics.median(r["rps"] for r in runs if r["hosts"] == 1)
    for n in (1, 2, 3):
        mine = [r for r in runs if r["hosts"] == n]
        rps = [r["rps"] for r in mine]
        summary = {
            "hosts": n,
            "rps": _median(rps),
            "rps_ratio_to_1": round(statistics.median(rps) / base, 2),
            "agg_cpu_ms_per_req": _median([r["agg_cpu_ms_per_req"] for r in mine]),
            "haproxy_cpu_ms_per_req": _median([r["haproxy_cpu_ms_per_req"] for r in mine]),
            "p99_ms": _median([r["p99_ms"] for r in mine]),
            "errors": sum(r["errors"] for r in mine),
        }
        print("summary " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
