"""Soak: one server under sustained load from failing and stalling upstreams, watched for leaks.

`aggregator soak` reuses the bench's parts: the demo upstreams (`failure_rate` of their calls
answer 503, `stall_rate` answer nothing until the caller times out), one `loop:async:aiohttp`
server, and the built-in load generator in its own process. Phases: warm-up load, quiet, idle
snapshot, measured load (the server's worker sampled every `interval`), quiet, idle snapshot.
The verdict:

- no unexpected answer: every response is a 2xx or a *designed* 502/504, and every request
  got one. The config: K sources of the demo with a 1 s timeout, deadline 2 s, `profile`
  required, the others optional, default retries (2) and breakers. A failed optional source
  is a partial 200; a failed `profile` (503 after its retries, a timeout, an open breaker) is
  a 502 whose body names it; the deadline taking `profile` is a 504 naming it. Any other
  5xx (a 500, a 503 from the in-flight limit, a 502/504 not naming `profile`) is unexpected;
- no leak: the idle snapshots are taken once the worker and the demo have closed their idle
  connections (keep-alive expiry), or after `SETTLE_S`; after the load the worker holds no
  more file descriptors or TCP connections than before it, and the demo has no call in flight
  and no more open connections than before;
- memory: the worker's RSS at the end of the measured load is within `rss_growth_limit` of
  its RSS at the start (after the warm-up).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import psutil

from aggregator.bench.demo_control import demo_call, settle
from aggregator.bench.load_tools import run_load
from aggregator.bench.loadgen import LoadResult
from aggregator.bench.machine import machine_info
from aggregator.bench.plan import Target, Workload
from aggregator.bench.runner import Progress
from aggregator.bench.servers import ServerProcess
from aggregator.demo.process import DemoProcess, start_demo_process

REQUIRED = ("profile",)
SOURCE_TIMEOUT = 1.0
DEADLINE = 2.0
#: Longest wait for an idle worker to close its connections: aiohttp drops idle upstream
#: connections within about two keep-alive expiries (5 s each).
SETTLE_S = 15.0
TARGET = Target("loop", "async", "aiohttp")


@dataclass(frozen=True, slots=True)
class SoakOptions:
    """How long, how hard, and how badly the upstreams behave."""

    duration: float = 300.0
    concurrency: int = 256
    failure_rate: float = 0.05
    stall_rate: float = 0.01
    warmup: float = 30.0
    sources: int = 5
    latency: float = 0.1
    interval: float = 5.0
    #: AGGREGATOR_MAX_IN_FLIGHT for the server; None keeps its default.
    max_in_flight: int | None = None
    rss_growth_limit: float = 0.10

    def workload(self) -> Workload:
        """The demo upstreams' behaviour (validated like a bench workload)."""
        return Workload(
            sources=self.sources,
            latency=self.latency,
            failure_rate=self.failure_rate,
            stall_rate=self.stall_rate,
        )


@dataclass(slots=True)
class Snapshot:
    """The worker and the demo while idle."""

    fds: int
    connections: int
    rss_mb: float
    demo_open_connections: int
    demo_in_flight: int


@dataclass(slots=True)
class Sample:
    """The worker during the measured load."""

    t_s: float
    rss_mb: float
    fds: int
    connections: int


@dataclass(slots=True)
class SoakResult:
    """Everything the report and the verdict need."""

    options: SoakOptions
    machine: dict[str, Any]
    warmup: LoadResult | None = None
    load: LoadResult | None = None
    before: Snapshot | None = None
    after: Snapshot | None = None
    samples: list[Sample] = field(default_factory=list)
    upstream_calls: int = 0
    #: Calls the demo received more than once for one request and source (same X-Request-ID and
    #: path): the retries, seen from the upstream's side (of its last 10,000 requests).
    retried_calls: int = 0
    server_cpu_s: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def rss_growth(self) -> float:
        """RSS at the end of the measured load over RSS at its start, minus one."""
        if len(self.samples) < 2 or self.samples[0].rss_mb <= 0:
            return float("nan")
        return self.samples[-1].rss_mb / self.samples[0].rss_mb - 1

    @property
    def passed(self) -> bool:
        """Every check held (and there were checks)."""
        return bool(self.checks) and all(self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view, with the derived figures."""
        data = asdict(self)
        data.update(rss_growth=self.rss_growth, passed=self.passed)
        return data


def worker_process(server: ServerProcess) -> psutil.Process:
    """The process serving requests: Hypercorn's spawned worker, or the server itself."""
    parent = psutil.Process(server.popen.pid)
    for child in parent.children():
        cmdline = " ".join(child.cmdline())
        if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            return child
    return parent


def _tcp_connections(proc: psutil.Process) -> int:
    return sum(1 for c in proc.net_connections(kind="tcp") if c.status != psutil.CONN_LISTEN)


def snapshot(worker: psutil.Process, demo: DemoProcess) -> Snapshot:
    """Look at the idle worker and the demo."""
    stats = demo_call(demo, "GET", "/_stats")
    return Snapshot(
        fds=worker.num_fds(),
        connections=_tcp_connections(worker),
        rss_mb=worker.memory_info().rss / 2**20,
        demo_open_connections=int(stats["open_connections"]),
        demo_in_flight=int(stats["in_flight"]),
    )


def _quiet(server: ServerProcess, worker: psutil.Process, demo: DemoProcess) -> None:
    """Let in-flight work end and idle connections close (up to SETTLE_S; a leak stays)."""
    until = time.monotonic() + SETTLE_S
    settle(server, demo)
    while time.monotonic() < until:
        open_ = demo_call(demo, "GET", "/_stats")["open_connections"]
        if _tcp_connections(worker) == 0 and open_ == 0:
            return
        time.sleep(0.2)


def run_soak(options: SoakOptions, progress: Progress) -> SoakResult:
    """Run the phases and judge them (see the module docstring)."""
    result = SoakResult(options, machine_info("builtin"))
    result.machine["loadavg_before"] = list(os.getloadavg())
    workload = options.workload()
    progress(
        f"demo upstreams: {workload.sources} sources of {workload.latency:g} s, "
        f"{workload.failure_rate:.0%} answer 503, {workload.stall_rate:.0%} stall"
    )
    env = {}
    if options.max_in_flight is not None:
        env["AGGREGATOR_MAX_IN_FLIGHT"] = str(options.max_in_flight)
    with (
        TemporaryDirectory(prefix="aggregator-soak-") as tmp,
        start_demo_process(
            latency=workload.latency,
            failure_rate=workload.failure_rate,
            stall_rate=workload.stall_rate,
        ) as demo,
    ):
        config = Path(tmp) / "soak.toml"
        config.write_text(
            workload.config_toml(
                demo.url, timeout=SOURCE_TIMEOUT, deadline=DEADLINE, required=REQUIRED
            )
        )
        server = ServerProcess(TARGET, config, Path(tmp), threads=64, env=env)
        try:
            server.wait_ready()
            _phases(options, server, demo, result, progress)
        finally:
            server.stop()
    result.machine["loadavg_after"] = list(os.getloadavg())
    _judge(result)
    return result


def _phases(
    options: SoakOptions,
    server: ServerProcess,
    demo: DemoProcess,
    result: SoakResult,
    progress: Progress,
) -> None:
    url = server.base_url + TARGET.path
    worker = worker_process(server)

    def load(seconds: float) -> LoadResult:
        return run_load(
            "builtin", url, options.concurrency, seconds, timeout=30.0, required=REQUIRED
        )

    progress(f"warm-up: {options.warmup:g} s at c={options.concurrency}")
    result.warmup = load(options.warmup)
    _quiet(server, worker, demo)
    result.before = snapshot(worker, demo)
    demo_call(demo, "POST", "/_reset")
    progress(f"soak: {options.duration:g} s at c={options.concurrency}")
    cpu = server.cpu_seconds()
    started = time.monotonic()
    with ThreadPoolExecutor(1, thread_name_prefix="soak-load") as pool:
        running = pool.submit(load, options.duration)
        while result.load is None:
            result.samples.append(_sample(worker, started))
            progress(_describe_sample(result.samples[-1]))
            try:
                result.load = running.result(timeout=options.interval)
            except TimeoutError:
                continue
    result.samples.append(_sample(worker, started))  # at the end of the load
    result.server_cpu_s = server.cpu_seconds() - cpu
    result.upstream_calls = int(demo_call(demo, "GET", "/_stats")["total_requests"])
    result.retried_calls = retried_calls(demo_call(demo, "GET", "/_requests?headers=1"))
    _quiet(server, worker, demo)
    result.after = snapshot(worker, demo)


def retried_calls(listing: dict[str, Any]) -> int:
    """How many of the demo's recorded requests repeat an earlier (request id, path) pair."""
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for request in listing["requests"]:
        request_id = request.get("headers", {}).get("x-request-id")
        if request_id is None:
            continue
        key = (request_id, request["raw_path"])
        repeats += key in seen
        seen.add(key)
    return repeats


def _sample(worker: psutil.Process, started: float) -> Sample:
    return Sample(
        t_s=round(time.monotonic() - started, 1),
        rss_mb=worker.memory_info().rss / 2**20,
        fds=worker.num_fds(),
        connections=_tcp_connections(worker),
    )


def _describe_sample(sample: Sample) -> str:
    return (
        f"  t={sample.t_s:>6.1f} s  rss {sample.rss_mb:7.1f} MB  fds {sample.fds:5d}  "
        f"tcp {sample.connections:5d}"
    )


def _judge(result: SoakResult) -> None:
    runs = [r for r in (result.warmup, result.load) if r is not None]
    before, after = result.before, result.after
    if result.load is None or before is None or after is None:
        return
    result.checks = {
        "no unexpected answers": all(r.unexpected == 0 for r in runs),
        "no leaked file descriptors": after.fds <= before.fds,
        "no leaked connections": after.connections <= before.connections
        and after.demo_open_connections <= before.demo_open_connections
        and after.demo_in_flight == 0,
        f"RSS growth under {result.options.rss_growth_limit:.0%}": result.rss_growth
        < result.options.rss_growth_limit,
    }


def report(result: SoakResult) -> list[str]:
    """The figures as lines for a terminal (and the verdict)."""
    o, load, b, a = result.options, result.load, result.before, result.after
    lines = [
        f"soak: {o.duration:g} s at c={o.concurrency} (+{o.warmup:g} s warm-up), {o.sources} "
        f"sources of {o.latency:g} s, {o.failure_rate:.0%} upstream 503s, "
        f"{o.stall_rate:.0%} upstream stalls (timeout {SOURCE_TIMEOUT:g} s)",
        f"machine: {result.machine['cores']} cores, {result.machine['cpu']}; load average "
        f"before {result.machine['loadavg_before'][0]:.2f}",
    ]
    if load is not None:
        other = load.status_errors - load.designed_5xx
        lines += [
            f"requests: {load.requests} in {load.duration_s:.1f} s ({load.rps:.1f}/s), p50 "
            f"{load.p50_ms:.0f} ms, p99 {load.p99_ms:.0f} ms; statuses {load.statuses}",
            f"  partial 200s {load.partial}, designed 502/504 {load.designed_5xx}, other "
            f"non-2xx {other}, socket errors {load.socket_errors}, client timeouts "
            f"{load.timeouts}",
            f"upstream calls: {result.upstream_calls} "
            f"({result.upstream_calls / max(1, load.requests):.2f} per request, "
            f"{result.retried_calls} of them retries); server CPU "
            f"{result.server_cpu_s:.1f} s",
        ]
    if result.samples:
        first, last = result.samples[0], result.samples[-1]
        peak = max(s.rss_mb for s in result.samples)
        lines.append(
            f"worker RSS: {first.rss_mb:.1f} MB after warm-up -> {last.rss_mb:.1f} MB at the end "
            f"({result.rss_growth:+.1%}), peak {peak:.1f} MB"
        )
    if b is not None and a is not None:
        lines.append(
            f"idle before/after: fds {b.fds}/{a.fds}, worker TCP connections "
            f"{b.connections}/{a.connections}, demo open connections "
            f"{b.demo_open_connections}/{a.demo_open_connections}, demo in flight "
            f"{b.demo_in_flight}/{a.demo_in_flight}"
        )
    lines += [f"  [{'ok' if ok else 'FAIL'}] {name}" for name, ok in result.checks.items()]
    lines.append("PASSED" if result.passed else "FAILED")
    return lines


def write_json(result: SoakResult, path: Path) -> None:
    """The whole result as JSON."""
    path.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
