"""Options and values shared by several `aggregator` commands, spelled once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from aggregator.engine import Engine

#: `--config FILE`, as `serve`, `warm` and `cache purge` take it.
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config; default: $AGGREGATOR_CONFIG, else the bundled demo.",
)


#: `--app MODULE:NAME`: a developer's Flask app whose `Aggregator` engine holds the aggregates.
app_option = click.option(
    "--app",
    "app_ref",
    metavar="MODULE:NAME",
    help="Your Flask app (as for `serve --app`): its engine's aggregates, views included, "
    "and settings, instead of --config's.",
)


def app_engine(app_ref: str) -> Engine:
    """The engine of the Flask app `app_ref` names (AppRefError or WarmError-worthy ValueError
    with one line when it cannot be had)."""
    # Lazily: only a command given --app imports the developer's app (and with it Flask).
    from aggregator.engine import find_engine
    from aggregator.serving.appref import wsgi_app

    engine = find_engine(wsgi_app(app_ref))
    if engine is None:
        raise ValueError(f"--app {app_ref}: the app has no aggregator engine (use Aggregator(app))")
    return engine


def key_values(values: tuple[str, ...]) -> dict[str, str]:
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


def key_values_callback(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """`--param NAME=VALUE` (repeatable) as click calls it."""
    return key_values(values)
