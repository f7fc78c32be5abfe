"""Logging set-up, done once by the entry points (cli, asgi.py) before the app is built."""

from __future__ import annotations

import logging
import os


def configure_logging(level: str | None = None) -> None:
    """One stderr handler on the `aggregator` logger; Hypercorn keeps its own access/error logs."""
    logger = logging.getLogger("aggregator")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level or os.environ.get("AGGREGATOR_LOG_LEVEL", "INFO").upper())
    logger.propagate = False
