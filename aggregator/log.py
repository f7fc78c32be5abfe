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

A filter stamps every record with the request id of the context it was logged in
(`aggregator.context.request_id`), so lines of one request can be found together. Records are
then handed to a queue and written to stderr by one `QueueListener` thread: a write to a full
pipe or a slow terminal blocks, and logging runs on the event loop (the access line is one per
request), where blocking I/O must never happen. Filters run only for records that pass the
level, so a disabled level costs nothing beyond the caller's `isEnabledFor` check.
Hypercorn's own error log is configured in hypercorn.toml and keeps its format; its access log
is off, replaced by our per-request line (`aggregator.access`), which knows the request id and
the cache state.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import queue
from logging.handlers import QueueHandler, QueueListener

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


class _Enqueue(QueueHandler):
    """Hands records to the writer thread as they are, message merged (args may change later).

    The stock `prepare` also renders the exception into the message and drops `exc_info`,
    which would turn the JSON format's separate `exc_info` field into text in `message`.
    """

    listener: _Writer

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        return record


class _Writer(QueueListener):
    """The thread that writes queued records; stopping twice (tests, then atexit) is fine."""

    _stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            super().stop()


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


def _queued(handler: logging.Handler) -> logging.Handler:
    """`handler` behind a queue: callers only enqueue, one thread formats and writes."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    front = _Enqueue(records)
    for found in list(handler.filters):  # the request id must be read in the caller's context
        handler.removeFilter(found)  # moved, not copied: once per record is enough
        front.addFilter(found)
    listener = _Writer(records, handler, respect_handler_level=True)
    front.listener = listener
    listener.start()
    atexit.register(listener.stop)  # writes what is still queued before the process ends
    return front


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Install the handler on `aggregator` once; level and format default to the environment.

    Unknown values fall back to INFO and text here; the app's `Settings` then refuses them
    with a readable start-up error (this runs before settings are read).
    """
    logger = logging.getLogger("aggregator")
    if any(isinstance(h, _Enqueue) for h in logger.handlers):
        return  # others' handlers (a test runner's capture) are no reason to skip ours
    fmt = (fmt or os.environ.get("AGGREGATOR_LOG_FORMAT", "text")).strip().lower()
    logger.addHandler(_queued(build_handler(fmt)))
    wanted = (level or os.environ.get("AGGREGATOR_LOG_LEVEL", "INFO")).strip().upper()
    logger.setLevel(wanted if wanted in logging.getLevelNamesMapping() else logging.INFO)
    logger.propagate = False
