"""What a bench records: how it loaded each target, each measured run, and the whole result.

Plain data, apart from the runner that fills it and the report that reads it, so a report can
be rebuilt from `results.json` figures without running anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from aggregator.bench.load_tools import Tool
from aggregator.bench.plan import Target, Workload


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
    #: A developer's app (`--app MODULE:NAME`) benched instead of ours; its targets carry paths.
    app: str | None = None


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
            cpu = run.cpu_ms_per_request  # NaN when no request completed: JSON has no NaN
            row["cpu_ms_per_request"] = None if math.isnan(cpu) else cpu
            row["upstream_calls_per_request"] = run.upstream_calls_per_request
            runs.append(row)
        return {"machine": self.machine, "options": options, "runs": runs, "notes": self.notes}
