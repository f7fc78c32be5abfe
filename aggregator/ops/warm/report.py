"""What a warm run did (per target and in total) and how it is shown: progress, table, JSON.

On a terminal, a rich progress bar with an ETA (failures printed above it) and a rich table; on
anything else (cron, a pipe, a CI log), one plain line per target as it finishes and an aligned
text table, so the output greps and diffs well.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from aggregator.ops.warm.targets import Target

Outcome = Literal["warmed", "partial", "failed", "skipped", "not_run"]
OUTCOMES: tuple[Outcome, ...] = ("warmed", "partial", "failed", "skipped", "not_run")

_STYLES = {"warmed": "green", "skipped": "cyan", "partial": "yellow", "failed": "red"}
_COLUMNS = ("target", "outcome", "ms", "sources failed")


@dataclass(slots=True)
class TargetReport:
    """What happened to one target (`not_run` until it finishes)."""

    target: Target
    outcome: Outcome = "not_run"
    ms: float = 0.0
    status: int | None = None
    sources_failed: tuple[str, ...] = ()
    detail: str = ""
    attempts: int = 0
    refused: bool = False  # the server refused it (400/404): retrying cannot help

    def as_json(self) -> dict[str, Any]:
        """The report's entry for this target."""
        return {
            "aggregate": self.target.aggregate,
            "params": dict(self.target.params),
            "outcome": self.outcome,
            "ms": round(self.ms, 1),
            "status": self.status,
            "sources_failed": list(self.sources_failed),
            "detail": self.detail,
            "attempts": self.attempts,
        }


@dataclass(slots=True)
class RunReport:
    """The whole run, for the summary, the JSON report and the exit code."""

    targets: list[TargetReport]
    elapsed_s: float = 0.0
    interrupted_by: int | None = None  # the signal that stopped the run
    dry_run: bool = False

    @property
    def interrupted(self) -> bool:
        """Whether a signal stopped the run before every target finished."""
        return self.interrupted_by is not None

    def totals(self) -> dict[str, int]:
        """How many targets there were, and how many ended with each outcome."""
        counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        for report in self.targets:
            counts[report.outcome] += 1
        return {"targets": len(self.targets), **counts}

    def exit_code(self) -> int:
        """0 all warmed or skipped, 1 some failed or partial, 128 + signal when interrupted."""
        if self.interrupted_by is not None:
            return 128 + self.interrupted_by
        if any(r.outcome in ("failed", "partial") for r in self.targets):
            return 1
        return 0

    def as_json(self) -> dict[str, Any]:
        """The machine-readable report (`--json`)."""
        return {
            "targets": [r.as_json() for r in self.targets],
            "totals": self.totals(),
            "interrupted": self.interrupted,
            "elapsed_s": round(self.elapsed_s, 3),
            "dry_run": self.dry_run,
        }


class Reporter(Protocol):
    """Receives the run's events, in order: start, done (per target), finish."""

    def start(self, total: int, header: str) -> None: ...

    def done(self, report: TargetReport) -> None: ...

    def finish(self, run: RunReport) -> None: ...

    def abandon(self) -> None:
        """The run ended in an error: release the terminal, show nothing more."""


def choose_reporter(stream: TextIO) -> Reporter:
    """A progress bar on a terminal, plain lines otherwise."""
    console = Console(file=stream, highlight=False)
    return RichReporter(console) if console.is_terminal else PlainReporter(stream)


def plural(count: int, noun: str) -> str:
    """`1 target`, `2 targets`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def outcome_text(report: TargetReport) -> str:
    """The outcome as people read it (`not run`)."""
    return report.outcome.replace("_", " ")


def line(report: TargetReport) -> str:
    """`warmed dashboard city=Paris&user_id=7 312 ms`, plus notes when something went wrong."""
    notes = []
    if report.attempts > 1:
        notes.append(f"{report.attempts} attempts")
    if report.sources_failed:
        notes.append(f"sources failed: {', '.join(report.sources_failed)}")
    if report.detail and report.outcome != "warmed":
        notes.append(report.detail)
    text = f"{outcome_text(report)} {report.target.label} {report.ms:.0f} ms"
    return f"{text} ({'; '.join(notes)})" if notes else text


def totals_line(run: RunReport) -> str:
    """`4 targets in 2.3 s: 2 warmed, 1 partial, 1 failed`, and what interrupted the run."""
    totals = run.totals()
    counts = ", ".join(
        f"{totals[o]} {o.replace('_', ' ')}"
        for o in ("warmed", "partial", "failed", "skipped", "not_run")
        if totals[o] or o in ("warmed", "failed")
    )
    text = f"{plural(totals['targets'], 'target')} in {run.elapsed_s:.1f} s: {counts}"
    if run.interrupted_by is not None:
        text += f" (interrupted by {signal.Signals(run.interrupted_by).name})"
    return text


def _rows(run: RunReport) -> list[tuple[str, str, str, str]]:
    return [
        (
            r.target.label,
            outcome_text(r),
            f"{r.ms:.0f}" if r.attempts else "-",
            ", ".join(r.sources_failed),
        )
        for r in run.targets
    ]


def plain_table(run: RunReport) -> list[str]:
    """The summary as aligned text lines (ms right-aligned)."""
    rows = [_COLUMNS, *_rows(run)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for target, outcome, ms, failed in rows:
        cells = [target.ljust(widths[0]), outcome.ljust(widths[1]), ms.rjust(widths[2]), failed]
        lines.append("  ".join(cells).rstrip())
    return lines


class PlainReporter:
    """One line per finished target, then the table and totals; flushed for pipes and logs."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, total: int, header: str) -> None:
        self._print(header)

    def done(self, report: TargetReport) -> None:
        self._print(line(report))

    def abandon(self) -> None:
        pass

    def finish(self, run: RunReport) -> None:
        self._print("")
        for text in plain_table(run):
            self._print(text)
        self._print(totals_line(run))


class RichReporter:
    """A progress bar with ETA; failed and partial targets are printed above it as they end."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("warming", total=0, failed=0)
        self.failed = 0

    def start(self, total: int, header: str) -> None:
        self.console.print(header, markup=False, highlight=False)
        self.progress.update(self.task, total=total)
        self.progress.start()

    def done(self, report: TargetReport) -> None:
        if report.outcome in ("failed", "partial"):
            if report.outcome == "failed":
                self.failed += 1
            style = _STYLES[report.outcome]
            self.progress.console.print(Text(line(report), style=style))
        self.progress.update(self.task, advance=1, failed=self.failed)

    def abandon(self) -> None:
        self.progress.stop()

    def finish(self, run: RunReport) -> None:
        self.progress.stop()
        table = Table(*_COLUMNS, title="warm summary", title_justify="left")
        table.columns[2].justify = "right"
        for target, outcome, ms, failed in _rows(run):
            key = outcome.replace(" ", "_")
            table.add_row(Text(target), Text(outcome, style=_STYLES.get(key, "dim")), ms, failed)
        self.console.print(table)
        self.console.print(totals_line(run), markup=False, highlight=False)


def check_json_path(path: str | None) -> None:
    """ValueError, before the run, when the report could not be written where asked."""
    if path is None or path == "-":
        return
    if not Path(path).parent.is_dir():
        raise ValueError(f"--json {path}: folder {Path(path).parent} does not exist")


def write_json(run: RunReport, path: str | None) -> None:
    """Write the report to `path` ("-": stdout)."""
    if path is None:
        return
    text = json.dumps(run.as_json(), indent=2) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(path).write_text(text, encoding="utf-8")
