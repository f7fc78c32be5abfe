"""`aggregator serve` and `check-config`: Hypercorn with our settings, and the checks before it.

The only operator module that builds the Flask app, and only inside each worker
(`worker_app`): the supervising process reads the config and prepares metrics, nothing more.
`serve --app MODULE:NAME` serves a developer's own Flask app instead (`serving.appref`): the
supervising process imports and checks it once, so a bad reference stops it (one line, exit 2)
before any worker starts, and each worker loads it again (`app_worker`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx
from pydantic import ValidationError

from aggregator.config import AppConfig, load_config
from aggregator.errors import AppRefError, ConfigError
from aggregator.log import configure_logging
from aggregator.ops import demo_defaults, metrics_server
from aggregator.ops.http1 import use_configured_parser, use_parser
from aggregator.ops.hypercorn_defaults import HYPERCORN_DEFAULTS, busy_binds, port_busy
from aggregator.ops.hypercorn_defaults import hypercorn_config as hypercorn_config_of
from aggregator.ops.options import config_option
from aggregator.settings import Settings

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

    from aggregator.serving import ASGIAdapter

DEMO_HOST = "127.0.0.1"
DEMO_PORT = 8101

#: `serve` flags that override hypercorn.toml, only when actually given: flag -> Config attribute.
_HYPERCORN_FLAGS = {"bind": "bind", "workers": "workers"}

#: What Hypercorn imports in each worker process.
WORKER_APP = "aggregator.ops.serve:worker_app()"
#: What it imports instead for `serve --app`, which names the app in APP_ENV.
APP_WORKER = "aggregator.ops.serve:app_worker()"
#: `serving.appref.APP_ENV`, spelled here so that `serve --help` does not import Flask.
APP_ENV = "AGGREGATOR_APP"


def worker_app() -> Any:
    """The app each Hypercorn worker process builds (settings come from AGGREGATOR_* vars)."""
    from aggregator.app import create_asgi_app_or_exit

    configure_logging()
    app = create_asgi_app_or_exit()
    use_configured_parser()  # the supervisor said which, or why not
    return app


def app_worker() -> Any:
    """The developer's app each worker serves for `serve --app` (named by AGGREGATOR_APP)."""
    configure_logging()
    try:
        app = _load_app(os.environ[APP_ENV])
    except AppRefError as exc:  # checked by the supervisor already: the module changed since
        print(f"aggregator: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    use_configured_parser()
    return app


def _load_app(ref: str) -> ASGIAdapter:
    """`ref` wrapped in the mode `--mode` (or AGGREGATOR_MODE) asks for, else the app's own."""
    from aggregator.serving import appref

    mode = os.environ.get("AGGREGATOR_MODE") or None
    return appref.asgi_app(ref, mode=mode)  # type: ignore[arg-type]  # appref checks the value


@click.command("check-config")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--hypercorn-config",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Hypercorn settings to check the deadlines against [default: the ones `serve` "
    "applies, as hypercorn.toml ships them].",
)
def check_config(file: Path, hypercorn_config: Path | None) -> None:
    """Validate FILE (and the AGGREGATOR_* settings) without serving; exit 0 when usable, 1
    with the problems otherwise (2 for an unusable AGGREGATOR_* variable).

    Warns (exit still 0) about aggregate deadlines longer than Hypercorn's graceful_timeout.
    """
    Settings()  # an unusable AGGREGATOR_* variable: one line, exit 2 (ops.cli)
    try:
        config = load_config(file)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    server = hypercorn_config_of(hypercorn_config)
    for warning in shutdown_warnings(config, server.graceful_timeout):
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"{file}: ok ({len(config.upstreams)} upstreams, {len(config.aggregates)} aggregates: "
        + ", ".join(f"{a.path}" for a in config.aggregates.values())
        + ")"
    )


@click.command()
@config_option
@click.option(
    "--app",
    "app_ref",
    metavar="MODULE:NAME",
    help="Serve your own Flask app instead of the configured aggregates: MODULE:NAME (a Flask "
    "app or an aggregator.to_asgi adapter) or MODULE:FACTORY().",
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
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Hypercorn settings file [default: the packaged ones, as hypercorn.toml ships them].",
)
def serve(
    config_file: Path | None,
    app_ref: str | None,
    bind: tuple[str, ...],
    workers: int | None,
    mode: str | None,
    engine: str | None,
    hypercorn_config: Path | None,
) -> None:
    """Serve the configured aggregates with Hypercorn (starts the demo services if no config).

    With no config and no AGGREGATOR_CACHE_TYPE (the Quick start), the cache is a filesystem
    one private to your user, which `aggregator warm` and `aggregator cache purge` find from
    another shell, and an admin token is generated for the run (unless AGGREGATOR_ADMIN_TOKEN
    is set) and printed, for `aggregator status` and /metrics.

    With --app, serve your own Flask app instead, in the same modes, limits and lifespan.
    """
    if app_ref is None or config_file is not None:
        try:
            load_config(config_file)  # fail here, once, readably; workers re-read it
        except ConfigError as exc:
            click.echo(str(exc), err=True)
            sys.exit(1)
    for name, value in (("CONFIG", config_file), ("MODE", mode), ("ENGINE", engine)):
        if value is not None:
            os.environ[f"AGGREGATOR_{name}"] = str(value)
    given = {"bind": list(bind) or None, "workers": workers}
    Settings()  # an unusable AGGREGATOR_* variable: one line, exit 2 (ops.cli), before any start
    busy = busy_binds(server_config(hypercorn_config, given).bind)
    if busy:  # before "serving on", and before the demo is started for nothing
        click.echo(f"aggregator serve: cannot listen on {'; '.join(busy)}", err=True)
        sys.exit(1)
    if app_ref is not None:  # their app, their upstreams: no demo started for it
        sys.exit(run_server(hypercorn_config, given, app_ref=app_ref))
    try:
        notes = _demo_defaults(config_file)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    with _demo_if_needed(config_file):
        sys.exit(run_server(hypercorn_config, given, notes=notes))


def _demo_defaults(config_file: Path | None) -> list[str]:
    """On the demo defaults (no config, no cache type: the Quick start), a cache that `warm` and
    `cache purge` reach from another shell and an admin token for this run; what to tell."""
    cache_dir = demo_defaults.use_demo_cache(config_file, fresh=True)
    if cache_dir is None:
        return []
    notes = [
        f"demo defaults: cache in {cache_dir}, shared with `aggregator warm` and "
        "`aggregator cache purge` run from another shell"
    ]
    token = demo_defaults.run_token()
    if token is not None:
        notes.append(
            "admin token for this run (for `aggregator status`, /metrics and /admin/*), "
            "in the other shell:"
        )
        notes.append(f"  export AGGREGATOR_ADMIN_TOKEN={token}")
    return notes


#: Hypercorn's limits against hostile clients (why these and not read_timeout: hypercorn.toml).
SERVER_LIMITS: dict[str, Any] = {
    key: HYPERCORN_DEFAULTS[key]
    for key in ("keep_alive_timeout", "h11_max_incomplete_size", "h2_max_header_list_size")
}


def server_config(hypercorn_config: Path | None, overrides: dict[str, Any]) -> HypercornConfig:
    """Hypercorn's settings: the file's (else the packaged ones) plus the flags actually given."""
    config = hypercorn_config_of(hypercorn_config)
    for flag, attribute in _HYPERCORN_FLAGS.items():
        if overrides.get(flag) is not None:
            setattr(config, attribute, overrides[flag])
    return config


def run_server(
    hypercorn_config: Path | None,
    overrides: dict[str, Any],
    *,
    app_ref: str | None = None,
    notes: Sequence[str] = (),
) -> int:
    """Run Hypercorn with the file's settings (else the packaged ones) plus the flags given.

    `app_ref`: a developer's app to serve (`--app`) instead of ours; exit 2 when it cannot be.
    `notes`: lines to print once the server is announced.
    """
    from hypercorn.run import run

    config = server_config(hypercorn_config, overrides)
    config.application_path = WORKER_APP if app_ref is None else APP_WORKER
    workers = max(1, config.workers)
    # One worker is served in this process (Hypercorn's `workers = 0`), not under a supervisor:
    # SIGTERM reaches the serving loop itself, and the listening socket closes as soon as the
    # graceful shutdown begins, so new connections are refused instead of waiting in the
    # supervisor's still-open socket until the worker has drained (docs/reliability.md).
    config.workers = 0 if workers == 1 else workers
    # Workers build their settings from the environment; they must know how many they are
    # (a per-process cache with several workers is refused).
    os.environ["AGGREGATOR_WORKERS"] = str(workers)
    from aggregator.cache.backends import check_cache_settings

    try:
        settings = Settings()
        if app_ref is None:
            check_cache_settings(settings)
            _warn_about_shutdown(load_config(settings.config), config.graceful_timeout)
        else:
            os.environ[APP_ENV] = app_ref
        with metrics_server.prepared(settings, workers) as shared_dir:
            if app_ref is None:
                mode = os.environ.get("AGGREGATOR_MODE", "loop")
                page = _page_url(config.bind) if settings.dashboard else None
            else:
                try:
                    mode = _check_app(app_ref, config.graceful_timeout)
                except AppRefError as exc:
                    click.echo(str(exc), err=True)
                    return 2
                page = None  # the dashboard is our app's, not theirs
            served = "" if app_ref is None else f"{app_ref} "
            click.echo(
                f"aggregator serving {served}on {', '.join(config.bind)} "
                f"(mode={mode}, workers={workers})"
            )
            if settings.http1_parser != "h11":
                choice = use_parser(settings.http1_parser)
                click.echo(choice.line, err=choice.fell_back)
            if page is not None:
                click.echo(f"live dashboard: open {page}")
            for note in notes:
                click.echo(note)
            if shared_dir is not None:
                click.echo(f"metrics: the workers share {shared_dir}")
            if settings.metrics_bind is not None and metrics_server.listening():
                click.echo(f"metrics: http://{settings.metrics_bind}/metrics")
            return run(config)
    except (ConfigError, ValidationError) as exc:
        click.echo(str(exc), err=True)
        return 1


def _check_app(app_ref: str, graceful_timeout: float) -> str:
    """Load `--app` here, before any worker starts; the mode it will be served in.

    Loaded inside `metrics_server.prepared`, so an engine it builds sees the metrics directory;
    with one worker this process serves it, and reuses what it loaded. An app carrying our
    engine gets the checks our own app gets (cache settings, deadlines against shutdown).
    """
    from aggregator.cache.backends import check_cache_settings

    adapter = _load_app(app_ref)
    if adapter.engine is not None:
        check_cache_settings(adapter.engine.settings)
        _warn_about_shutdown(adapter.engine.config, graceful_timeout)
    return adapter.mode


def _warn_about_shutdown(config: AppConfig, graceful_timeout: float) -> None:
    for warning in shutdown_warnings(config, graceful_timeout):
        click.echo(f"warning: {warning}", err=True)


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
        "cut off; raise graceful_timeout (serve --hypercorn-config) or lower the deadline"
        for name, agg in config.aggregates.items()
        if agg.deadline > graceful_timeout
    ]


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
    busy = port_busy(DEMO_HOST, port)
    if busy is not None:  # held by something that is not the demo: say so, start nothing
        click.echo(
            f"aggregator serve: cannot start the demo services on {DEMO_HOST}:{port}: {busy} "
            "(set AGGREGATOR_DEMO_URL to another port, or give a --config)",
            err=True,
        )
        sys.exit(1)
    with start_demo_process(DEMO_HOST, port) as proc:
        os.environ["AGGREGATOR_DEMO_URL"] = proc.url
        click.echo(f"started the demo services at {proc.url}")
        yield


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=0.5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
