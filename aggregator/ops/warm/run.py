"""`aggregator warm`'s run: validate every target, refuse what cannot work, warm, report.

Targets (an aggregate and its parameters) come from the config's `warm` lists, a targets file
or the command line, all validated before the first is warmed (`targets`); what the run shows
is `report`'s, how targets run is `warmers`'.

Two ways to warm: through a running deployment (`--url`), or directly, by building the engine
as a server would and filling the shared cache (filesystem, Redis) from this process. A
per-process cache (simple) or no cache (null) cannot be warmed either way: the servers never
read what we would fill. SIGINT/SIGTERM stop the run cleanly: pending targets are cancelled and
reported as not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from aggregator.config import AppConfig, load_config
from aggregator.errors import NotWarmableError, WarmError
from aggregator.ops.options import app_engine
from aggregator.ops.warm.report import (
    Reporter,
    RunReport,
    TargetReport,
    check_json_path,
    choose_reporter,
    plural,
    write_json,
)
from aggregator.ops.warm.targets import Target, collect_targets
from aggregator.ops.warm.warmers import DirectWarmer, HttpWarmer, RunOptions, warm_targets
from aggregator.settings import Settings

if TYPE_CHECKING:
    from aggregator.engine import Engine


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
    app_ref: str | None = None  # `--app`: a developer's app, whose engine has its own config
    options: RunOptions = RunOptions()
    dry_run: bool = False
    json_path: str | None = None  # "-": stdout, and no other output there


def run(request: WarmRequest) -> int:
    """Validate every target, warm them (or show them, dry run), report; the exit code.

    Raises WarmError (or ConfigError) for anything that stops the run before it starts.
    """
    engine: Engine | None = None
    if request.app_ref is not None:
        if request.config_file is not None:
            raise WarmError("give --app or --config, not both (the app has its own sources)")
        try:
            engine = app_engine(request.app_ref)
        except ValueError as exc:
            raise WarmError(str(exc)) from None
        settings, config, source = engine.settings, engine.config, request.app_ref
    else:
        settings = (
            Settings() if request.config_file is None else Settings(config=request.config_file)
        )
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
        refusal = _refusal(request, settings)
        if refusal is not None:
            print(f"a real run would be refused: {refusal}", file=human)
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
            result = _run_direct(settings, config, targets, request.options, reporter, engine)
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
                "pass --token (or set AGGREGATOR_ADMIN_TOKEN) with the servers' admin token to "
                "warm through --url"
            )
        return f"through {request.url}"
    if settings.cache_type in ("simple", "null") and not request.dry_run:
        raise NotWarmableError(_per_process(settings.cache_type))
    return f"directly in the {settings.cache_type} cache"


def _refusal(request: WarmRequest, settings: Settings) -> str | None:
    """Why a real run of this dry run would be refused (a dry run contacts nothing, so it
    shows its targets whatever the cache or token), or None."""
    if request.url is not None:
        return (
            None if request.token else "no admin token (pass --token or set AGGREGATOR_ADMIN_TOKEN)"
        )
    if settings.cache_type in ("simple", "null"):
        return _per_process(settings.cache_type)
    return None


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
    engine: Engine | None = None,
) -> RunReport:
    """Build the engine as a server would (or use the --app's), then warm its shared cache on
    one loop."""
    from aggregator.engine import Engine

    # Blocking set-up (backend clients), before the loop. Metrics off: this process is not a
    # server (its numbers would be nobody's, or land in the servers' multiprocess directory).
    if engine is None:
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
