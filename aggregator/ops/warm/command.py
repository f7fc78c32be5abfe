"""`aggregator warm`: the command line of cache warming (the run itself is `ops.warm.run`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from aggregator.errors import AppRefError, ConfigError, WarmError
from aggregator.log import configure_logging
from aggregator.ops.demo_defaults import use_demo_cache
from aggregator.ops.options import app_option, config_option, key_values_callback


@click.command()
@click.argument("aggregate", required=False)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    callback=key_values_callback,
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
    "--token",
    envvar="AGGREGATOR_ADMIN_TOKEN",
    show_envvar=True,
    metavar="TOKEN",
    help="The servers' admin token, for --url [default: $AGGREGATOR_ADMIN_TOKEN]; never shown.",
)
@config_option
@app_option
@click.option(
    "--concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Targets warmed at once.",
)
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
    token: str | None,
    config_file: Path | None,
    app_ref: str | None,
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

    With --url, warms through a running deployment (POST /admin/warm, token from --token or
    AGGREGATOR_ADMIN_TOKEN); without, builds the app with the servers' AGGREGATOR_* settings and
    fills their shared cache (filesystem, redis) directly. A per-process (simple) cache cannot
    be warmed either way (--dry-run shows the targets with any cache, and says so).

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
    from aggregator.ops.warm import run as warming
    from aggregator.ops.warm.warmers import RunOptions

    request = warming.WarmRequest(
        aggregate=aggregate,
        params=params,
        all_targets=all_targets,
        targets_file=targets_file,
        url=url,
        token=token or None,
        config_file=config_file,
        app_ref=app_ref,
        options=RunOptions(
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
        if url is None:  # direct, on the demo defaults: the cache `aggregator serve` uses
            use_demo_cache(config_file, app_ref)
        code = warming.run(request)
    except (WarmError, ConfigError, ValidationError, AppRefError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run began
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code)
