"""A bench's summary rendered: the terminal table, results.json, results.csv and report.md.

The figures come from `summary`, the PNG charts from `charts`; this module only lays them out,
the same columns in the terminal and in the Markdown report.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from aggregator.bench.charts import CHART_FILES, line_styles, write_charts
from aggregator.bench.results import BenchResult
from aggregator.bench.summary import Row, goals, summarize, workload_line

OUTPUT_FILES = ("results.json", "results.csv", "report.md", *CHART_FILES)


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
    "runs as",
)


def _cells(row: Row, runs_as: dict[str, str]) -> list[str]:
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
        runs_as.get(row.target, ""),
    ]


def print_table(result: BenchResult, rows: list[Row], console: Console) -> None:
    """The terminal view: one table, then the goal comparisons and the notes."""
    table = Table(title=workload_line(result), title_justify="left")
    for header in _HEADERS:
        left = header in ("target", "flags", "runs as")
        table.add_column(header, justify="left" if left else "right")
    labels = runs_as(result)
    for row in rows:
        style = "red" if row.flags else None
        table.add_row(*_cells(row, labels), style=style)
    console.print(table)
    for line in goals(result, rows) + result.notes:
        console.print(f"  {line}", highlight=False)


#: Said in the output and in report.md when the charts cannot be drawn.
NO_CHARTS = (
    "charts skipped: matplotlib is not installed (pip install 'aggregator[bench]'); "
    "report.md, results.json and results.csv are complete without them"
)


def write_outputs(
    result: BenchResult, rows: list[Row], out: Path, command: str
) -> tuple[list[Path], str | None]:
    """Write results.json, results.csv, report.md and the PNG charts into `out`: the files
    written, and a note when the charts were skipped (matplotlib, the bench extra, missing)."""
    out.mkdir(parents=True, exist_ok=True)
    data = result.to_dict()
    data["command"] = command
    labels = runs_as(result)
    data["summary"] = [{**_row_dict(r), "runs_as": labels.get(r.target, "")} for r in rows]
    data["runs_as"] = labels
    data["goals"] = goals(result, rows)
    (out / "results.json").write_text(json.dumps(data, indent=2, allow_nan=False, default=str))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(_row_dict(rows[0]).keys()) if rows else ["target"])
        for row in rows:
            writer.writerow(_row_dict(row).values())
    skipped: str | None = None
    try:
        charts = write_charts(result, rows, out)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise
        charts, skipped = [], NO_CHARTS
    (out / "report.md").write_text(_markdown(result, rows, command, charts, skipped))
    return [out / name for name in ("results.json", "results.csv", "report.md")] + charts, skipped


def runs_as(result: BenchResult) -> dict[str, str]:
    """Each target's "runs as" label: "as shipped", or its flags in words (plan.Target)."""
    return {t.name: t.runs_as for t in result.options.targets}


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


def _ideal_line(result: BenchResult) -> str:
    if result.options.app is not None:
        return (
            "Theoretical ideal: none; the bench does not know what your views wait for. Each "
            "path is a series of its own (`SERVER:app PATH`), measured on one server per target."
        )
    floor_ms = result.options.workload.floor_s * 1000
    return (
        f"Theoretical ideal: throughput = C / L with L = {floor_ms:.0f} ms "
        "(the slowest source; one after another: C / (K x latency)); latency floor "
        f"= {floor_ms:.0f} ms. Cache hits have no upstream bound."
    )


def _markdown(
    result: BenchResult, rows: list[Row], command: str, charts: list[Path], skipped: str | None
) -> str:
    m = result.machine
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
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
        _ideal_line(result),
        "Runs as: this project's targets run with the shipped settings (INFO logging with its "
        "access line, metrics as shipped) unless a flag says otherwise (`+quiet`, `+metrics`, "
        "`+nometrics`, `+pygc`, ...); `fastapi` is FastAPI + uvicorn running our fan-out engine, "
        "`fastapi-plain` the FastAPI peer as its users write it (no code of ours).",
        "Errors are non-2xx answers, timeouts and socket errors; partial is the share of 2xx "
        "answers with a failed source (`X-Aggregate-Complete: false`), as designed. CPU and "
        "peak RSS are the server's whole process tree; upstream calls are counted by the demo.",
        "",
        "| " + " | ".join(_HEADERS) + " |",
        "|" + "---|" * len(_HEADERS),
    ]
    labels = runs_as(result)
    lines += ["| " + " | ".join(_cells(r, labels)) + " |" for r in rows]
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
    elif skipped is not None:
        lines += ["", "## Charts", "", f"{skipped[0].upper()}{skipped[1:]}."]
    return "\n".join(lines) + "\n"


__all__ = [
    "NO_CHARTS",
    "OUTPUT_FILES",
    "Row",
    "goals",
    "line_styles",
    "print_table",
    "summarize",
    "workload_line",
    "write_outputs",
]
