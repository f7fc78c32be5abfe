"""The figures of a bench: each target and level summarized, flagged, and compared.

One row per target and concurrency: the median over repetitions (min-max for throughput), next
to the theoretical ideal (rps = C / L, latency floor = the slowest source), so a reader sees how
close each stack comes. Flags mark what makes a row untrustworthy: more than 1% errors, a load
generator that used more CPU than the server or was itself saturated, a server still busy after
the load stopped. Rendering them is `report`'s (tables, files) and `charts`'.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from aggregator.bench.plan import Target
from aggregator.bench.results import BenchResult, Run

ERROR_RATE_LIMIT = 0.01
#: A p99 this close to the run's length means requests were still waiting when it ended.
CENSORED = 0.8


@dataclass(slots=True)
class Row:
    """One target at one concurrency, summarized over its repetitions."""

    target: str
    concurrency: int
    reps: int
    rps: float
    rps_min: float
    rps_max: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    error_rate: float
    partial_rate: float
    cpu_ms_per_request: float
    peak_rss_mb: float
    upstream_calls_per_request: float
    ideal_rps: float | None
    flags: list[str] = field(default_factory=list)

    @property
    def of_ideal(self) -> float | None:
        """Throughput as a fraction of the ideal, when there is one."""
        return self.rps / self.ideal_rps if self.ideal_rps else None


def summarize(result: BenchResult) -> list[Row]:
    """Rows in target order, then concurrency order."""
    targets = {t.name: t for t in result.options.targets}
    rows: list[Row] = []
    for name, target in targets.items():
        for level in result.options.levels:
            runs = [r for r in result.runs if r.target == name and r.concurrency == level]
            if runs:
                ideal = result.options.workload.ideal_rps(level, target)
                rows.append(_row(name, level, runs, ideal, result.options.duration))
    return rows


def _median(values: Sequence[float]) -> float:
    usable = [v for v in values if not math.isnan(v)]
    return statistics.median(usable) if usable else math.nan


def _row(name: str, level: int, runs: list[Run], ideal: float | None, duration_s: float) -> Row:
    rps = [r.rps for r in runs]
    errors = sum(r.errors for r in runs)
    attempts = sum(r.requests + r.incomplete for r in runs)
    flags: list[str] = []
    error_rate = errors / attempts if attempts else 1.0
    if error_rate > ERROR_RATE_LIMIT:
        flags.append(f"errors {error_rate:.1%}")
    if any(r.generator_cpu_s > r.server_cpu_s for r in runs):
        flags.append("generator CPU > server CPU")
    if any(r.generator_saturated for r in runs):
        flags.append("generator saturated")
    if not all(r.drained for r in runs):
        flags.append("server backlog after run")
    if any(r.p99_ms >= CENSORED * duration_s * 1000 for r in runs):
        # Requests still waiting when the run ended are neither answers nor errors: the
        # percentiles only cover the ones that finished in time, so they understate.
        flags.append("latency censored by run length")
    return Row(
        target=name,
        concurrency=level,
        reps=len(runs),
        rps=statistics.median(rps),
        rps_min=min(rps),
        rps_max=max(rps),
        p50_ms=_median([r.p50_ms for r in runs]),
        p95_ms=_median([r.p95_ms for r in runs]),
        p99_ms=_median([r.p99_ms for r in runs]),
        errors=errors,
        error_rate=error_rate,
        partial_rate=sum(r.partial for r in runs) / max(1, sum(r.requests for r in runs)),
        cpu_ms_per_request=_median([r.cpu_ms_per_request for r in runs]),
        peak_rss_mb=max(r.peak_rss_mb for r in runs),
        upstream_calls_per_request=_median([r.upstream_calls_per_request for r in runs]),
        ideal_rps=ideal,
        flags=flags,
    )


def goals(result: BenchResult, rows: list[Row]) -> list[str]:
    """The comparisons users come for, where the run has the data for them."""
    by = {(r.target, r.concurrency): r for r in rows}
    lines: list[str] = []
    floor_ms = result.options.workload.floor_s * 1000
    targets = result.options.targets
    for ours in (t for t in targets if t.server == "loop" and t.view == "async"):
        for ref in (t for t in targets if _peer_of(ours, t)):
            for level in result.options.levels:
                a, b = by.get((ours.name, level)), by.get((ref.name, level))
                if a and b and b.rps > 0:
                    lines.append(
                        f"{ours.name} vs {ref.name} at c={level}: {a.rps / b.rps:.2f}x "
                        f"({a.rps:.1f} vs {b.rps:.1f} req/s; CPU {a.cpu_ms_per_request:.2f} vs "
                        f"{b.cpu_ms_per_request:.2f} ms/request)"
                    )
    for metered in (t for t in targets if t.metrics):
        plain = dataclasses.replace(metered, metrics=False)
        for level in result.options.levels:
            a, b = by.get((metered.name, level)), by.get((plain.name, level))
            if a and b and b.rps > 0:
                lines.append(
                    f"metrics on {plain.name} at c={level}: {a.rps:.1f} vs {b.rps:.1f} req/s "
                    f"without ({a.rps / b.rps - 1:+.1%}); CPU {a.cpu_ms_per_request:.3f} vs "
                    f"{b.cpu_ms_per_request:.3f} ms/request"
                )
    lines += _app_goals(result, by)
    # No source floor for cache hits, nor for a developer's own views (what they wait is theirs).
    unbound = {t.name for t in targets if t.cached or t.view == "app"}
    for name in dict.fromkeys(r.target for r in rows):
        one = by.get((name, 1))
        if one and name not in unbound and not math.isnan(one.p50_ms):
            lines.append(
                f"{name} p50 at c=1: {one.p50_ms:.1f} ms, {one.p50_ms - floor_ms:+.1f} ms "
                f"over the slowest source ({floor_ms:.0f} ms)"
            )
        low, high = by.get((name, 64)), by.get((name, 256))
        if low and high and low.rps > 0:
            lines.append(f"{name} c=256 vs c=64: {high.rps / low.rps:.0%} of the throughput")
    return lines


def _peer_of(ours: Target, ref: Target) -> bool:
    """Whether `ref` is a FastAPI target to compare `ours` with: our engine inside FastAPI on the
    same engine, every plain peer (uncached against uncached, cached against cached)."""
    if ours.cached:
        return ref.server == "fastapi-plain" and ref.cached
    if ref.server == "fastapi":
        return ref.engine == ours.engine
    return ref.server == "fastapi-plain" and not ref.cached


def _app_goals(result: BenchResult, by: dict[tuple[str, int], Row]) -> list[str]:
    """`bench --app`: per path and level, each server's throughput side by side."""
    lines: list[str] = []
    targets = [t for t in result.options.targets if t.app_path is not None]
    for path in dict.fromkeys(t.app_path for t in targets):
        mine = [t for t in targets if t.app_path == path]
        for level in result.options.levels:
            found = [(t.server_name, by[(t.name, level)]) for t in mine if (t.name, level) in by]
            if len(found) > 1:
                lines.append(
                    f"{path} at c={level}: "
                    + ", ".join(f"{name} {row.rps:.1f} req/s" for name, row in found)
                )
    return lines


def workload_line(result: BenchResult) -> str:
    """What was measured, in one line."""
    o = result.options
    w = o.workload
    amount = f"{o.duration:g} s" + (f" or {o.requests} requests" if o.requests else "")
    if o.app is not None:
        return (
            f"{o.app} (demo upstreams at AGGREGATOR_DEMO_URL: {w.latency * 1000:.0f} ms, "
            f"jitter {w.jitter * 1000:.0f} ms, failure rate {w.failure_rate:g}); {o.reps} "
            f"interleaved reps of {amount} per level; load: {o.tool}"
        )
    return (
        f"{w.sources} sources x {w.latency * 1000:.0f} ms (jitter {w.jitter * 1000:.0f} ms, "
        f"failure rate {w.failure_rate:g}, {payload_words(w.payload_kb)}); {o.reps} interleaved "
        f"reps of {amount} per level; load: {o.tool}"
    )


def payload_words(kb: float) -> str:
    """The demo payload size in words."""
    return f"~{kb:g} KB of JSON per source" if kb > 0 else "the demo's small payloads"
