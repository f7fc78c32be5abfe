"""Logging set-up, done once by the entry points (cli, asgi.py) before the app is built.

One stderr handler on the `aggregator` logger, in one of two formats
(`AGGREGATOR_LOG_FORMAT`):

- ``text`` (default): `2024-01-15 04:18:37,120 INFO aggregator.access [<request id>] GET ...`
- ``json``: one JSON object per line with `time` (ISO 8601, UTC), `level`, `logger`,
  `message`, `request_id` (null outside a request) and the record's extra fields (the access
  line's `method`, `path`, `status`, `ms`, `cache`; an upstream call's `source`, `attempt`...),
  for log pipelines that would otherwise parse text. python-json-logger does the encoding: it
  already handles extra fields, exceptions, stack info and values json cannot encode, which a
  hand-written formatter would have to get right again.

A filter on the handler stamps every record with the request id of the context it was logged
in (`aggregator.context.request_id`), so lines of one request can be found together. Filters
and formatters run only for records that pass the level, so a disabled level costs nothing
beyond the caller's `isEnabledFor` check. Hypercorn's own error log is configured in
hypercorn.toml and keeps its format; its access log is off, replaced by our per-request line
(`aggregator.access`), which knows the request id and the cache state.
"""

from __future__ import annotations

import logging
import os

from pythonjsonlogger.json import JsonFormatter

from aggregator.context import request_id

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record: the current request's, or `missing` outside one."""

    def __init__(self, missing: str | None) -> None:
        super().__init__()
        self.missing = missing

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # an explicit `extra={"request_id": ...}` wins
            rid = request_id.get()
            record.request_id = self.missing if rid is None else rid
        return True


def build_handler(fmt: str) -> logging.Handler:
    """A stderr handler in `fmt` ("text" or "json"), with the request-id filter."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",
            )
        )
        handler.addFilter(RequestIdFilter(None))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
        handler.addFilter(RequestIdFilter("-"))
    return handler


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Install the handler on `aggregator` once; level and format default to the environment.

    Unknown values fall back to INFO and text here; the app's `Settings` then refuses them
    with a readable start-up error (this runs before settings are read).
    """
    logger = logging.getLogger("aggregator")
    if logger.handlers:
        return
    fmt = (fmt or os.environ.get("AGGREGATOR_LOG_FORMAT", "text")).strip().lower()
    logger.addHandler(build_handler(fmt))
    wanted = (level or os.environ.get("AGGREGATOR_LOG_LEVEL", "INFO")).strip().upper()
    logger.setLevel(wanted if wanted in logging.getLevelNamesMapping() else logging.INFO)
    logger.propagate = False
