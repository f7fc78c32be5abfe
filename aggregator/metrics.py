"""Prometheus metrics: what is recorded, the cheap calls that record it, and the exposition.

Recording is on when something can read it: `AGGREGATOR_METRICS=public`, an admin token
(`token`, the default: `/metrics` needs it), or a separate listener (`AGGREGATOR_METRICS_BIND`).
Otherwise, and always with `off`, the app gets `OFF`, whose methods do nothing, and no metric
object is even created: the hot path then pays one no-op call per hook.

Hot path: every label combination an app will use is bound when the app is built (`.labels()`
costs far more than a bound child's `inc`, in multiprocess mode too), so a cache
hit records its request, latency, cache result and in-flight count with a few dict lookups.

Several workers: prometheus_client's multiprocess mode, which it chooses when it is imported from
`PROMETHEUS_MULTIPROC_DIR` (so the variable must be set before a worker starts; `aggregator serve`
manages a private directory, see `ops.metrics_server`). Each worker writes its own mmap files and
any worker's `/metrics` merges them all: counters and histograms are summed, in-flight is
`livesum`, circuit state `livemax` (each worker has its own breakers; a state's series is 1 when
any live worker's breaker is in it). Hypercorn has no worker-exit hook, so a worker marks itself
dead at lifespan shutdown (its live gauges leave the merge); a worker that dies without a shutdown
exits non-zero, which makes Hypercorn stop every worker, and the next `aggregator serve` starts
from an empty directory. Metric objects are created lazily, once per process, after that check, so
a bad directory is a start-up message, not an import-time traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from aggregator.errors import ConfigError
from aggregator.models import HedgeOutcome, SourceResult, SourceStatus

if TYPE_CHECKING:
    from aggregator.config import AppConfig
    from aggregator.resilience import BreakerState
    from aggregator.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds: a cache hit lands in the first bucket, a source's timeout (<= 30 s typical) in range.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: The breaker states, each one 0/1 series of `aggregator_circuit_state` per source.
CIRCUIT_STATES: tuple[BreakerState, ...] = ("closed", "half_open", "open")
#: X-Cache values counted, as they are labelled.
CACHE_RESULTS = {"HIT": "hit", "STALE": "stale", "MISS": "miss", "BYPASS": "bypass"}
#: Statuses bound up front, so their series exist (at 0) before the first such answer.
_STATUSES = (200, 304, 400, 502, 504)
#: Kinds that never reached the upstream: counted as errors, kept out of its latency.
REFUSED_KINDS = frozenset({"circuit_open", "overloaded", "dependency", "auth"})
ERROR_KINDS = tuple(kind for kind in get_args(SourceStatus) if kind != "ok")
HEDGE_OUTCOMES: tuple[HedgeOutcome, ...] = get_args(HedgeOutcome)
#: Status recorded for a request whose client left before the answer (nginx's convention).
CLIENT_LEFT = 499


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, when it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def recording(settings: Settings) -> bool:
    """Whether anything can read the metrics, hence whether to record them at all."""
    if settings.metrics == "off":
        return False
    return (
        settings.metrics == "public"
        or settings.metrics_bind is not None
        or bool(settings.admin_secret())
    )


@dataclass(frozen=True, slots=True)
class _Families:
    requests: Counter
    request_seconds: Histogram
    in_flight: Gauge
    source_seconds: Histogram
    source_errors: Counter
    cache_results: Counter
    coalesced: Counter
    circuit: Gauge
    hedges: Counter
    shared_up: Gauge
    shared_failures: Counter


@functools.cache
def _families() -> _Families:
    """The metrics of this process, created on first use (see the module docstring)."""
    # The `_created` series double the output and mean little here. (This corner of
    # prometheus_client is untyped.)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return _Families(
        requests=Counter(
            "aggregator_requests",
            "Aggregate requests answered, by HTTP status (499: the client left first).",
            ["aggregate", "status"],
        ),
        request_seconds=Histogram(
            "aggregator_request_duration_seconds",
            "Time from a request's arrival to its answer, per aggregate.",
            ["aggregate"],
            buckets=BUCKETS,
        ),
        in_flight=Gauge(
            "aggregator_requests_in_flight",
            "Aggregate requests being answered now.",
            multiprocess_mode="livesum",
        ),
        source_seconds=Histogram(
            "aggregator_source_duration_seconds",
            "Upstream calls per source and their time, retries included (source-cache hits "
            "and refused calls excluded).",
            ["source"],
            buckets=BUCKETS,
        ),
        source_errors=Counter(
            "aggregator_source_errors",
            "Failed source results by error kind (circuit_open, overloaded, dependency, auth: "
            "not called).",
            ["source", "kind"],
        ),
        cache_results=Counter(
            "aggregator_cache_results",
            "Answers of cached aggregates by cache result (their X-Cache).",
            ["aggregate", "result"],
        ),
        coalesced=Counter(
            "aggregator_coalesced_waiters",
            "Fan-outs not started because one for the same key was under way: requests that "
            "joined this worker's fill (scope=worker), fills that waited for another "
            "process's (scope=shared).",
            ["aggregate", "scope"],
        ),
        circuit=Gauge(
            "aggregator_circuit_state",
            "Circuit breaker per source: 1 for the state it is in, 0 for the others (with "
            "several workers, 1 when any live worker's breaker is in that state).",
            ["source", "state"],
            multiprocess_mode="livemax",
        ),
        hedges=Counter(
            "aggregator_hedges",
            "Hedged calls per source by outcome: first_won, hedge_won, both_failed (a second "
            "request was sent), refused (due, but the bulkhead, retry budget or breaker said no).",
            ["source", "outcome"],
        ),
        shared_up=Gauge(
            "aggregator_shared_resilience_up",
            "1 while the shared resilience state (AGGREGATOR_SHARED_RESILIENCE=redis) answers "
            "and breakers and limits are fleet-wide, 0 while workers decide alone (with "
            "several workers, the lowest live worker's).",
            multiprocess_mode="livemin",
        ),
        shared_failures=Counter(
            "aggregator_shared_resilience_failures",
            "Times the shared resilience state became unavailable (workers then fail open to "
            "their own breakers and limits).",
        ),
    )


class Recorder:
    """The hooks the serving path calls; this base records nothing (metrics off)."""

    enabled = False

    def routes(self) -> dict[str, AggregateRecorder]:
        """Aggregate path -> its recorder, for the adapter (empty: nothing to time)."""
        return {}

    def cache_result(self, aggregate: str, x_cache: str) -> None:
        """One answer of a cached aggregate, by its X-Cache value (HIT, STALE, MISS, BYPASS)."""

    def coalesced(self, aggregate: str, scope: str) -> None:
        """A fan-out not started because one for the key was under way (worker | shared)."""

    def sources(self, results: Iterable[SourceResult]) -> None:
        """One fan-out's source results."""

    def circuit_listener(self, source: str) -> Callable[[BreakerState], None] | None:
        """What a source's circuit breaker calls when its state changes."""
        return None

    def shared_state(self, up: bool) -> None:
        """The shared resilience state became usable (True) or not (False)."""


OFF = Recorder()


class AggregateRecorder:
    """One aggregate's request metrics, bound once; the adapter calls `start` and `done`."""

    __slots__ = ("_family", "_in_flight", "_name", "_seconds", "_statuses")

    def __init__(self, name: str, families: _Families) -> None:
        self._name = name
        self._family = families.requests
        self._in_flight = families.in_flight
        self._seconds = families.request_seconds.labels(name)
        self._statuses = {s: self._family.labels(name, str(s)) for s in _STATUSES}

    def start(self) -> None:
        self._in_flight.inc()

    def done(self, status: int, seconds: float) -> None:
        self._in_flight.dec()
        child = self._statuses.get(status)
        if child is None:  # a rarer status (413, 500, 499...): bound once, on first sight
            child = self._statuses[status] = self._family.labels(self._name, str(status))
        child.inc()
        self._seconds.observe(seconds)


class PrometheusRecorder(Recorder):
    """Records into prometheus_client's metrics, every child bound for `config` up front."""

    enabled = True

    def __init__(self, config: AppConfig) -> None:
        families = _families()
        aggregates = config.aggregates
        self._routes = {agg.path: AggregateRecorder(n, families) for n, agg in aggregates.items()}
        results = families.cache_results
        self._cache = {
            name: {how: results.labels(name, label) for how, label in CACHE_RESULTS.items()}
            for name, agg in aggregates.items()
            if agg.cache_ttl > 0 or agg.cache_partial_ttl is not None
        }
        self._coalesced = {
            name: {s: families.coalesced.labels(name, s) for s in ("worker", "shared")}
            for name in config.aggregates
        }
        self._seconds = {name: families.source_seconds.labels(name) for name in config.upstreams}
        self._errors = {
            name: {kind: families.source_errors.labels(name, kind) for kind in ERROR_KINDS}
            for name in config.upstreams
        }
        self._circuits = {
            name: {state: families.circuit.labels(name, state) for state in CIRCUIT_STATES}
            for name in config.upstreams
        }
        for gauges in self._circuits.values():
            for state, gauge in gauges.items():  # every breaker starts closed, every series
                gauge.set(1 if state == "closed" else 0)  # exists from the start
        self._hedges = {
            name: {how: families.hedges.labels(name, how) for how in HEDGE_OUTCOMES}
            for name, up in config.upstreams.items()
            if up.hedge_after is not None
        }

    def routes(self) -> dict[str, AggregateRecorder]:
        return dict(self._routes)

    def cache_result(self, aggregate: str, x_cache: str) -> None:
        try:
            self._cache[aggregate][x_cache].inc()
        except KeyError:  # an aggregate this recorder was not built for (not served here)
            logger.debug("no cache metrics for %s/%s", aggregate, x_cache)

    def coalesced(self, aggregate: str, scope: str) -> None:
        try:
            self._coalesced[aggregate][scope].inc()
        except KeyError:
            logger.debug("no coalescing metrics for %s/%s", aggregate, scope)

    def sources(self, results: Iterable[SourceResult]) -> None:
        for result in results:
            if result.cache == "hit":
                continue  # answered from the source cache: no upstream call to count
            name, kind = result.name, result.status
            seconds = self._seconds.get(name)
            if seconds is None:
                continue
            if kind not in REFUSED_KINDS:
                seconds.observe(result.ms / 1000)
            if kind != "ok":
                self._errors[name][kind].inc()
            if result.hedge is not None and name in self._hedges:
                self._hedges[name][result.hedge].inc()

    def circuit_listener(self, source: str) -> Callable[[BreakerState], None] | None:
        gauges = self._circuits.get(source)
        if gauges is None:
            return None

        def changed(state: BreakerState) -> None:
            for each, gauge in gauges.items():
                gauge.set(1 if each == state else 0)

        return changed

    def shared_state(self, up: bool) -> None:
        families = _families()
        families.shared_up.set(1 if up else 0)
        if not up:
            families.shared_failures.inc()


def check_multiprocess(settings: Settings) -> None:
    """Several workers need the multiprocess directory, or each would report only itself."""
    path = multiprocess_dir()
    if path is None:
        if settings.workers > 1:
            raise ConfigError(
                "environment",
                [
                    f"metrics with {settings.workers} workers need PROMETHEUS_MULTIPROC_DIR: "
                    "set it to an empty directory private to this server (emptied before each "
                    "start), run `aggregator serve` (which manages one), or set "
                    "AGGREGATOR_METRICS=off"
                ],
            )
        return
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        raise ConfigError(
            "environment",
            [f"PROMETHEUS_MULTIPROC_DIR={path} is not a writable directory"],
        )


def build_recorder(settings: Settings, config: AppConfig) -> Recorder:
    """The recorder for one process: OFF unless something can read the metrics."""
    if not recording(settings):
        return OFF
    check_multiprocess(settings)
    listener = os.environ.get("AGGREGATOR_METRICS_LISTENER")
    if settings.metrics_bind is not None and listener != settings.metrics_bind:
        logger.warning(
            "AGGREGATOR_METRICS_BIND=%s is opened by `aggregator serve` only; this process "
            "was started otherwise: scrape /metrics on the main port instead",
            settings.metrics_bind,
        )
    return PrometheusRecorder(config)


async def forget_process() -> None:
    """At a worker's shutdown: remove only this pid's live-gauge files (its counters stay in
    the sums). File I/O: off the loop, like every other blocking call."""
    path = multiprocess_dir()
    if path is not None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, multiprocess.mark_process_dead, os.getpid(), path)


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of this process, or of every worker in multiprocess mode.

    Reads the workers' files in multiprocess mode: blocking, so call it off the event loop.
    """
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_PLAIN_0_0_4
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
