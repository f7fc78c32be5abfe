"""`aggregator status`: rich tables of a deployment's metrics Snapshot, once or watching.

On a terminal each view replaces the previous one; piped, views follow each other at a fixed
width (nothing wraps in a log file). Exit codes for scripts: 0 shown, 1 no metrics (the
message says why, in one line), 2 bad usage (click's).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import click
from rich.console import Console, Group, JustifyMethod
from rich.table import Table
from rich.text import Text

from aggregator.errors import StatusError
from aggregator.ops.status.client import CIRCUIT_NAMES, Snapshot, fetch, metrics_url, parse

_CIRCUIT_STYLES = {"closed": "green", "half-open": "yellow", "open": "bold red"}
_PIPED_WIDTH = 160


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """What `aggregator status` was asked for."""

    url: str
    token: str | None
    watch: float | None = None  # seconds between views; None: one view
    count: int | None = None  # views when watching; None: until interrupted
    timeout: float = 10.0


def run(
    request: StatusRequest,
    *,
    console: Console | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show the view (or views); the exit code."""
    console = console or _console()
    previous: Snapshot | None = None
    shown = 0
    try:
        while True:
            current = parse(fetch(request.url, request.token, timeout=request.timeout))
            window = current.since(previous) if previous is not None else None
            seconds = current.taken - previous.taken if window and previous else None
            if shown and console.is_terminal:
                console.clear()
            console.print(render(window or current, request.url, seconds))
            shown += 1
            previous = current
            if request.watch is None or (request.count is not None and shown >= request.count):
                return 0
            sleep(request.watch)
    except StatusError as exc:
        print(f"aggregator status: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0  # quitting a watch is how it ends


def _console() -> Console:
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=_PIPED_WIDTH)


def render(snap: Snapshot, url: str, seconds: float | None = None) -> Group:
    """The sources table, the aggregates table and a title saying what period they cover."""
    period = f"last {seconds:.1f} s" if seconds else "totals since the workers started"
    title = Text.assemble(
        (url, "bold"), f"  ·  {period}  ·  in flight: {snap.in_flight:g}", style="default"
    )
    return Group(title, _sources_table(snap, seconds), _aggregates_table(snap, seconds))


def _sources_table(snap: Snapshot, seconds: float | None) -> Table:
    table = _table("sources", "source", "circuit", "requests", "req/s", "errors", "error kinds")
    for name, stats in sorted(snap.sources.items()):
        circuit = CIRCUIT_NAMES.get(stats.circuit, "?") if stats.circuit is not None else "-"
        errors = sum(stats.errors.values())
        kinds = ", ".join(f"{k} {n:g}" for k, n in sorted(stats.errors.items()) if n)
        table.add_row(
            name,
            Text(circuit, style=_CIRCUIT_STYLES.get(circuit, "")),
            f"{stats.requests:g}",
            _rate(stats.requests, seconds),
            f"{errors:g} ({_share(errors, stats.requests)})",
            kinds or "-",
            _ms(stats.calls.quantile(0.5)),
            _ms(stats.calls.quantile(0.95)),
        )
    return table


def _aggregates_table(snap: Snapshot, seconds: float | None) -> Table:
    columns = ("aggregate", "requests", "req/s", "statuses", "cache hit", "cache", "coalesced")
    table = _table("aggregates", *columns)
    for name, agg in sorted(snap.aggregates.items()):
        statuses = ", ".join(f"{s}: {n:g}" for s, n in sorted(agg.statuses.items()) if n)
        answered = sum(agg.cache.values())
        cache = ", ".join(f"{r} {n:g}" for r, n in agg.cache.items() if n)
        table.add_row(
            name,
            f"{agg.requests:g}",
            _rate(agg.requests, seconds),
            statuses or "-",
            _share(agg.cache.get("hit", 0.0), answered) if agg.cache else "off",
            cache or "-",
            f"{agg.coalesced:g}",
            _ms(agg.latency.quantile(0.5)),
            _ms(agg.latency.quantile(0.95)),
        )
    return table


_TEXT_COLUMNS = frozenset({"source", "circuit", "error kinds", "aggregate", "statuses", "cache"})


def _table(title: str, *columns: str) -> Table:
    """A table with `columns` then p50 and p95; text left, numbers right, nothing wrapped."""
    table = Table(title=title, title_justify="left")
    for column in (*columns, "p50", "p95"):
        justify: JustifyMethod = "left" if column in _TEXT_COLUMNS else "right"
        table.add_column(column, justify=justify, no_wrap=True)
    return table


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _rate(count: float, seconds: float | None) -> str:
    return f"{count / seconds:.1f}" if seconds else "-"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


@click.command()
@click.option(
    "--url",
    required=True,
    help="The deployment (http://host:8000: its /metrics) or a metrics URL (a listener's).",
)
@click.option(
    "--token",
    envvar="AGGREGATOR_ADMIN_TOKEN",
    help="The servers' admin token [default: $AGGREGATOR_ADMIN_TOKEN].",
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0.5),
    metavar="SECONDS",
    help="Show a new view every SECONDS, each covering the time since the previous one.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="With --watch: stop after this many views [default: until Ctrl-C].",
)
def status(url: str, token: str | None, watch: float | None, count: int | None) -> None:
    """A terminal view of a running deployment, built from its /metrics.

    Per source: requests, errors by kind, median and p95 call time, circuit state. Per
    aggregate: requests by status, cache hit rate, coalesced waiters, latency. Requests in
    flight. /metrics needs the admin token unless the servers set AGGREGATOR_METRICS=public.

    Exit 0 when shown, 1 when the metrics could not be read (unreachable, refused, not an
    aggregator: one line says which), 2 for bad usage.
    """
    if count is not None and watch is None:
        raise click.UsageError("--count needs --watch")
    try:
        scrape_url = metrics_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    sys.exit(run(StatusRequest(scrape_url, token or None, watch, count)))
