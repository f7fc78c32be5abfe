"""Cache warming for operators: fill aggregate entries before traffic asks for them.

Targets (an aggregate and its parameters) come from the config's `warm` lists, a targets file
or the command line, all validated before the first is warmed (`warm_targets`); what the run
shows is `warm_report`'s.

Two ways to warm: through a running deployment (`POST /admin/warm`, so the servers' own
single-flight and cache do the work), or directly, by building the app as a server would and
filling the shared cache (filesystem, Redis) from this process. A per-process cache (simple) or
no cache (null) cannot be warmed either way: the servers never read what we would fill.

Targets run `concurrency` at a time, at most `rate` attempts per second, each attempt bounded by
`timeout`; failed targets are retried with exponential backoff and jitter. SIGINT/SIGTERM stop
the run cleanly: pending targets are cancelled and reported as not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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

from aggregator.cache import AggregateCache
from aggregator.cache.service import WarmResult
from aggregator.config import AppConfig, load_config
from aggregator.errors import AggregatorError, NotWarmableError, WarmError
from aggregator.settings import Settings
from aggregator.warm_report import (
    Reporter,
    RunReport,
    TargetReport,
    check_json_path,
    choose_reporter,
    plural,
    write_json,
)
from aggregator.warm_targets import Target, collect_targets

logger = logging.getLogger(__name__)

_RESULTS = ("warmed", "partial", "failed", "skipped")  # what a warm can answer


class _RefusedError(AggregatorError):
    """The server refused this one target (400/404): failed, and retrying cannot help."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"the server refused the target ({status}): {message}")


# -- running ------------------------------------------------------------------------------------


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


def describe_http_error(exc: httpx.HTTPError) -> str:
    """One line for a failed HTTP call (also `aggregator status`'s)."""
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({exc or type(exc).__name__})"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


# -- the command --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WarmRequest:
    """Everything `aggregator warm` was asked to do."""

    aggregate: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    all_targets: bool = False
    targets_file: Path | None = None
    url: str | None = None
    token: str | None = None
    config_file: Path | None = None
    options: RunOptions = RunOptions()
    dry_run: bool = False
    json_path: str | None = None  # "-": stdout, and no other output there


def run(request: WarmRequest) -> int:
    """Validate every target, warm them (or show them, dry run), report; the exit code.

    Raises WarmError (or ConfigError) for anything that stops the run before it starts.
    """
    settings = Settings() if request.config_file is None else Settings(config=request.config_file)
    config = load_config(settings.config)
    source = str(settings.config) if settings.config else "the bundled demo config"
    targets, dropped = collect_targets(
        config,
        aggregate=request.aggregate,
        params=request.params,
        all_targets=request.all_targets,
        targets_file=request.targets_file,
        config_source=source,
    )
    try:
        check_json_path(request.json_path)
    except ValueError as exc:
        raise WarmError(str(exc)) from None
    human = sys.stderr if request.json_path == "-" else sys.stdout
    where = _check_mode(request, settings)
    duplicates = f" ({plural(dropped, 'duplicate')} warmed once)" if dropped else ""
    what = plural(len(targets), "target") + duplicates
    if request.dry_run:
        for target in targets:
            print(f"would warm {target.label}", file=human)
        print(f"dry run: {what} would be warmed {where}; nothing contacted", file=human)
        result = RunReport([TargetReport(t) for t in targets], dry_run=True)
        write_json(result, request.json_path)
        return 0
    reporter = choose_reporter(human)
    reporter.start(len(targets), f"warming {what} {where}")
    try:
        if request.url is not None:
            result = asyncio.run(
                _with_signals(lambda stop: _run_http(request, targets, reporter, stop))
            )
        else:
            result = _run_direct(settings, config, targets, request.options, reporter)
    except BaseException:
        reporter.abandon()  # give the terminal back before the error is printed
        raise
    reporter.finish(result)
    try:
        write_json(result, request.json_path)
    except OSError as exc:
        raise WarmError(f"--json {request.json_path}: cannot write the report: {exc}") from None
    return result.exit_code()


def _check_mode(request: WarmRequest, settings: Settings) -> str:
    """Refuse what cannot work before anything runs; how the run will warm, for the header."""
    if request.url is not None:
        try:
            url = httpx.URL(request.url)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise WarmError(f"--url must look like http://host:8000, got {request.url!r}")
        if not request.token and not request.dry_run:
            raise NotWarmableError(
                "set AGGREGATOR_ADMIN_TOKEN to the servers' admin token to warm through --url"
            )
        return f"through {request.url}"
    if settings.cache_type in ("simple", "null"):
        raise NotWarmableError(_per_process(settings.cache_type))
    return f"directly in the {settings.cache_type} cache"


def _per_process(cache_type: str) -> str:
    what = (
        "caches nothing"
        if cache_type == "null"
        else "is a per-process cache: it lives inside each server, out of this command's reach"
    )
    return (
        f"cache_type={cache_type!r} {what}, so it is not warmable. Run this command with the "
        "servers' AGGREGATOR_CACHE_* settings for a shared cache (filesystem, redis), or use "
        "--url against servers that use one."
    )


async def _run_http(
    request: WarmRequest, targets: Sequence[Target], reporter: Reporter, stop: asyncio.Event
) -> RunReport:
    assert request.url is not None
    options = request.options
    url = request.url.rstrip("/") + "/"
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {request.token}"},
        # asyncio.timeout bounds each attempt; this only keeps a dead connect from hanging
        timeout=httpx.Timeout(None, connect=min(10.0, options.timeout)),
        limits=httpx.Limits(max_connections=options.concurrency),
        trust_env=False,  # like every client here: no proxy gets to see the admin token
    ) as client:
        warmer = HttpWarmer(client, request.url)
        await warmer.check_reachable()
        return await warm_targets(targets, warmer, options, on_done=reporter.done, stop=stop)


def _run_direct(
    settings: Settings,
    config: AppConfig,
    targets: Sequence[Target],
    options: RunOptions,
    reporter: Reporter,
) -> RunReport:
    """Build the engine as a server would, then warm its shared cache on one loop."""
    from aggregator.engine import Engine

    # Blocking set-up (backend clients), before the loop. Metrics off: this process is not a
    # server (its numbers would be nobody's, or land in the servers' multiprocess directory).
    engine = Engine.build(settings.model_copy(update={"metrics": "off"}), config)
    if not engine.store.shared:
        engine.close()
        raise NotWarmableError(_per_process(settings.cache_type))

    async def direct(stop: asyncio.Event) -> RunReport:
        # As the lifespan does for a worker: one pooled client on this loop for every fill,
        # the cache's start/stop (stop cancels leftover fills, closes the store).
        async with engine.running():
            warmer = DirectWarmer(engine.cache)
            return await warm_targets(targets, warmer, options, on_done=reporter.done, stop=stop)

    try:
        return asyncio.run(_with_signals(direct))
    finally:
        engine.close()


async def _with_signals(body: Callable[[asyncio.Event], Awaitable[RunReport]]) -> RunReport:
    """Run `body(stop)` with SIGINT/SIGTERM setting `stop`; a second signal is not caught."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def interrupt(signum: int) -> None:
        received.append(signum)
        stop.set()
        loop.remove_signal_handler(signum)  # a second Ctrl-C stops at once

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, interrupt, signum)
            installed.append(signum)
    try:
        report = await body(stop)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    if received:
        report.interrupted_by = received[0]
    return report
