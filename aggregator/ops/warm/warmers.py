"""Running warm targets: how many at once, how fast, how patiently, and where each one goes.

A target runs through a `Warmer`: `HttpWarmer` asks a running deployment (`POST /admin/warm`,
so the servers' own single-flight and cache do the work), `DirectWarmer` fills a shared cache
from this process. Failed targets are retried with exponential backoff and jitter (tenacity);
partial and skipped ones never are, since another attempt cannot make them fresher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from aggregator.cache.results import WarmResult
from aggregator.errors import AggregatorError, NotWarmableError, WarmError
from aggregator.ops.http import describe_http_error
from aggregator.ops.warm.report import RunReport, TargetReport
from aggregator.ops.warm.targets import Target

if TYPE_CHECKING:
    from aggregator.cache import AggregateCache

logger = logging.getLogger(__name__)

_RESULTS = ("warmed", "partial", "failed", "skipped")  # what a warm can answer


class _RefusedError(AggregatorError):
    """The server refused this one target (400/404): failed, and retrying cannot help."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"the server refused the target ({status}): {message}")


class Warmer(Protocol):
    """Warms one target somewhere (a running deployment, or a cache from this process)."""

    async def warm(self, target: Target, only_missing: bool) -> WarmResult: ...


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How targets are run: parallelism, pace, patience and retries."""

    concurrency: int = 4
    rate: float | None = None  # attempts per second, evenly spaced; None: unlimited
    timeout: float = 30.0  # per attempt
    retries: int = 2  # extra attempts for a failed target (partial and skipped never)
    backoff: float = 0.5  # first retry's delay in seconds; doubles each time, plus jitter
    only_missing: bool = False


async def warm_targets(
    targets: Sequence[Target],
    warmer: Warmer,
    options: RunOptions,
    *,
    on_done: Callable[[TargetReport], None] = lambda _: None,
    stop: asyncio.Event | None = None,
) -> RunReport:
    """Warm `targets` with `warmer`; setting `stop` cancels what has not finished.

    NotWarmableError from the warmer (the deployment refuses everything) ends the run at once.
    """
    reports = [TargetReport(t) for t in targets]
    queue = deque(reports)
    # One attempt every 1/rate s, no burst: warming should be a steady trickle, not a spike.
    limiter = AsyncLimiter(1, 1 / options.rate) if options.rate else None
    started = time.monotonic()

    async def attempt(report: TargetReport) -> WarmResult:
        if limiter is not None:
            await limiter.acquire()
        report.attempts += 1
        began = time.perf_counter()
        try:
            async with asyncio.timeout(options.timeout):
                return await warmer.warm(report.target, options.only_missing)
        except TimeoutError:
            return WarmResult("failed", detail=f"timed out after {options.timeout:g} s")
        except _RefusedError as exc:
            report.refused = True
            return WarmResult("failed", exc.status, detail=str(exc))
        except WarmError:
            raise
        except Exception as exc:  # one target's surprise must not stop a long run
            logger.exception("warming %s failed", report.target.label)
            return WarmResult("failed", detail=f"{type(exc).__name__}: {exc}")
        finally:
            report.ms += (time.perf_counter() - began) * 1000

    async def run_one(report: TargetReport) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(options.retries + 1),
            wait=wait_exponential(multiplier=options.backoff, max=30)
            + wait_random(0, options.backoff),
            retry=retry_if_result(lambda r: r.outcome == "failed" and not report.refused),
            retry_error_callback=_last_result,
        )
        result: WarmResult = await retrying(attempt, report)
        report.outcome = result.outcome
        report.status = result.status
        report.sources_failed = result.sources_failed
        report.detail = result.detail
        on_done(report)

    async def worker() -> None:
        while queue:
            await run_one(queue.popleft())

    workers = [asyncio.create_task(worker()) for _ in range(min(options.concurrency, len(queue)))]
    stopper = asyncio.create_task(stop.wait()) if stop is not None else None
    try:
        pending: set[asyncio.Task[Any]] = set(workers)
        while pending and not (stop is not None and stop.is_set()):
            watched = pending | {stopper} if stopper is not None else pending
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            pending -= done
            for task in done - {stopper}:
                task.result()  # WarmError: the deployment refuses every target
    finally:
        extra = [stopper] if stopper is not None else []
        for task in [*workers, *extra]:
            task.cancel()
        await asyncio.gather(*workers, *extra, return_exceptions=True)
    for report in reports:
        if report.outcome == "not_run" and report.attempts:
            report.detail = "interrupted"
    return RunReport(reports, elapsed_s=time.monotonic() - started)


def _last_result(state: RetryCallState) -> WarmResult:
    """Out of attempts: the last attempt's result, not tenacity's RetryError."""
    assert state.outcome is not None
    result: WarmResult = state.outcome.result()
    return result


class DirectWarmer:
    """Warms through this process's `AggregateCache` (a shared backend only)."""

    def __init__(self, service: AggregateCache) -> None:
        self.service = service

    async def warm(self, target: Target, only_missing: bool) -> WarmResult:
        """`AggregateCache.warm`: a forced refresh through the live single-flight."""
        return await self.service.warm(target.aggregate, target.params, only_missing=only_missing)


class HttpWarmer:
    """Warms through a running deployment's `POST /admin/warm`."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url

    async def check_reachable(self) -> None:
        """Fail early, before any target, when nothing answers at the URL."""
        try:
            await self.client.get("healthz", timeout=10)
        except httpx.HTTPError as exc:
            raise NotWarmableError(f"cannot reach {self.url}: {describe_http_error(exc)}") from None

    async def warm(self, target: Target, only_missing: bool) -> WarmResult:
        """One POST; 401, 409 and a 404 for disabled admin endpoints raise NotWarmableError (they
        hold for every target); a 404 naming a `field` is this target's unknown name."""
        body = {"aggregate": target.aggregate, "params": target.params}
        try:
            response = await self.client.post(
                "admin/warm", json={**body, "only_missing": only_missing}
            )
        except httpx.HTTPError as exc:
            return WarmResult("failed", detail=f"{self.url}: {describe_http_error(exc)}")
        answer = _json_object(response)
        message = str(answer.get("message") or response.reason_phrase)
        if response.status_code == 404 and "field" not in answer:
            raise NotWarmableError(f"{self.url} has its admin endpoints disabled ({message})")
        if response.status_code == 401:
            raise NotWarmableError(
                f"{self.url} refused the admin token ({message}): set AGGREGATOR_ADMIN_TOKEN to "
                "the token the servers were started with"
            )
        cache = answer.get("cache")
        if response.status_code == 409 or (
            isinstance(cache, dict) and cache.get("shared") is False
        ):
            raise NotWarmableError(f"{self.url} is not warmable: {message}")
        if response.status_code in (400, 404):
            raise _RefusedError(response.status_code, message)
        outcome = answer.get("outcome")
        if response.status_code != 200 or outcome not in _RESULTS:
            return WarmResult(
                "failed", detail=f"{self.url} answered {response.status_code}: {message}"
            )
        status, sources = answer.get("status"), answer.get("sources_failed")
        return WarmResult(
            outcome,
            status if isinstance(status, int) else None,
            tuple(str(s) for s in sources) if isinstance(sources, list) else (),
            str(answer.get("detail") or ""),
        )


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
