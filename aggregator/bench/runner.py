"""Run a bench: demo upstreams, every target's server, warm-up, then interleaved measured runs.

Repetitions are interleaved across targets (rep 1: A B C, rep 2: B C A, ...), so machine drift
hits every configuration alike. Each run is bounded by its duration (and request count); after
each, the server must answer /healthz promptly again (requests abandoned by the generator can
still be queued in a serial server) before the next one starts.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aggregator.bench.load import Tool, run_load
from aggregator.bench.loadgen import LoadResult
from aggregator.bench.plan import Target, Workload
from aggregator.bench.servers import PeakRss, ServerProcess, passed_settings
from aggregator.demo.process import DemoProcess, start_demo_process

Progress = Callable[[str], None]
DRAIN_TIMEOUT = 60.0
_VERSIONS = (
    "flask",
    "hypercorn",
    "asgiref",
    "httpx",
    "httpx-aiohttp",
    "aiohttp",
    "pydantic",
    "fastapi",
    "uvicorn",
    "uvloop",
    "gunicorn",
)


@dataclass(frozen=True, slots=True)
class Options:
    """How to load each target."""

    targets: tuple[Target, ...]
    workload: Workload
    levels: tuple[int, ...] = (1, 16, 64, 256)
    duration: float = 5.0
    requests: int | None = None
    reps: int = 3
    warmup: float = 2.0
    tool: Tool = "wrk"
    threads: int = 64
    timeout: float = 10.0


@dataclass(slots=True)
class Run:
    """One measured load run of one target at one concurrency."""

    target: str
    concurrency: int
    rep: int
    tool: str
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int
    errors: int
    incomplete: int
    partial: int
    server_cpu_s: float
    generator_cpu_s: float
    generator_saturated: bool
    peak_rss_mb: float
    upstream_calls: int
    drained: bool

    @property
    def error_rate(self) -> float:
        """Errors over attempts: answers plus requests that never got one (timeouts, resets)."""
        attempts = self.requests + self.incomplete
        return self.errors / attempts if attempts else 1.0

    @property
    def cpu_ms_per_request(self) -> float:
        """Server CPU per completed request."""
        return self.server_cpu_s * 1000 / self.requests if self.requests else float("nan")

    @property
    def upstream_calls_per_request(self) -> float:
        """Upstream calls per request started (0 for cache hits).

        A closed-loop generator stops with one request in flight on each of its C connections;
        their calls were made too, so they count as started.
        """
        started = self.requests + self.incomplete + self.concurrency
        return self.upstream_calls / started


@dataclass(slots=True)
class BenchResult:
    """Everything a report needs: the setting, the runs, and what was skipped or noticed."""

    options: Options
    machine: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (targets by name)."""
        options = asdict(self.options)
        options["targets"] = [t.name for t in self.options.targets]
        runs = []
        for run in self.runs:
            row = asdict(run)
            row["error_rate"] = run.error_rate
            row["cpu_ms_per_request"] = run.cpu_ms_per_request
            row["upstream_calls_per_request"] = run.upstream_calls_per_request
            runs.append(row)
        return {"machine": self.machine, "options": options, "runs": runs, "notes": self.notes}


def machine_info(tool: Tool) -> dict[str, Any]:
    """Cores, CPU model, OS, Python and the versions of every part in the comparison."""
    versions: dict[str, str] = {}
    for name in _VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if shutil.which("wrk"):
        probe = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        versions["wrk"] = (probe.stdout or probe.stderr).split(" [")[0].removeprefix("wrk ")
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": model or platform.processor(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_generator": tool,
        "versions": versions,
        "settings": passed_settings(),
    }


@contextlib.contextmanager
def _upstreams(workload: Workload) -> Iterator[tuple[DemoProcess, Path, Path]]:
    """The demo upstreams of `workload`, the config aggregating them and a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="aggregator-bench-") as tmp:
        work = Path(tmp)
        with start_demo_process(
            latency=workload.latency,
            jitter=workload.jitter,
            failure_rate=workload.failure_rate,
            stall_rate=workload.stall_rate,
        ) as demo:
            config = work / "bench.toml"
            config.write_text(workload.config_toml(demo.url))
            yield demo, config, work


def run_bench(options: Options, progress: Progress) -> BenchResult:
    """Measure every target at every level, `reps` times, interleaved."""
    result = BenchResult(options, machine_info(options.tool))
    workload = options.workload
    progress(
        f"demo upstreams: {workload.sources} sources, latency {workload.latency:g} s, "
        f"jitter {workload.jitter:g} s, failure rate {workload.failure_rate:g}"
    )
    with _upstreams(workload) as (demo, config, work):
        servers: dict[str, ServerProcess] = {}
        try:
            for target in options.targets:
                progress(f"starting {target.name}")
                servers[target.name] = ServerProcess(target, config, work, options.threads)
            for server in servers.values():
                server.wait_ready()
            _warm_up(options, servers, demo, progress, result)
            for rep in range(1, options.reps + 1):
                shift = (rep - 1) % len(options.targets)
                order = options.targets[shift:] + options.targets[:shift]
                for target in order:
                    for level in options.levels:
                        run = _measure(options, servers[target.name], demo, level, rep)
                        result.runs.append(run)
                        progress(_describe(run, options.reps))
                        if not run.drained:
                            result.notes.append(
                                f"{target.name} c={level} rep {rep}: still busy "
                                f"{DRAIN_TIMEOUT:g} s after the load stopped"
                            )
        finally:
            for server in servers.values():
                server.stop()
    return result


def _warm_up(
    options: Options,
    servers: dict[str, ServerProcess],
    demo: DemoProcess,
    progress: Progress,
    result: BenchResult,
) -> None:
    """Open connection pools, import lazily loaded code and fill the cached targets' entries."""
    if options.warmup <= 0:
        return
    level = min(max(options.levels), 16)
    for name, server in servers.items():
        progress(f"warm-up {name}: {options.warmup:g} s at c={level}")
        run_load(
            options.tool,
            server.base_url + server.target.path,
            level,
            options.warmup,
            timeout=options.timeout,
        )
        if not _settle(server, demo):
            result.notes.append(f"{name}: still busy {DRAIN_TIMEOUT:g} s after the warm-up")


def _measure(
    options: Options, server: ServerProcess, demo: DemoProcess, level: int, rep: int
) -> Run:
    _demo_call(demo, "POST", "/_reset")
    cpu_before = server.cpu_seconds()
    with PeakRss(server) as rss:
        load: LoadResult = run_load(
            options.tool,
            server.base_url + server.target.path,
            level,
            options.duration,
            options.requests,
            options.timeout,
            count_partial=options.workload.failure_rate > 0,
        )
    cpu = server.cpu_seconds() - cpu_before
    calls = int(_demo_call(demo, "GET", "/_stats")["total_requests"])
    drained = _settle(server, demo)
    return Run(
        target=server.target.name,
        concurrency=level,
        rep=rep,
        tool=load.tool,
        rps=load.rps,
        p50_ms=load.p50_ms,
        p95_ms=load.p95_ms,
        p99_ms=load.p99_ms,
        requests=load.requests,
        errors=load.errors,
        incomplete=load.socket_errors + load.timeouts,
        partial=load.partial,
        server_cpu_s=cpu,
        generator_cpu_s=load.generator_cpu_s,
        generator_saturated=load.saturated,
        peak_rss_mb=rss.peak / 2**20,
        upstream_calls=calls,
        drained=drained,
    )


def _settle(server: ServerProcess, demo: DemoProcess) -> bool:
    """Wait until the server answers promptly and no upstream call is in flight.

    Requests the generator abandoned may still be queued (serial mode) or running in threads
    (the sync twins); their upstream calls would load the shared demo during the next run.
    """
    deadline = time.monotonic() + DRAIN_TIMEOUT
    quiet = 0
    while time.monotonic() < deadline:
        if _demo_call(demo, "GET", "/_stats")["in_flight"] == 0:
            quiet += 1
            if quiet >= 3:
                return server.drain(max(0.1, deadline - time.monotonic()))
        else:
            quiet = 0
        time.sleep(0.1)
    return False


def _demo_call(demo: DemoProcess, method: str, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(demo.host, demo.port, timeout=10)
    try:
        conn.request(method, path)
        body = conn.getresponse().read()
    finally:
        conn.close()
    parsed: dict[str, Any] = json.loads(body) if body else {}
    return parsed


def _describe(run: Run, reps: int) -> str:
    errors = f", {run.errors} errors" if run.errors else ""
    return (
        f"rep {run.rep}/{reps} {run.target} c={run.concurrency}: {run.rps:.1f} req/s, "
        f"p50 {run.p50_ms:.0f} ms, p99 {run.p99_ms:.0f} ms{errors}"
    )


def compare_generators(
    target: Target, options: Options, levels: tuple[int, ...], progress: Progress
) -> list[tuple[int, LoadResult, LoadResult]]:
    """`bench --check`: wrk and the built-in generator on the same server, interleaved."""
    pairs: list[tuple[int, LoadResult, LoadResult]] = []
    workload = options.workload
    with _upstreams(workload) as (_, config, work):
        server = ServerProcess(target, config, work, options.threads)
        try:
            server.wait_ready()
            url = server.base_url + target.path
            run_load("wrk", url, min(16, max(levels)), options.warmup or 1.0)
            server.drain(DRAIN_TIMEOUT)
            for level in levels:
                runs: dict[str, LoadResult] = {}
                for tool in ("wrk", "builtin") if level % 2 else ("builtin", "wrk"):
                    runs[tool] = run_load(
                        tool, url, level, options.duration, options.requests, options.timeout
                    )
                    server.drain(DRAIN_TIMEOUT)
                progress(
                    f"c={level}: wrk {runs['wrk'].rps:.1f} req/s, "
                    f"built-in {runs['builtin'].rps:.1f} req/s"
                )
                pairs.append((level, runs["wrk"], runs["builtin"]))
        finally:
            server.stop()
    return pairs


__all__ = ["BenchResult", "Options", "Run", "compare_generators", "run_bench"]
