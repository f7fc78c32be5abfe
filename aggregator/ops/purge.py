"""`aggregator cache purge`: drop entries of a shared cache (filesystem, Redis) from outside.

It builds the engine as a server would (no Flask app, no blueprints) and purges through the
same code as `POST /admin/purge`, so both agree on keys and on what an upstream's purge reaches.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from aggregator.config import AppConfig, load_config
from aggregator.errors import CacheUnavailableError, ConfigError, InvalidRequestError
from aggregator.log import configure_logging
from aggregator.ops.demo_defaults import use_demo_cache
from aggregator.ops.options import config_option, key_values_callback
from aggregator.params import ParamValue
from aggregator.settings import Settings


@click.group("cache")
def cache_group() -> None:
    """Manage the shared aggregate cache (filesystem or Redis)."""


@cache_group.command("purge")
@click.argument("aggregate", required=False)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    callback=key_values_callback,
    help="Purge only the entry of these parameters (repeatable), typed as in a request.",
)
@click.option("--upstream", help="Purge this upstream and every aggregate built from it.")
@config_option
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
        use_demo_cache(config_file)  # on the demo defaults: the cache `aggregator serve` uses
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
    from aggregator.cache import check_target

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
    from aggregator.cache import purge
    from aggregator.engine import Engine

    engine = Engine.build(settings.model_copy(update={"metrics": "off"}), config)  # not a server
    try:
        return asyncio.run(
            purge(engine.cache, aggregate=aggregate, params=params, upstream=upstream)
        )
    finally:
        engine.close()
