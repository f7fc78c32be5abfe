"""`aggregator serve` and `check-config`: Hypercorn with our settings, and the checks before it.

The only operator module that builds the Flask app, and only inside each worker
(`worker_app`): the supervising process reads the config and prepares metrics, nothing more.
"""

from __future__ import annotations

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

from aggregator.config import AppConfig, load_config
from aggregator.errors import ConfigError
from aggregator.log import configure_logging
from aggregator.ops import metrics_server
from aggregator.ops.options import config_option
from aggregator.settings import Settings

DEMO_HOST = "127.0.0.1"
DEMO_PORT = 8101

#: `serve` flags that override hypercorn.toml, only when actually given: flag -> Config attribute.
_HYPERCORN_FLAGS = {"bind": "bind", "workers": "workers"}

#: What Hypercorn imports in each worker process.
WORKER_APP = "aggregator.ops.serve:worker_app()"


def worker_app() -> Any:
    """The app each Hypercorn worker process builds (settings come from AGGREGATOR_* vars)."""
    from aggregator.app import create_asgi_app_or_exit

    configure_logging()
    return create_asgi_app_or_exit()


@click.command("check-config")
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


@click.command()
@config_option
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
    config.application_path = WORKER_APP
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
