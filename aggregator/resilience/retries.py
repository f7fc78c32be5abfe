"""The retry policy: which failed attempts are tried again, how long to wait, when to stop.

Retries only for idempotent calls (every upstream call is a GET) that failed in a way a new
attempt can fix: `connect` and HTTP 502/503/504. A `timeout` is not retried: the attempt already
used the time a retry would need. Every attempt runs inside the source's own `timeout` (the
retries share it, so a retried source answers no later than before), and a retry starts only if,
after its backoff, at least a quarter of that timeout is left before the source's end and the
aggregate deadline: an attempt with no time to finish is only load. Backoff is exponential with
full jitter (tenacity's `wait_random_exponential`): retry k waits uniform(0, base x 2^(k-1)).
tenacity drives the loop; the first attempt runs before tenacity is involved (its per-call
set-up is a noticeable share of a call's CPU, docs/benchmarks.md, so successes skip it).
"""

from __future__ import annotations

from collections.abc import Callable

from tenacity import RetryCallState, retry_if_result
from tenacity import wait_random_exponential as _full_jitter

from aggregator.models import SourceResult
from aggregator.resilience.breaker import CircuitBreaker
from aggregator.resilience.budget import Clock, RetryBudget

#: Statuses a new attempt can fix (gateway trouble, a restarting or overloaded upstream).
RETRIABLE_STATUSES = frozenset({502, 503, 504})
#: A retry needs at least this share of the source's timeout left after its backoff.
MIN_ATTEMPT_SHARE = 0.25


def is_retriable(result: SourceResult) -> bool:
    """Worth another attempt: a connection failure or a gateway-type status."""
    if result.status == "connect":
        return True
    return result.status == "http_status" and result.upstream_status in RETRIABLE_STATUSES


class _Backoff:
    """Full-jitter exponential waits, drawn once per attempt so `stop` and tenacity agree."""

    def __init__(self, base: float, cap: float) -> None:
        self._jitter = _full_jitter(multiplier=base, max=cap)
        self._drawn: dict[int, float] = {}

    def __call__(self, state: RetryCallState) -> float:
        number = state.attempt_number
        if number not in self._drawn:
            self._drawn[number] = self._jitter(state)
        return self._drawn[number]


#: tenacity's `retry`: another attempt only for a result worth one.
RETRY_IF_RETRIABLE = retry_if_result(is_retriable)


def last_result(state: RetryCallState) -> SourceResult:
    """Out of retries: the last attempt's own result (its real error kind), not a RetryError."""
    assert state.outcome is not None
    result: SourceResult = state.outcome.result()
    return result


def plan(
    *,
    retries: int,
    backoff: float,
    timeout: float,
    end: float,
    deadline: float | None,
    clock: Clock,
    breaker: CircuitBreaker,
    budget: RetryBudget,
) -> tuple[Callable[[RetryCallState], bool], _Backoff]:
    """tenacity's `stop` and `wait` for one call that ends at `end` (or `deadline`)."""
    wait = _Backoff(backoff, timeout)
    window_end = end if deadline is None else min(end, deadline)
    min_attempt = MIN_ATTEMPT_SHARE * timeout

    def stop(state: RetryCallState) -> bool:
        # Cheap checks first; the budget is last because taking a retry from it is final.
        if state.attempt_number > retries or breaker.state != "closed":
            return True
        if window_end - (clock() + wait(state)) < min_attempt:
            return True
        return not budget.try_retry()

    return stop, wait
