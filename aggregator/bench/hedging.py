"""Hedging measured: `python -m aggregator.bench.hedging`.

Starts its own demo upstreams and one Hypercorn worker (loopback, free ports, no cache) serving
two aggregates over the same demo source: `plain`, and `hedged` with `hedge_after`. Rounds
alternate which goes first, so drift (another process on the machine, the demo warming up)
lands on both. Each round sends `requests` requests to each (`concurrency` in flight, each a
key of its own). Prints one JSON line per aggregate: p50 and p99 per round (their median and
min-max) and over all rounds pooled (`all_*`), upstream calls per
request as the demo counted them, new upstream connections, the server's CPU per request, and
`aggregator_hedges` by outcome.

The default source has a heavy tail (`tail=0.05&tail_delay=1`: 1 call in 20 takes a second
more), which is what hedging is for; `--knobs 'delay=0&jitter=0.3'` shows the uniform spread,
where a hedge has little to win at the tail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from aggregator.bench.servers import cpu_seconds
from aggregator.demo.process import DemoProcess, free_port, start_demo_process

_ROOT = Path(__file__).resolve().parents[2]
NAMES = ("plain", "hedged")


def config(demo: str, knobs: str, hedge_after: str, retry_budget: float) -> str:
    """Two aggregates over one demo source; only `hedged` hedges."""
    tables = []
    for name in NAMES:
        hedge = f"hedge_after = {_toml_value(hedge_after)}\n" if name == "hedged" else ""
        tables.append(f"""
[upstreams.{name}]
url = "{demo}/weather/{{city}}?{knobs}"
schema = "aggregator.demo.models:Weather"
timeout = 3
retries = 0
retry_budget = {retry_budget}
{hedge}
[aggregates.{name}]
path = "/{name}"
sources = ["{name}"]
deadline = 5
params = {{ city = "str" }}
""")
    return "".join(tables)


def _toml_value(hedge_after: str) -> str:
    """`0.2` stays a number, `p95` becomes the string `"p95"`."""
    try:
        return repr(float(hedge_after))
    except ValueError:
        return json.dumps(hedge_after)


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


async def _batch(base: str, path: str, requests: int, concurrency: int) -> list[float]:
    """Seconds each request took; any answer but a complete 200 ends the run."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30, limits=limits) as c:

        async def one() -> float:
            async with gate:
                began = time.perf_counter()
                answer = await c.get(path, params={"city": f"b{uuid.uuid4().hex[:12]}"})
                took = time.perf_counter() - began
            if answer.status_code != 200 or not answer.json()["complete"]:
                raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:300]}")
            return took

        return list(await asyncio.gather(*(one() for _ in range(requests))))


def _demo_counts(demo: DemoProcess) -> tuple[int, int]:
    stats = httpx.get(f"{demo.url}/_stats", trust_env=False).json()
    return int(stats["requests"]["weather"]), int(stats["connections"])


def _hedges(metrics: str) -> dict[str, int]:
    found = re.findall(r'aggregator_hedges_total\{outcome="(\w+)",source="hedged"\} (\S+)', metrics)
    return {outcome: int(float(value)) for outcome, value in found}


def _cpu_seconds(popen: subprocess.Popen[bytes]) -> float:
    """User plus system CPU of the server and its worker so far."""
    root = psutil.Process(popen.pid)
    return cpu_seconds([root, *root.children(recursive=True)])


def _serve(config_path: Path, engine: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    env |= {
        "AGGREGATOR_CONFIG": str(config_path),
        "AGGREGATOR_CACHE_TYPE": "null",
        "AGGREGATOR_METRICS": "public",
        "AGGREGATOR_ENGINE": engine,
    }
    command = [sys.executable, "-m", "hypercorn", "--config", "hypercorn.toml"]
    command += ["--bind", f"127.0.0.1:{port}", "--workers", "1", "asgi:app"]
    with log.open("wb") as out:
        popen = subprocess.Popen(command, cwd=_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and popen.poll() is None:
        try:
            if httpx.get(f"{base}/healthz", trust_env=False, timeout=1).status_code == 200:
                return popen, base
        except httpx.HTTPError:
            time.sleep(0.1)
    popen.kill()
    popen.wait()
    raise RuntimeError(f"the aggregator did not start:\n{log.read_text()[-3000:]}")


async def measure(
    *,
    knobs: str,
    hedge_after: str,
    concurrency: int,
    requests: int,
    rounds: int,
    engine: str = "aiohttp",
    retry_budget: float = 0.2,
) -> list[dict[str, Any]]:
    """One summary per aggregate (`plain`, `hedged`), measured in interleaved rounds."""
    with tempfile.TemporaryDirectory(prefix="aggregator-hedging-") as tmp:
        work = Path(tmp)
        with start_demo_process(latency=0.0, log_path=work / "demo.log") as demo:
            config_path = work / "config.toml"
            config_path.write_text(config(demo.url, knobs, hedge_after, retry_budget))
            popen, base = _serve(config_path, engine, work / "hypercorn.log")
            try:
                return await _rounds(demo, popen, base, concurrency, requests, rounds)
            finally:
                popen.terminate()
                try:
                    popen.wait(10)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()


async def _rounds(
    demo: DemoProcess,
    server: subprocess.Popen[bytes],
    base: str,
    concurrency: int,
    requests: int,
    rounds: int,
) -> list[dict[str, Any]]:
    seconds: dict[str, list[float]] = {name: [] for name in NAMES}
    per_round: dict[str, list[list[float]]] = {name: [] for name in NAMES}
    calls = dict.fromkeys(NAMES, 0)
    connections = dict.fromkeys(NAMES, 0)
    cpu = dict.fromkeys(NAMES, 0.0)
    warm = min(requests, 4 * concurrency)  # connections opened, a percentile's samples taken
    for name in NAMES:
        await _batch(base, f"/{name}", warm, concurrency)
    hedges_before = _hedges(httpx.get(f"{base}/metrics", trust_env=False).text)
    for turn in range(rounds):
        for name in NAMES if turn % 2 == 0 else NAMES[::-1]:
            calls_before, connections_before = _demo_counts(demo)
            cpu_before = _cpu_seconds(server)
            batch = await _batch(base, f"/{name}", requests, concurrency)
            seconds[name] += batch
            per_round[name].append(batch)
            cpu[name] += _cpu_seconds(server) - cpu_before
            calls_after, connections_after = _demo_counts(demo)
            calls[name] += calls_after - calls_before
            connections[name] += connections_after - connections_before
    hedges = _hedges(httpx.get(f"{base}/metrics", trust_env=False).text)
    summaries = []
    for name in NAMES:
        values = seconds[name]
        summary: dict[str, Any] = {"aggregate": name, "requests": len(values)}
        for label, q in (("p50", 0.50), ("p99", 0.99)):
            rounds_ms = [_ms(batch, q) for batch in per_round[name]]
            summary[f"{label}_ms_median_of_rounds"] = round(statistics.median(rounds_ms), 1)
            summary[f"{label}_ms_min_max"] = [min(rounds_ms), max(rounds_ms)]
        summary |= {
            "all_p50_ms": _ms(values, 0.50),
            "all_p90_ms": _ms(values, 0.90),
            "all_p99_ms": _ms(values, 0.99),
            "all_max_ms": _ms(values, 1.0),
            "upstream_calls_per_request": round(calls[name] / len(values), 3),
            "new_upstream_connections": connections[name],
            "server_cpu_ms_per_request": round(cpu[name] * 1000 / len(values), 2),
        }
        if name == "hedged":
            summary["hedges"] = {k: v - hedges_before.get(k, 0) for k, v in hedges.items()}
        summaries.append(summary)
    return summaries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--knobs",
        default="delay=0.05&jitter=0.05&tail=0.05&tail_delay=1",
        help="the demo source's knobs (its query string)",
    )
    parser.add_argument("--hedge-after", default="0.2", help="seconds, or a percentile such as p95")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per aggregate and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", choices=["aiohttp", "httpx"], default="aiohttp")
    parser.add_argument("--retry-budget", type=float, default=0.2, help="of both sources")
    args = parser.parse_args(argv)
    summaries = asyncio.run(
        measure(
            knobs=args.knobs,
            hedge_after=args.hedge_after,
            concurrency=args.concurrency,
            requests=args.requests,
            rounds=args.rounds,
            engine=args.engine,
            retry_budget=args.retry_budget,
        )
    )
    for line in summaries:
        print(json.dumps(line), file=sys.stdout)


if __name__ == "__main__":
    main()
