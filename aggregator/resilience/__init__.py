"""Per-upstream protection, per worker process: budgeted retries, a circuit breaker, a bulkhead.

Each upstream gets one `UpstreamGuard` per worker process (the app builds a `Guards` registry
from its config). Its state lives in that process only: with N workers an upstream sees N
breakers that open on their own, N budgets and N concurrency limits (see README, Resilience),
unless `AGGREGATOR_SHARED_RESILIENCE=redis` makes breakers and limits fleet-wide (`shared`, with
the breaker behind the usual interface in `fleet`), failing open to this local state.
The state machines are plain objects with an injected clock and no I/O, so tests drive them on
a fake clock; `upstream.fetch` supplies the attempt (one HTTP call) and `UpstreamGuard.call`
decides whether it runs, how often, and what a refusal is.

One module per protection, each saying why it decides as it does: `retries` (what is retried,
backoff, when to stop), `budget`, `breaker`, `bulkhead`, `fallback`; `guard` applies them to a
call. The names other modules use are re-exported here.
"""

from __future__ import annotations

from aggregator.resilience.breaker import BreakerState, CircuitBreaker, is_upstream_failure
from aggregator.resilience.budget import RetryBudget
from aggregator.resilience.bulkhead import Bulkhead
from aggregator.resilience.fallback import with_fallback
from aggregator.resilience.guard import Guards, UpstreamGuard
from aggregator.resilience.retries import is_retriable

__all__ = [
    "BreakerState",
    "Bulkhead",
    "CircuitBreaker",
    "Guards",
    "RetryBudget",
    "UpstreamGuard",
    "is_retriable",
    "is_upstream_failure",
    "with_fallback",
]
