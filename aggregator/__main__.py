"""`python -m aggregator`: the `aggregator` command."""

from aggregator.ops.cli import main

main()
