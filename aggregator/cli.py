"""The `aggregator` command: serve, demo, check-config, cache purge, warm, status, bench, soak."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx
from pydantic import ValidationError

from aggregator import metrics_server
from aggregator.bench.command import bench as bench_command
from aggregator.bench.command import soak as soak_command
from aggregator.cache import check_target, purge
from aggregator.cache.backends import check_cache_settings
from aggregator.config import AppConfig, load_config
from aggregator.engine import Engine
from aggregator.errors import CacheUnavailableError, ConfigError, InvalidRequestError, WarmError
from aggregator.log import configure_logging
from aggregator.params import ParamValue
from aggregator.settings import Settings

DEMO_HOST = "127.0.0.1"
DEMO_PORT = 8101

#: `serve` flags that override hypercorn.toml, only when actually given: flag -> Config attribute.
_HYPERCORN_FLAGS = {"bind": "bind", "workers": "workers"}


def worker_app() -> Any:
    """The app each Hypercorn worker process builds (settings come from AGGREGATOR_* vars)."""
    from aggregator import create_asgi_app_or_exit

    configure_logging()
    return create_asgi_app_or_exit()


@click.group(context_settings={"auto_envvar_prefix": "AGGREGATOR"})
def main() -> None:
    """Aggregate many slow upstream services into one fast Flask endpoint."""


@main.command("check-config")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--hypercorn-config",
    type=click.Path(path_type=Path, dir_okay=False),
    default="hypercorn.toml",
    show_default=True,
    help="Hypercorn settings to check the deadlines against; used when it exists.",
)
def check_config(file: Path, hypercorn_config: Path) -> None:
    """Validate FILE without serving; exit 0 when usable, 1 with the problems otherwise.

    Warns (exit still 0) about aggregate deadlines longer than Hypercorn's graceful_timeout.
    """
    from hypercorn.config import Config

    try:
        config = load_config(file)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    server = Config.from_toml(hypercorn_config) if hypercorn_config.is_file() else Config()
    for warning in shutdown_warnings(config, server.graceful_timeout):
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"{file}: ok ({len(config.upstreams)} upstreams, {len(config.aggregates)} aggregates: "
        + ", ".join(f"{a.path}" for a in config.aggregates.values())
        + ")"
    )


@main.command()
@click.option("--host", default=DEMO_HOST, show_default=True, help="Loopback address to bind.")
@click.option("--port", default=DEMO_PORT, show_default=True, type=int)
@click.option("--latency", default=0.1, show_default=True, type=float, help="Default delay, s.")
@click.option("--jitter", default=0.0, show_default=True, type=float, help="Extra random delay.")
@click.option("--failure-rate", default=0.0, show_default=True, type=float, help="0..1 -> 503.")
@click.option(
    "--stall-rate", default=0.0, show_default=True, type=float, help="0..1 -> caller times out."
)
def demo(
    host: str, port: int, latency: float, jitter: float, failure_rate: float, stall_rate: float
) -> None:
    """Run only the slow demo upstream services (what the bundled config aggregates)."""
    from aggregator.demo.knobs import Knobs
    from aggregator.demo.server import run_demo

    knobs = Knobs(latency=latency, jitter=jitter, failure_rate=failure_rate, stall_rate=stall_rate)
    run_demo(host, port, knobs)


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config; default: $AGGREGATOR_CONFIG, else the bundled demo.",
)
@click.option("--bind", "-b", multiple=True, help="host:port to listen on (repeatable).")
@click.option("--workers", "-w", type=click.IntRange(min=1), help="Worker processes.")
@click.option(
    "--mode",
    type=click.Choice(["loop", "threads", "serial"]),
    help="How Flask runs under ASGI (default loop).",
)
@click.option(
    "--engine",
    type=click.Choice(["aiohttp", "httpx"]),
    help="Upstream connection engine (default aiohttp).",
)
@click.option(
    "--hypercorn-config",
    type=click.Path(path_type=Path, dir_okay=False),
    default="hypercorn.toml",
    show_default=True,
    help="Hypercorn settings file; used when it exists.",
)
def serve(
    config_file: Path | None,
    bind: tuple[str, ...],
    workers: int | None,
    mode: str | None,
    engine: str | None,
    hypercorn_config: Path,
) -> None:
    """Serve the configured aggregates with Hypercorn (starts the demo services if no config)."""
    try:
        load_config(config_file)  # fail here, once, with a readable message; workers re-read it
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for name, value in (("CONFIG", config_file), ("MODE", mode), ("ENGINE", engine)):
        if value is not None:
            os.environ[f"AGGREGATOR_{name}"] = str(value)
    given = {"bind": list(bind) or None, "workers": workers}
    with _demo_if_needed(config_file):
        sys.exit(run_server(hypercorn_config, given))


#: Hypercorn's limits against hostile clients, as hypercorn.toml ships them (a test keeps the two
#: equal), for `aggregator serve` without that file. Why these and not read_timeout: the file.
SERVER_LIMITS: dict[str, Any] = {
    "keep_alive_timeout": 5.0,
    "h11_max_incomplete_size": 16 * 1024,
    "h2_max_header_list_size": 16 * 1024,
}


def run_server(hypercorn_config: Path, overrides: dict[str, Any]) -> int:
    """Run Hypercorn with the file's settings plus the flags actually given."""
    from hypercorn.config import Config
    from hypercorn.run import run

    config = Config.from_toml(hypercorn_config) if hypercorn_config.is_file() else Config()
    if not hypercorn_config.is_file():
        config.bind = ["127.0.0.1:8000"]
        # No Hypercorn access log, as in hypercorn.toml: aggregator.access logs each request.
        for attribute, value in SERVER_LIMITS.items():
            setattr(config, attribute, value)
        config.graceful_timeout = 10.0  # as hypercorn.toml ships: the default deadline
        if importlib.util.find_spec("uvloop") is not None:
            config.worker_class = "uvloop"  # as hypercorn.toml ships (docs/benchmarks.md)
    for flag, attribute in _HYPERCORN_FLAGS.items():
        if overrides.get(flag) is not None:
            setattr(config, attribute, overrides[flag])
    config.application_path = "aggregator.cli:worker_app()"
    workers = max(1, config.workers)
    # One worker is served in this process (Hypercorn's `workers = 0`), not under a supervisor:
    # SIGTERM reaches the serving loop itself, and the listening socket closes as soon as the
    # graceful shutdown begins, so new connections are refused instead of waiting in the
    # supervisor's still-open socket until the worker has drained (docs/reliability.md).
    config.workers = 0 if workers == 1 else workers
    # Workers build their settings from the environment; they must know how many they are
    # (a per-process cache with several workers is refused).
    os.environ["AGGREGATOR_WORKERS"] = str(workers)
    try:
        settings = Settings()
        check_cache_settings(settings)
        app_config = load_config(settings.config)
        for warning in shutdown_warnings(app_config, config.graceful_timeout):
            click.echo(f"warning: {warning}", err=True)
        with metrics_server.prepared(settings, workers) as shared_dir:
            click.echo(
                f"aggregator serving on {', '.join(config.bind)} "
                f"(mode={os.environ.get('AGGREGATOR_MODE', 'loop')}, workers={workers})"
            )
            page = _page_url(config.bind) if settings.dashboard else None
            if page is not None:
                click.echo(f"live dashboard: open {page}")
            if shared_dir is not None:
                click.echo(f"metrics: the workers share {shared_dir}")
                if settings.metrics_bind is not None:
                    click.echo(f"metrics: http://{settings.metrics_bind}/metrics")
            return run(config)
    except (ConfigError, ValidationError) as exc:
        click.echo(str(exc), err=True)
        return 1


def _page_url(binds: list[str]) -> str | None:
    """The dashboard's address for the first TCP bind (a wildcard host becomes loopback)."""
    for bind in binds:
        if bind.startswith(("unix:", "fd://")):
            continue
        host, _, port = bind.rpartition(":")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
        return f"http://{host}:{port}/"
    return None


def shutdown_warnings(config: AppConfig, graceful_timeout: float) -> list[str]:
    """Aggregates whose deadline outlasts Hypercorn's graceful_timeout (cut off at SIGTERM).

    A warning, not a refusal: only requests in flight when a shutdown begins are affected, and
    a short grace period can be a deliberate trade (an orchestrator's kill timeout).
    """
    return [
        f"aggregate {name!r} has a deadline of {agg.deadline:g} s, longer than Hypercorn's "
        f"graceful_timeout of {graceful_timeout:g} s: at shutdown its requests in flight may be "
        "cut off; raise graceful_timeout (hypercorn.toml) or lower the deadline"
        for name, agg in config.aggregates.items()
        if agg.deadline > graceful_timeout
    ]


@main.group("cache")
def cache_group() -> None:
    """Manage the shared aggregate cache (filesystem or Redis)."""


@cache_group.command("purge")
@click.argument("aggregate", required=False)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    callback=lambda _ctx, _param, values: _key_values(values),
    help="Purge only the entry of these parameters (repeatable), typed as in a request.",
)
@click.option("--upstream", help="Purge this upstream and every aggregate built from it.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config; default: $AGGREGATOR_CONFIG, else the bundled demo.",
)
def cache_purge(
    aggregate: str | None,
    params: dict[str, str],
    upstream: str | None,
    config_file: Path | None,
) -> None:
    """Purge AGGREGATE (one entry with --param), and/or an --upstream and its aggregates.

    Works on the shared caches (filesystem, Redis) the servers use, with the same AGGREGATOR_*
    settings. A per-process (simple) cache lives inside each server: use POST /admin/purge.
    Exit 0 when purged, 2 for a usage error, 1 when the config or the cache is unusable.
    """
    if params and aggregate is None:
        raise click.UsageError("--param needs an AGGREGATE")
    if aggregate is None and upstream is None:
        raise click.UsageError("give an AGGREGATE, --upstream NAME, or both")
    try:
        settings = Settings() if config_file is None else Settings(config=config_file)
        config = load_config(settings.config)
    except (ConfigError, ValidationError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    if settings.cache_type in ("simple", "null"):
        what = (
            "caches nothing"
            if settings.cache_type == "null"
            else "is a per-process cache: it lives inside each server, out of this command's reach"
        )
        click.echo(
            f"Error: cache_type={settings.cache_type!r} {what}. "
            "Purge through the running server instead: POST /admin/purge "
            "with 'Authorization: Bearer <AGGREGATOR_ADMIN_TOKEN>'. This command purges shared "
            "caches (filesystem, redis): run it with the servers' AGGREGATOR_CACHE_* settings.",
            err=True,
        )
        sys.exit(2)
    try:
        check_target(config, aggregate, upstream)
    except InvalidRequestError as exc:
        hint = "AGGREGATE" if exc.field == "aggregate" else "--upstream"
        raise click.BadParameter(exc.reason, param_hint=hint) from None
    typed = None
    if aggregate is not None and params:
        try:
            typed = config.aggregates[aggregate].typed_params(params)
        except InvalidRequestError as exc:
            raise click.BadParameter(f"{exc.field}: {exc.reason}", param_hint="--param") from None
    configure_logging()
    try:
        purged = purge_cache(settings, config, aggregate=aggregate, params=typed, upstream=upstream)
    except CacheUnavailableError as exc:
        click.echo(f"Error: the {settings.cache_type} cache is unreachable: {exc}", err=True)
        sys.exit(1)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"purged {', '.join(purged)} ({settings.cache_type} cache)")


def purge_cache(
    settings: Settings,
    config: AppConfig,
    *,
    aggregate: str | None,
    params: dict[str, ParamValue] | None,
    upstream: str | None,
) -> list[str]:
    """Build the engine as a server would and run `cache.purge` on its cache; what was purged."""
    engine = Engine.build(settings.model_copy(update={"metrics": "off"}), config)  # not a server
    try:
        return asyncio.run(
            purge(engine.cache, aggregate=aggregate, params=params, upstream=upstream)
        )
    finally:
        engine.close()


@main.command()
@click.argument("aggregate", required=False)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    callback=lambda _ctx, _param, values: _key_values(values),
    help="Warm the entry of these parameters (repeatable), typed as in a request.",
)
@click.option("--all", "all_targets", is_flag=True, help="Every aggregate's configured targets.")
@click.option(
    "--targets",
    "targets_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Targets file: JSON lines (.jsonl/.json) or TOML [[targets]] (.toml).",
)
@click.option(
    "--url", help="Warm through this deployment's POST /admin/warm, e.g. http://host:8000."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config; default: $AGGREGATOR_CONFIG, else the bundled demo.",
)
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="At most this many targets per second, evenly spaced [default: unlimited].",
)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds per attempt; a target that runs out of time has failed.",
)
@click.option(
    "--retries",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="Retries of a failed target, with exponential backoff (partial ones are not retried).",
)
@click.option("--dry-run", is_flag=True, help="Show the targets; contact nothing.")
@click.option("--only-missing", is_flag=True, help="Skip entries that are fresh in the cache.")
@click.option(
    "--json",
    "json_path",
    metavar="FILE",
    help="Write a JSON report to FILE ('-': stdout, then all other output goes to stderr).",
)
def warm(
    aggregate: str | None,
    params: dict[str, str],
    all_targets: bool,
    targets_file: Path | None,
    url: str | None,
    config_file: Path | None,
    concurrency: int,
    rate: float | None,
    timeout: float,
    retries: int,
    dry_run: bool,
    only_missing: bool,
    json_path: str | None,
) -> None:
    """Fill cache entries before traffic asks for them.

    Targets: AGGREGATE alone warms the `warm = [{city = "Paris"}, ...]` list under
    [aggregates.AGGREGATE] in the config, --all every such list, AGGREGATE --param NAME=VALUE
    one entry, and --targets FILE the entries of a file (JSON lines {"aggregate": "dashboard",
    "params": {...}}, or TOML [[targets]] tables). Every target is validated before the first is
    warmed; duplicates are warmed once.

    With --url, warms through a running deployment (POST /admin/warm, token from
    AGGREGATOR_ADMIN_TOKEN); without, builds the app with the servers' AGGREGATOR_* settings and
    fills their shared cache (filesystem, redis) directly. A per-process (simple) cache cannot
    be warmed either way.

    Exit 0 when every target was warmed (or skipped as fresh), 1 when some failed or were
    partial, 2 for bad usage, config or targets or a deployment that cannot be warmed, 130 when
    interrupted (Ctrl-C; 143 for SIGTERM): pending targets are cancelled, the summary and the
    JSON report list them as not run.

    \b
    Example crontab, refreshing what expired every 5 minutes with a JSON report (the */5
    entry is one line in the crontab, wrapped here):
      AGGREGATOR_ADMIN_TOKEN=<the servers' admin token>
      */5 * * * * aggregator warm --all --only-missing --url http://127.0.0.1:8000
          --config /etc/aggregator/config.toml --json /var/log/aggregator/warm.json
    """
    from aggregator import warm as warming

    request = warming.WarmRequest(
        aggregate=aggregate,
        params=params,
        all_targets=all_targets,
        targets_file=targets_file,
        url=url,
        token=os.environ.get("AGGREGATOR_ADMIN_TOKEN"),
        config_file=config_file,
        options=warming.RunOptions(
            concurrency=concurrency,
            rate=rate,
            timeout=timeout,
            retries=retries,
            only_missing=only_missing,
        ),
        dry_run=dry_run,
        json_path=json_path,
    )
    configure_logging(os.environ.get("AGGREGATOR_LOG_LEVEL", "WARNING"))
    try:
        code = warming.run(request)
    except (WarmError, ConfigError, ValidationError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run began
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code)


@main.command()
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
    from aggregator.metrics_snapshot import metrics_url
    from aggregator.status_command import StatusRequest, run

    if count is not None and watch is None:
        raise click.UsageError("--count needs --watch")
    try:
        scrape_url = metrics_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    sys.exit(run(StatusRequest(scrape_url, token or None, watch, count)))


def _key_values(values: tuple[str, ...]) -> dict[str, str]:
    """`NAME=VALUE` pairs as a dict; a pair without `=` or a name given twice is a usage error."""
    pairs: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--param")
        if name in pairs:
            raise click.BadParameter(f"{name}: given more than once", param_hint="--param")
        pairs[name] = value
    return pairs


@contextlib.contextmanager
def _demo_if_needed(config_file: Path | None) -> Iterator[None]:
    """With no config of its own, the service aggregates the demo: make sure it is up."""
    if config_file is not None or os.environ.get("AGGREGATOR_CONFIG"):
        yield
        return
    url = os.environ.get("AGGREGATOR_DEMO_URL", f"http://{DEMO_HOST}:{DEMO_PORT}")
    if _answers(url):
        click.echo(f"using the demo services already running at {url}")
        yield
        return
    from aggregator.demo.process import start_demo_process

    port = httpx.URL(url).port or DEMO_PORT
    with start_demo_process(DEMO_HOST, port) as proc:
        os.environ["AGGREGATOR_DEMO_URL"] = proc.url
        click.echo(f"started the demo services at {proc.url}")
        yield


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=0.5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


main.add_command(bench_command, "bench")
main.add_command(soak_command, "soak")

if __name__ == "__main__":
    main()
