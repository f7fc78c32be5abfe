"""What `aggregator serve` does for metrics: the multiprocess directory and the separate listener.

Hypercorn serves the app from spawned worker processes (even with one worker), and each keeps
its numbers in its own memory unless prometheus_client's multiprocess mode is on. So when the
numbers must be merged (several workers) or read from outside the workers (the listener of
AGGREGATOR_METRICS_BIND, which runs here, in the parent), this sets PROMETHEUS_MULTIPROC_DIR
before the workers start: a private temporary directory, removed at exit, or the operator's
own, emptied of earlier runs' files first (stale files of dead processes would be summed in).

The listener is prometheus_client's own WSGI server in a daemon thread of this process, reading
the workers' files at each scrape. One worker is served in this process itself: then there are
no files, and the listener reads this process's own registry. It cannot live in a
worker: every worker would try to bind it, and a Hypercorn app cannot add a second bind of its
own. Plain `hypercorn asgi:app` has no parent of ours, so it gets no listener (a worker logs a
warning when the setting asks for one); `/metrics` on the main port works there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server

from aggregator import metrics
from aggregator.errors import ConfigError
from aggregator.settings import Settings, split_bind

ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Tells the workers the listener of AGGREGATOR_METRICS_BIND is open (so they do not warn).
LISTENER_ENV = "AGGREGATOR_METRICS_LISTENER"


@contextlib.contextmanager
def prepared(settings: Settings, workers: int) -> Iterator[str | None]:
    """Around Hypercorn's run: the directory the workers share (None: not needed) and listener."""
    given = os.environ.get(ENV) or None
    if not metrics.recording(settings) or (workers == 1 and given is None):
        # One worker answers /metrics from its own memory, and is served in this very process
        # (`ops.serve.run_server`): the listener reads that memory too. (Multiprocess mode
        # cannot be turned on here any more: prometheus_client chose its value class when this
        # module imported it, so the worker would keep recording in memory.)
        with _listener(settings.metrics_bind if metrics.recording(settings) else None, None):
            yield None
        return
    if given is not None:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        _empty(path)
    else:
        path = Path(tempfile.mkdtemp(prefix="aggregator-metrics-"))
        os.environ[ENV] = str(path)
    try:
        with _listener(settings.metrics_bind, path):
            yield str(path)
    finally:
        if given is None:
            del os.environ[ENV]
            shutil.rmtree(path, ignore_errors=True)


def listening() -> bool:
    """Whether the listener of AGGREGATOR_METRICS_BIND is open (inside `prepared`)."""
    return LISTENER_ENV in os.environ


def _empty(path: Path) -> None:
    """Drop earlier runs' files (only prometheus_client's `*.db`: the rest is not ours)."""
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def _listener(bind: str | None, path: Path | None) -> Iterator[None]:
    """The listener on `bind`, reading the workers' files in `path` (None: this process)."""
    if bind is None:
        yield
        return
    host, port = split_bind(bind)
    if path is None:
        registry = REGISTRY
    else:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            "AGGREGATOR_METRICS_BIND", [f"cannot listen on {bind}: {exc.strerror or exc}"]
        ) from None
    os.environ[LISTENER_ENV] = bind
    try:
        yield
    finally:
        del os.environ[LISTENER_ENV]
        server.shutdown()
        server.server_close()
        thread.join(5)
