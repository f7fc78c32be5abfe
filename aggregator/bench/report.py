"""Turn bench runs into figures: medians with min-max, honesty flags, tables, files and charts.

One row per target and concurrency: the median over repetitions (min-max for throughput), next
to the theoretical ideal (rps = C / L, latency floor = the slowest source), so a reader sees how
close each stack comes. Flags mark what makes a row untrustworthy: more than 1% errors, a load
generator that used more CPU than the server or was itself saturated, a server still busy after
the load stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

from aggregator.bench.plan import Target
from aggregator.bench.runner import BenchResult, Run

ERROR_RATE_LIMIT = 0.01
#: A p99 this close to the run's length means requests were still waiting when it ended.
CENSORED = 0.8
CHART_FILES = ("throughput.png", "p99.png")
OUTPUT_FILES = ("results.json", "results.csv", "report.md", *CHART_FILES)


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
    for ours in (t for t in targets if t.server == "loop" and t.view == "async" and not t.cached):
        for ref in (t for t in targets if t.server == "fastapi" and t.engine == ours.engine):
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
    cached = {t.name for t in targets if t.cached}
    for name in dict.fromkeys(r.target for r in rows):
        one = by.get((name, 1))
        if one and name not in cached and not math.isnan(one.p50_ms):
            lines.append(
                f"{name} p50 at c=1: {one.p50_ms:.1f} ms, {one.p50_ms - floor_ms:+.1f} ms "
                f"over the slowest source ({floor_ms:.0f} ms)"
            )
        low, high = by.get((name, 64)), by.get((name, 256))
        if low and high and low.rps > 0:
            lines.append(f"{name} c=256 vs c=64: {high.rps / low.rps:.0%} of the throughput")
    return lines


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


_HEADERS = (
    "target",
    "c",
    "req/s median (min-max)",
    "ideal",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "errors",
    "partial",
    "CPU ms/req",
    "peak RSS MB",
    "upstream calls/req",
    "flags",
)


def _cells(row: Row) -> list[str]:
    ideal = (
        f"{row.ideal_rps:.0f} ({row.of_ideal:.0%})"
        if row.ideal_rps and row.of_ideal is not None
        else "-"
    )
    return [
        row.target,
        str(row.concurrency),
        f"{row.rps:.1f} ({row.rps_min:.1f}-{row.rps_max:.1f})",
        ideal,
        _fmt(row.p50_ms),
        _fmt(row.p95_ms),
        _fmt(row.p99_ms),
        f"{row.errors} ({row.error_rate:.1%})" if row.errors else "0",
        f"{row.partial_rate:.1%}",
        _fmt(row.cpu_ms_per_request, 2),
        _fmt(row.peak_rss_mb, 0),
        _fmt(row.upstream_calls_per_request, 2),
        "; ".join(row.flags),
    ]


def print_table(result: BenchResult, rows: list[Row], console: Console) -> None:
    """The terminal view: one table, then the goal comparisons and the notes."""
    table = Table(title=workload_line(result), title_justify="left")
    for header in _HEADERS:
        table.add_column(header, justify="left" if header in ("target", "flags") else "right")
    for row in rows:
        style = "red" if row.flags else None
        table.add_row(*_cells(row), style=style)
    console.print(table)
    for line in goals(result, rows) + result.notes:
        console.print(f"  {line}", highlight=False)


def workload_line(result: BenchResult) -> str:
    """What was measured, in one line."""
    o = result.options
    w = o.workload
    amount = f"{o.duration:g} s" + (f" or {o.requests} requests" if o.requests else "")
    return (
        f"{w.sources} sources x {w.latency * 1000:.0f} ms (jitter {w.jitter * 1000:.0f} ms, "
        f"failure rate {w.failure_rate:g}); {o.reps} interleaved reps of {amount} per level; "
        f"load: {o.tool}"
    )


def write_outputs(result: BenchResult, rows: list[Row], out: Path, command: str) -> list[Path]:
    """Write results.json, results.csv, report.md and the PNG charts into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data["command"] = command
    data["summary"] = [_row_dict(r) for r in rows]
    data["goals"] = goals(result, rows)
    (out / "results.json").write_text(json.dumps(data, indent=2, allow_nan=False, default=str))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(_row_dict(rows[0]).keys()) if rows else ["target"])
        for row in rows:
            writer.writerow(_row_dict(row).values())
    charts = _charts(result, rows, out)
    (out / "report.md").write_text(_markdown(result, rows, command, charts))
    return [out / name for name in ("results.json", "results.csv", "report.md")] + charts


def _row_dict(row: Row) -> dict[str, object]:
    def clean(value: float | None) -> float | None:
        return None if value is None or math.isnan(value) else round(value, 3)

    return {
        "target": row.target,
        "concurrency": row.concurrency,
        "reps": row.reps,
        "rps_median": clean(row.rps),
        "rps_min": clean(row.rps_min),
        "rps_max": clean(row.rps_max),
        "ideal_rps": clean(row.ideal_rps),
        "p50_ms": clean(row.p50_ms),
        "p95_ms": clean(row.p95_ms),
        "p99_ms": clean(row.p99_ms),
        "errors": row.errors,
        "error_rate": clean(row.error_rate),
        "partial_rate": clean(row.partial_rate),
        "cpu_ms_per_request": clean(row.cpu_ms_per_request),
        "peak_rss_mb": clean(row.peak_rss_mb),
        "upstream_calls_per_request": clean(row.upstream_calls_per_request),
        "flags": "; ".join(row.flags),
    }


def _markdown(result: BenchResult, rows: list[Row], command: str, charts: list[Path]) -> str:
    m = result.machine
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    w = result.options.workload
    lines = [
        "# aggregator bench report",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m['cores']} cores, {m['cpu']}, {m['os']}, Python {m['python']}.",
        f"Versions: {versions}.",
        "Settings from the environment (every server): "
        + (", ".join(f"{k}={v}" for k, v in m.get("settings", {}).items()) or "none")
        + ".",
        "",
        f"Workload: {workload_line(result)}.",
        f"Theoretical ideal: throughput = C / L with L = {w.floor_s * 1000:.0f} ms "
        "(the slowest source; one after another: C / (K x latency)); latency floor "
        f"= {w.floor_s * 1000:.0f} ms. Cache hits have no upstream bound.",
        "Errors are non-2xx answers, timeouts and socket errors; partial is the share of 2xx "
        "answers with a failed source (`X-Aggregate-Complete: false`), as designed. CPU and "
        "peak RSS are the server's whole process tree; upstream calls are counted by the demo.",
        "",
        "| " + " | ".join(_HEADERS) + " |",
        "|" + "---|" * len(_HEADERS),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    findings = goals(result, rows)
    if findings:
        lines += ["", "## Comparisons", ""] + [f"- {g}" for g in findings]
    flagged = [r for r in rows if r.flags]
    lines += ["", "## Honesty checks", ""]
    if flagged:
        lines += [f"- {r.target} c={r.concurrency}: {'; '.join(r.flags)}" for r in flagged]
    else:
        lines.append(
            "- No row has more than 1% errors, a saturated generator, a generator using more "
            "CPU than the server, a server backlog after its run, or latencies censored by the "
            "run length."
        )
    lines += [f"- {note}" for note in result.notes]
    if charts:
        lines += ["", "## Charts", ""] + [f"![{c.stem}]({c.name})" for c in charts]
    return "\n".join(lines) + "\n"


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_DASHES = ("-", "--", "-.")


class LineStyle(NamedTuple):
    """How one target's line looks in the charts."""

    color: str
    marker: str
    linestyle: str


def line_styles(count: int) -> list[LineStyle]:
    """A distinct colour for each of up to 20 lines, then marker and dash tell them apart.

    matplotlib's default cycle has 10 colours: with more targets, two lines shared a colour
    and marker and a reader could not tell which was which.
    """
    import matplotlib

    palette = matplotlib.colormaps["tab20"]  # a listed map: an int picks its i-th colour
    return [
        LineStyle(
            matplotlib.colors.to_hex(palette(i % 20)),
            _MARKERS[i % len(_MARKERS)],
            _DASHES[(i // 20) % len(_DASHES)],
        )
        for i in range(count)
    ]


def _charts(result: BenchResult, rows: list[Row], out: Path) -> list[Path]:
    """Throughput and p99 against concurrency, one line per target (log-scaled concurrency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for filename, attr, label in (
        ("throughput.png", "rps", "aggregated requests/s (median; bars: min-max)"),
        ("p99.png", "p99_ms", "p99 latency, ms (median)"),
    ):
        fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
        names = list(dict.fromkeys(r.target for r in rows))
        for name, style in zip(names, line_styles(len(names)), strict=True):
            mine = [r for r in rows if r.target == name]
            xs = [r.concurrency for r in mine]
            ys = [getattr(r, attr) for r in mine]
            if attr == "rps":
                below = [r.rps - r.rps_min for r in mine]
                above = [r.rps_max - r.rps for r in mine]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[below, above],
                    capsize=3,
                    label=name,
                    color=style.color,
                    marker=style.marker,
                    linestyle=style.linestyle,
                )
            else:
                ax.plot(
                    xs,
                    ys,
                    label=name,
                    color=style.color,
                    marker=style.marker,
                    linestyle=style.linestyle,
                )
        levels = list(result.options.levels)
        if attr == "rps":
            fan_out = Target("loop", "async", "aiohttp")
            ideal = [result.options.workload.ideal_rps(c, fan_out) or math.nan for c in levels]
            ax.plot(levels, ideal, linestyle=":", color="grey", label="ideal C/L")
        else:
            ax.axhline(
                result.options.workload.floor_s * 1000,
                linestyle=":",
                color="grey",
                label="slowest source",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_title(workload_line(result), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        # Outside the axes: inside, it hid lines wherever "best" could not find room.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
