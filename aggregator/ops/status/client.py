"""A deployment's `/metrics`, scraped and reduced to what `aggregator status` shows.

Per source: how often it was needed, how often it failed and how (error kinds), its median and
95th-percentile call time, its circuit state. Per aggregate: requests by status, cache hit rate,
coalesced waiters, latency. Plus requests in flight. The numbers come from the same Prometheus
text a scraper reads (parsed with prometheus_client's parser), so the view and the dashboards
agree. Percentiles are estimated from histogram buckets the way PromQL's `histogram_quantile`
does (linear within the bucket). Watching, each view after the first covers only the interval
since the previous scrape (a counter that went backwards, i.e. a restart, shows totals again).
The command and its tables are in `ops.status.command`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from aggregator.errors import StatusError
from aggregator.metrics import REFUSED_KINDS
from aggregator.ops.http import describe_http_error

#: `aggregator_circuit_state`'s `state` labels as the view names them, best first: with several
#: workers each state's series is 1 when any live worker's breaker is in it, and the view shows
#: the worst. (The numbers: the gauge's values before it had one series per state.)
CIRCUIT_NAMES = {"closed": "closed", "half_open": "half-open", "open": "open"}
_OLD_CIRCUIT_VALUES = {0: "closed", 1: "half_open", 2: "open"}
_CIRCUIT_ORDER = list(CIRCUIT_NAMES)


@dataclass(slots=True)
class Buckets:
    """One histogram: cumulative counts per upper bound (`inf` last), as exposed."""

    bounds: dict[float, float] = field(default_factory=dict)
    total: float = 0.0

    def quantile(self, q: float) -> float | None:
        """Seconds below which `q` of the observations fall (None without observations)."""
        if self.total <= 0:
            return None
        rank = q * self.total
        lower, below = 0.0, 0.0
        for bound, cumulative in sorted(self.bounds.items()):
            if cumulative >= rank:
                if math.isinf(bound):
                    return lower  # past the last finite bucket: all we know is "at least"
                inside = cumulative - below
                share = (rank - below) / inside if inside else 1.0
                return lower + (bound - lower) * share
            lower, below = bound, cumulative
        return lower

    def minus(self, earlier: Buckets) -> Buckets:
        return Buckets(
            {b: n - earlier.bounds.get(b, 0.0) for b, n in self.bounds.items()},
            self.total - earlier.total,
        )


@dataclass(slots=True)
class SourceStats:
    calls: Buckets = field(default_factory=Buckets)
    errors: dict[str, float] = field(default_factory=dict)
    #: The breaker's state (`closed`, `half_open`, `open`; the worst worker's), None: unknown.
    circuit: str | None = None

    @property
    def requests(self) -> float:
        """Times a fan-out needed the source: calls made plus calls refused (breaker, limit)."""
        return self.calls.total + sum(n for k, n in self.errors.items() if k in REFUSED_KINDS)


@dataclass(slots=True)
class AggregateStats:
    statuses: dict[str, float] = field(default_factory=dict)
    latency: Buckets = field(default_factory=Buckets)
    cache: dict[str, float] = field(default_factory=dict)
    coalesced: float = 0.0

    @property
    def requests(self) -> float:
        return sum(self.statuses.values())


@dataclass(slots=True)
class Snapshot:
    """One scrape, reduced; `taken` is a monotonic time."""

    taken: float
    sources: dict[str, SourceStats] = field(default_factory=dict)
    aggregates: dict[str, AggregateStats] = field(default_factory=dict)
    in_flight: float = 0.0

    def since(self, earlier: Snapshot) -> Snapshot | None:
        """What happened between `earlier` and this one; None if a counter went back (restart)."""
        window = Snapshot(self.taken, in_flight=self.in_flight)
        for name, now in self.sources.items():
            was = earlier.sources.get(name, SourceStats())
            errors = {k: n - was.errors.get(k, 0.0) for k, n in now.errors.items()}
            window.sources[name] = SourceStats(now.calls.minus(was.calls), errors, now.circuit)
        for name, agg in self.aggregates.items():
            old = earlier.aggregates.get(name, AggregateStats())
            window.aggregates[name] = AggregateStats(
                {s: n - old.statuses.get(s, 0.0) for s, n in agg.statuses.items()},
                agg.latency.minus(old.latency),
                {r: n - old.cache.get(r, 0.0) for r, n in agg.cache.items()},
                agg.coalesced - old.coalesced,
            )
        counts = [
            n
            for s in window.sources.values()
            for n in (s.calls.total, *s.errors.values(), *s.calls.bounds.values())
        ] + [
            n
            for a in window.aggregates.values()
            for n in (*a.statuses.values(), *a.cache.values(), a.coalesced, a.latency.total)
        ]
        return None if any(n < 0 for n in counts) else window


def metrics_url(url: str) -> str:
    """The scrape URL: `/metrics` under a bare base URL, any other path as given."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    return str(parsed.copy_with(path="/metrics")) if parsed.path in ("", "/") else url


def fetch(url: str, token: str | None, *, timeout: float = 10.0) -> str:
    """The Prometheus text at `url`; StatusError with a one-line reason otherwise."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        raise StatusError(f"cannot reach {url}: {describe_http_error(exc)}") from None
    if response.status_code == 401:
        hint = "wrong token" if token else "no token given"
        raise StatusError(
            f"{url} answered 401 ({hint}): pass --token or set AGGREGATOR_ADMIN_TOKEN to the "
            "servers' admin token"
        )
    if response.status_code == 404:
        raise StatusError(
            f"{url} answered 404: metrics are not served there (no admin token set on the "
            "servers, AGGREGATOR_METRICS=off, or not an aggregator)"
        )
    if response.status_code != 200:
        raise StatusError(f"{url} answered {response.status_code} {response.reason_phrase}")
    return response.text


def parse(text: str, *, taken: float | None = None) -> Snapshot:
    """Reduce Prometheus text to a Snapshot; StatusError if it holds no aggregator metrics."""
    snapshot = Snapshot(time.monotonic() if taken is None else taken)
    seen = False
    try:
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as exc:
        raise StatusError(f"not Prometheus text: {exc}") from None
    for sample in samples:
        if sample.name.startswith("aggregator_"):
            seen = True
            _take(snapshot, sample.name, sample.labels, sample.value)
    if not seen:
        raise StatusError("the answer holds no aggregator metrics (is this an aggregator?)")
    return snapshot


def _take(snap: Snapshot, name: str, labels: dict[str, Any], value: float) -> None:
    source, aggregate = labels.get("source"), labels.get("aggregate")
    if name == "aggregator_requests_in_flight":
        snap.in_flight = value
    elif source is not None:
        stats = snap.sources.setdefault(source, SourceStats())
        if name == "aggregator_source_duration_seconds_bucket":
            stats.calls.bounds[float(labels["le"])] = value
        elif name == "aggregator_source_duration_seconds_count":
            stats.calls.total = value
        elif name == "aggregator_source_errors_total":
            stats.errors[labels["kind"]] = value
        elif name == "aggregator_circuit_state":
            state = labels.get("state")
            if state is None:  # a server from before one series per state
                state = _OLD_CIRCUIT_VALUES.get(int(value))
            elif value < 1:
                return
            if state in CIRCUIT_NAMES and (
                stats.circuit is None
                or _CIRCUIT_ORDER.index(state) > _CIRCUIT_ORDER.index(stats.circuit)
            ):
                stats.circuit = state
    elif aggregate is not None:
        agg = snap.aggregates.setdefault(aggregate, AggregateStats())
        if name == "aggregator_requests_total":
            agg.statuses[labels["status"]] = value
        elif name == "aggregator_request_duration_seconds_bucket":
            agg.latency.bounds[float(labels["le"])] = value
        elif name == "aggregator_request_duration_seconds_count":
            agg.latency.total = value
        elif name == "aggregator_cache_results_total":
            agg.cache[labels["result"]] = value
        elif name == "aggregator_coalesced_waiters_total":
            agg.coalesced += value
