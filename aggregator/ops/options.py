"""Options and values shared by several `aggregator` commands, spelled once."""

from __future__ import annotations

from pathlib import Path

import click

#: `--config FILE`, as `serve`, `warm` and `cache purge` take it.
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config; default: $AGGREGATOR_CONFIG, else the bundled demo.",
)


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
