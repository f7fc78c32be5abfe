"""Run a bench: demo upstreams, every target's server, warm-up, then interleaved measured runs.

Repetitions are interleaved across targets (rep 1: A B C, rep 2: B C A, ...), so machine drift
hits every configuration alike. Each run is bounded by its duration (and request count); after
each, the server must answer /healthz promptly again (requests abandoned by the generator can
still be queued in a serial server) before the next one starts.

Targets that differ only by their path (`bench --app` on several paths) share one server: each
server configuration is started once, and each of its paths is measured and rotated as a target.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from aggregator.bench.demo_control import DRAIN_TIMEOUT, demo_call, settle
from aggregator.bench.load_tools import run_load
from aggregator.bench.loadgen import LoadResult
from aggregator.bench.machine import machine_info
from aggregator.bench.plan import Target, Workload
from aggregator.bench.results import BenchResult, Options, Run
from aggregator.bench.servers import PeakRss, ServerProcess, peer_env
from aggregator.bench.summary import payload_words
from aggregator.demo.process import DemoProcess, start_demo_process

Progress = Callable[[str], None]


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
            payload_kb=workload.payload_kb,
        ) as demo:
            config = work / "bench.toml"
            config.write_text(workload.config_toml(demo.url))
            yield demo, config, work


def _server(
    target: Target, options: Options, demo: DemoProcess, config: Path, work: Path
) -> ServerProcess:
    """A target's server on the run's upstreams (peers get their URLs from the environment)."""
    return ServerProcess(
        target,
        config,
        work,
        options.threads,
        peer_env(target, options.workload.upstreams(demo.url)),
        app=options.app,
        demo_url=demo.url,
    )


def run_bench(options: Options, progress: Progress) -> BenchResult:
    """Measure every target at every level, `reps` times, interleaved."""
    result = BenchResult(options, machine_info(options.tool, app=options.app is not None))
    workload = options.workload
    progress(
        f"demo upstreams: {workload.sources} sources, latency {workload.latency:g} s, "
        f"jitter {workload.jitter:g} s, failure rate {workload.failure_rate:g}, "
        f"{payload_words(workload.payload_kb)}"
    )
    with _upstreams(workload) as (demo, config, work):
        servers: dict[str, ServerProcess] = {}
        try:
            for target in options.targets:
                if target.server_name not in servers:
                    progress(f"starting {target.server_name}")
                    servers[target.server_name] = _server(target, options, demo, config, work)
            for server in servers.values():
                server.wait_ready()
            _warm_up(options, servers, demo, progress, result)
            for rep in range(1, options.reps + 1):
                shift = (rep - 1) % len(options.targets)
                order = options.targets[shift:] + options.targets[:shift]
                for target in order:
                    server = servers[target.server_name]
                    for level in options.levels:
                        run = _measure(options, server, target, demo, level, rep)
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
    for target in options.targets:
        server = servers[target.server_name]
        progress(f"warm-up {target.name}: {options.warmup:g} s at c={level}")
        run_load(
            options.tool,
            server.base_url + target.path,
            level,
            options.warmup,
            timeout=options.timeout,
        )
        if not settle(server, demo):
            result.notes.append(f"{target.name}: still busy {DRAIN_TIMEOUT:g} s after the warm-up")


def _measure(
    options: Options,
    server: ServerProcess,
    target: Target,
    demo: DemoProcess,
    level: int,
    rep: int,
) -> Run:
    demo_call(demo, "POST", "/_reset")
    cpu_before = server.cpu_seconds()
    with PeakRss(server) as rss:
        load: LoadResult = run_load(
            options.tool,
            server.base_url + target.path,
            level,
            options.duration,
            options.requests,
            options.timeout,
            count_partial=options.workload.failure_rate > 0,
        )
    cpu = server.cpu_seconds() - cpu_before
    calls = int(demo_call(demo, "GET", "/_stats")["total_requests"])
    drained = settle(server, demo)
    return Run(
        target=target.name,
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
    with _upstreams(workload) as (demo, config, work):
        server = _server(target, options, demo, config, work)
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
