"""The `aggregator` command: serve, demo, check-config, cache purge, warm, status, bench, soak.

Each command lives with what it runs; their modules import the heavy parts (the cache, the
engine, Flask) inside the command, so `aggregator status` or `--help` start without them.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from aggregator.bench.command import bench as bench_command
from aggregator.bench.command import soak as soak_command
from aggregator.ops.purge import cache_group
from aggregator.ops.serve import DEMO_HOST, DEMO_PORT, check_config, serve
from aggregator.ops.status.command import status
from aggregator.ops.warm.command import warm
from aggregator.settings import SettingsError


class _Commands(click.Group):
    """The command group; an unusable AGGREGATOR_* variable, wherever a command reads the
    settings, is one line (the variable, its value, what is allowed) and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            click.echo(f"aggregator: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Commands, context_settings={"auto_envvar_prefix": "AGGREGATOR"})
@click.version_option(package_name="aggregator", message="aggregator %(version)s")
def main() -> None:
    """Aggregate many slow upstream services into one fast Flask endpoint."""


@main.command()
@click.option("--host", default=DEMO_HOST, show_default=True, help="Loopback address to bind.")
@click.option("--port", default=DEMO_PORT, show_default=True, type=int, help="Port to listen on.")
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
    from aggregator.ops.hypercorn_defaults import port_busy

    busy = port_busy(host, port) if port else None
    if busy is not None:
        click.echo(f"aggregator demo: cannot listen on {host}:{port}: {busy}", err=True)
        sys.exit(1)
    from aggregator.demo.server import run_demo

    knobs = Knobs(latency=latency, jitter=jitter, failure_rate=failure_rate, stall_rate=stall_rate)
    run_demo(host, port, knobs)


for command in (check_config, serve, cache_group, warm, status):
    main.add_command(command)
main.add_command(bench_command, "bench")
main.add_command(soak_command, "soak")

if __name__ == "__main__":
    main()
