"""`aggregator bench` and `aggregator soak`: flags in, runs out, exit codes for scripts.

Exit 0 when every run completed (flags in the report are findings, not failures), 1 when a
server or the load generator failed, 2 for bad flags (nothing started), including an `--app`
that cannot be served (it is imported and checked here first, as `serve --app` does).

What measures the servers (`servers`, `runner`, `soak`) needs psutil, from the bench extra: it is
imported when a command runs, after a check that says so in one line, so that `aggregator` and
its other commands work without that extra.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from aggregator.bench.load_tools import LoadError, Tool, wrk_available
from aggregator.bench.plan import (
    DEFAULT_TARGETS,
    PlanError,
    Target,
    Workload,
    default_app_targets,
    on_paths,
    parse_target,
)
from aggregator.bench.report import print_table, summarize, write_outputs
from aggregator.bench.results import Options
from aggregator.demo.knobs import MAX_PAYLOAD_KB
from aggregator.settings import Settings

#: What every bench and soak run needs beyond the service's own dependencies.
BENCH_EXTRA = ("psutil",)


def _require_bench_extra(command: str) -> None:
    """Refuse in one line, exit 2, before anything starts, when the bench extra is missing."""
    missing = [name for name in BENCH_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        click.echo(
            f"aggregator {command} needs the bench extra ({', '.join(missing)} not installed): "
            "pip install 'aggregator[bench]'",
            err=True,
        )
        sys.exit(2)


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers") from None
    if not levels or any(not 1 <= c <= 4096 for c in levels):
        raise click.BadParameter(f"{text!r}: each level must be within 1..4096")
    return tuple(sorted(set(levels)))


def _targets(given: tuple[str, ...], console: Console, *, app: bool = False) -> tuple[Target, ...]:
    """Explicit targets must all be runnable; the default set drops what is not installed."""
    specs = [s for item in given for s in item.split(",") if s.strip()]
    defaults = default_app_targets() if app else DEFAULT_TARGETS
    try:
        targets = [parse_target(s, app=app) for s in (specs or defaults)]
    except PlanError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    runnable: list[Target] = []
    for target in dict.fromkeys(targets):
        missing = target.missing_package()
        if missing is None:
            runnable.append(target)
        elif specs:
            raise click.BadParameter(
                f"{target.name} needs {missing}: pip install 'aggregator[bench]'",
                param_hint="--target",
            )
        else:
            console.print(f"skipping {target.name}: {missing} is not installed (bench extra)")
    return tuple(runnable)


def _own_app(app: str | None, paths: tuple[str, ...]) -> None:
    """`--app` with its `--path`s, spelled right (whether the app loads: `check_app`, later)."""
    if app is None:
        if paths:
            raise click.BadParameter(
                "--path is a path of your own app: add --app", param_hint="--path"
            )
        return
    if not paths:
        raise click.BadParameter(
            "give the paths to load with --path (repeatable)", param_hint="--app"
        )
    for path in paths:
        if not path.startswith("/") or any(c.isspace() for c in path):
            raise click.BadParameter(
                f"{path!r}: expected /path?query, no spaces", param_hint="--path"
            )


@click.command()
@click.option(
    "--app",
    metavar="MODULE:NAME",
    help="Bench your own Flask app (as `aggregator serve --app` takes it) instead of ours; "
    "targets are then SERVER:app (loop, threads, serial, gunicorn).",
)
@click.option(
    "--path",
    "paths",
    multiple=True,
    metavar="/PATH?QUERY",
    help="With --app: a path to load, repeatable; each path is a series of its own.",
)
@click.option(
    "--target",
    "-t",
    "targets",
    multiple=True,
    help="SERVER:VIEW[:ENGINE][+FLAG...], repeatable or comma-separated "
    "(e.g. loop:async:aiohttp, loop:async+quiet, fastapi-plain:async:httpx, "
    "fastapi-plain:cached). Default: all.",
)
@click.option("--concurrency", "-c", default="1,16,64,256", show_default=True, help="Levels.")
@click.option(
    "--duration",
    "-d",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.5, 600),
    help="Seconds of load per run (one target, one level, one rep).",
)
@click.option(
    "--requests",
    "-n",
    type=click.IntRange(1, 10_000_000),
    help="Also stop each run after this many requests (uses the built-in generator).",
)
@click.option(
    "--reps",
    "-r",
    default=3,
    show_default=True,
    type=click.IntRange(1, 50),
    help="Repetitions of every run, interleaved; the report shows their median.",
)
@click.option(
    "--warmup",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0, 120),
    help="Seconds of unmeasured load per target before its runs (fills caches and pools).",
)
@click.option(
    "--sources",
    "-k",
    default=5,
    show_default=True,
    type=click.IntRange(1, 50),
    help="Demo upstream sources each aggregate request fans out to.",
)
@click.option(
    "--latency",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 10),
    help="Seconds each demo source takes to answer.",
)
@click.option(
    "--jitter",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 10),
    help="Extra random delay per demo answer, up to this many seconds.",
)
@click.option(
    "--failure-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of demo upstream calls answered 503 (0..1).",
)
@click.option(
    "--payload-kb",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0, MAX_PAYLOAD_KB),
    help="KB of JSON per source answer, kept by validation (0: the demo's small payloads).",
)
@click.option(
    "--tool",
    type=click.Choice(["auto", "wrk", "builtin"]),
    default="auto",
    show_default=True,
    help="Load generator (auto: wrk when installed).",
)
@click.option(
    "--threads",
    default=64,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Each server's thread pool (AGGREGATOR_THREADS; gunicorn's threads).",
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.5, 120),
    help="Seconds the load generator waits for one answer before counting a timeout.",
)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Write files here.")
@click.option("--check", is_flag=True, help="Compare wrk with the built-in generator instead.")
def bench(
    app: str | None,
    paths: tuple[str, ...],
    targets: tuple[str, ...],
    concurrency: str,
    duration: float,
    requests: int | None,
    reps: int,
    warmup: float,
    sources: int,
    latency: float,
    jitter: float,
    failure_rate: float,
    payload_kb: float,
    tool: str,
    threads: int,
    timeout: float,
    out: Path | None,
    check: bool,
) -> None:
    """Measure async views against sync twins, serving modes, engines and FastAPI, on loopback.

    With --app and --path, measure your own app's views on our serving modes and gunicorn; the
    demo upstreams still run, and your app finds them at AGGREGATOR_DEMO_URL.
    """
    Settings()  # an unusable AGGREGATOR_* variable (it reaches every server): one line, exit 2
    _require_bench_extra("bench")
    from aggregator.bench.runner import run_bench
    from aggregator.bench.servers import check_app

    # Piped or logged output keeps the whole table on one line per row.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 220)
    levels = _levels(concurrency)
    _own_app(app, paths)
    chosen = _targets(targets, console, app=app is not None)
    if not chosen:
        raise click.UsageError("no runnable target")
    if app is not None:
        problem = check_app(app)  # last: a process of its own, the one slow check
        if problem is not None:
            raise click.BadParameter(problem, param_hint="--app")
        chosen = on_paths(chosen, paths)
    if tool == "wrk" and not wrk_available():
        raise click.UsageError("wrk is not installed (apt-get install wrk), use --tool builtin")
    resolved: Tool = "wrk" if tool == "wrk" or (tool == "auto" and wrk_available()) else "builtin"
    options = Options(
        targets=chosen,
        workload=Workload(sources, latency, jitter, failure_rate, payload_kb=payload_kb),
        levels=levels,
        duration=duration,
        requests=requests,
        reps=reps,
        warmup=warmup,
        tool=resolved,
        threads=threads,
        timeout=timeout,
        app=app,
    )

    def progress(line: str) -> None:
        console.print(f"[dim]{line}[/dim]")

    if check:
        _check(options, levels, console)
        return
    runs = len(chosen) * len(levels) * reps
    estimate = runs * duration + len(chosen) * warmup
    console.print(f"{runs} runs, about {estimate / 60:.1f} min of load (plus start-up and drain)")
    try:
        result = run_bench(options, progress)
    except (LoadError, RuntimeError) as exc:
        console.print(f"[red]bench failed:[/red] {exc}")
        sys.exit(1)
    rows = summarize(result)
    print_table(result, rows, console)
    if out is not None:
        command = shlex.join(["aggregator", "bench", *sys.argv[2:]])
        written, skipped = write_outputs(result, rows, out, command)
        for path in written:
            console.print(f"wrote {path}")
        if skipped is not None:
            console.print(f"note: {skipped}")


def _check(options: Options, levels: tuple[int, ...], console: Console) -> None:
    """Both generators on the first target; differences over 10% are called out."""
    from aggregator.bench.runner import compare_generators

    if not wrk_available():
        raise click.UsageError("--check compares wrk with the built-in generator: install wrk")
    target = options.targets[0]
    try:
        pairs = compare_generators(target, options, levels, console.print)
    except (LoadError, RuntimeError) as exc:
        console.print(f"[red]check failed:[/red] {exc}")
        sys.exit(1)
    table = Table(title=f"wrk vs built-in generator on {target.name}", title_justify="left")
    for header in ("c", "wrk req/s", "built-in req/s", "ratio", "wrk p50", "built-in p50", "note"):
        table.add_column(header, justify="right")
    for level, wrk, builtin in pairs:
        ratio = builtin.rps / wrk.rps if wrk.rps else float("nan")
        notes = []
        if builtin.saturated:
            notes.append("built-in saturated")
        if not 0.9 <= ratio <= 1.1:
            notes.append("differ by more than 10%")
        table.add_row(
            str(level),
            f"{wrk.rps:.1f}",
            f"{builtin.rps:.1f}",
            f"{ratio:.2f}",
            f"{wrk.p50_ms:.1f} ms",
            f"{builtin.p50_ms:.1f} ms",
            "; ".join(notes),
        )
    console.print(table)


@click.command()
@click.option(
    "--duration",
    "-d",
    default=300.0,
    show_default=True,
    type=click.FloatRange(5, 3600),
    help="Seconds of measured load.",
)
@click.option(
    "--concurrency",
    "-c",
    default=256,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Requests in flight at once.",
)
@click.option(
    "--warmup",
    default=30.0,
    show_default=True,
    type=click.FloatRange(1, 600),
    help="Seconds of load before the measured part (the baseline snapshot is taken after).",
)
@click.option(
    "--failure-rate",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Upstream calls answered 503.",
)
@click.option(
    "--stall-rate",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Upstream calls that answer nothing (a timeout).",
)
@click.option(
    "--sources",
    "-k",
    default=5,
    show_default=True,
    type=click.IntRange(4, 50),
    help="Demo sources; the 4th (profile) is the required one.",
)
@click.option(
    "--latency",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 0.9),
    help="Seconds each demo source takes to answer.",
)
@click.option(
    "--interval",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.5, 60),
    help="Seconds between samples of the server worker's memory, file descriptors and connections.",
)
@click.option("--max-in-flight", type=click.IntRange(0), help="The server's limit [its default].")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Write JSON here.")
def soak(
    duration: float,
    concurrency: int,
    warmup: float,
    failure_rate: float,
    stall_rate: float,
    sources: int,
    latency: float,
    interval: float,
    max_in_flight: int | None,
    out: Path | None,
) -> None:
    """Sustained load with failing upstreams; exit 0 when nothing unexpected or leaked, else 1.

    See aggregator/bench/soak.py for what is expected and checked; results: docs/reliability.md.
    """
    Settings()  # an unusable AGGREGATOR_* variable (it reaches the server): one line, exit 2
    _require_bench_extra("soak")
    from aggregator.bench.soak import SETTLE_S, SoakOptions, run_soak, write_json
    from aggregator.bench.soak import report as soak_report

    options = SoakOptions(
        duration=duration,
        concurrency=concurrency,
        failure_rate=failure_rate,
        stall_rate=stall_rate,
        warmup=warmup,
        sources=sources,
        latency=latency,
        interval=interval,
        max_in_flight=max_in_flight,
    )
    click.echo(f"about {(warmup + duration + 2 * SETTLE_S) / 60:.1f} min")
    try:
        result = run_soak(options, click.echo)
    except (LoadError, RuntimeError, PlanError) as exc:
        click.echo(f"soak failed: {exc}", err=True)
        sys.exit(1)
    for line in soak_report(result):
        click.echo(line)
    if out is not None:
        write_json(result, out)
        click.echo(f"wrote {out}")
    sys.exit(0 if result.passed else 1)
