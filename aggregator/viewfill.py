"""Aggregates written as views: the view's body is the fill, and its awaits are the calls.

A hand-written aggregate view (`Aggregator.aggregate`) is answered exactly like a configured
aggregate: through the aggregate cache (single-flight, stale serving, ETag), with metrics and
Server-Timing. On a miss the cache calls the fill, which runs the view's body with the request's
parameters under the view's deadline; each `fetch` inside it is one `fanout.Calls.call`, so a
source gets its guard, the source cache, its fallback and its place in the envelope's `sources`
and `errors` whichever way the view combines its calls (one at a time, a `gather`, or B with A's
answer). The body never sees a failed source's exception: an optional source gives `None`, a
required one ends the body and the answer is the 502/504 envelope, as for a configured one.

The body runs in the cache's fill task, not inside Flask's request handling, so it may also run
for a background refresh or a warm, where there is no request: its answer must depend on its
parameters (and the headers it varies by) only.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from aggregator.fanout import Calls, past_deadline
from aggregator.models import JSONDict, SourceResult
from aggregator.params import ParamValue

T = TypeVar("T")


class RequiredSourceFailedError(Exception):
    """Raised inside a view's body when a required source failed: the body ends there."""

    def __init__(self, source: str) -> None:
        super().__init__(f"required source {source!r} failed")
        self.source = source


@dataclass(frozen=True, eq=False)
class AggregateView:
    """One hand-written aggregate: its body and what the engine needs to run and cache it."""

    name: str
    #: The view's own function (`async def` or plain `def`), called with its parameters.
    body: Callable[..., Any]
    #: Sources a failure of which fails the whole answer (502/504).
    required: tuple[str, ...] = ()
    #: The upstreams it may call (None: any).
    sources: tuple[str, ...] | None = None
    #: The pydantic model its body returns, if its return annotation names one (OpenAPI).
    data_model: type[BaseModel] | None = None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.body)


@dataclass(eq=False)
class _Run:
    """The view body being run in this context: its calls and how to reach its loop."""

    view: AggregateView
    calls: Calls
    loop: asyncio.AbstractEventLoop
    _taken: dict[str, int] = field(default_factory=dict)

    def key_for(self, source: str) -> str:
        """`source`, or `source~N` for its N-th call in one answer (each keeps its entry)."""
        n = self._taken.get(source, 0) + 1
        self._taken[source] = n
        return source if n == 1 else f"{source}~{n}"


_current: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "aggregator_view_run", default=None
)


def _run() -> _Run:
    run = _current.get()
    if run is None:
        raise RuntimeError(
            "fetch() is for the body of a view decorated with @aggregator.aggregate(...)"
        )
    return run


def _values(run: _Run, source: str, values: Mapping[str, object]) -> dict[str, ParamValue]:
    """Check a call against the config before making it: these are the view's own bugs."""
    view = run.view
    upstream = run.calls.config.upstreams.get(source)
    if upstream is None or (view.sources is not None and source not in view.sources):
        allowed = view.sources if view.sources is not None else run.calls.config.upstreams
        known = ", ".join(allowed) or "none"
        raise LookupError(f"view {view.name!r}: unknown source {source!r} (known: {known})")
    missing = sorted(upstream.template.names - values.keys())
    if missing:
        raise TypeError(f"fetch({source!r}) needs {', '.join(missing)} for its URL")
    typed: dict[str, ParamValue] = {}
    for name, value in values.items():
        if not isinstance(value, str | int | float | bool):
            raise TypeError(
                f"fetch({source!r}): {name} must be a str, int, float or bool, "
                f"not {type(value).__name__}"
            )
        typed[name] = value
    return typed


async def fetch(source: str, values: Mapping[str, object]) -> Any:
    """One source's validated answer (its model, or JSON without one); None if it failed."""
    run = _run()
    typed = _values(run, source, values)
    result = await run.calls.call(source, typed, key=run.key_for(source))
    if not (result.ok or result.fallback):
        if source in run.view.required:
            raise RequiredSourceFailedError(source)
        return None
    model = run.calls.config.upstreams[source].model
    return result.data if model is None else model.model_validate(result.data)


def fetch_blocking(source: str, values: Mapping[str, object]) -> Any:
    """`fetch` for a plain `def` view: the call runs on the server loop, this thread waits."""
    run = _run()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is run.loop:
        raise RuntimeError(f"view {run.view.name!r} is async: use `await fetch(...)`")
    ctx = contextvars.copy_context()
    coro = _in_context(fetch(source, values), ctx)
    return asyncio.run_coroutine_threadsafe(coro, run.loop).result()


async def _in_context(coro: Coroutine[Any, Any, T], ctx: contextvars.Context) -> T:
    return await asyncio.create_task(coro, context=ctx)


@dataclass(frozen=True, slots=True)
class ViewOutcome:
    """What one run of a view's body produced, for the fill to merge."""

    data: JSONDict
    results: dict[str, SourceResult]
    #: None, or why the body ended early: "required" (a required source failed), "deadline".
    cut: str | None = None


async def run_view(
    view: AggregateView,
    params: Mapping[str, ParamValue],
    calls: Calls,
    *,
    pool: Executor | None,
) -> ViewOutcome:
    """Run the body under `calls`' deadline; a `def` body runs on `pool` (never the loop)."""
    loop = asyncio.get_running_loop()
    token = _current.set(_Run(view, calls, loop))
    cut: str | None = None
    returned: object = None
    try:
        async with asyncio.timeout(calls.deadline) as deadline:
            returned = await _call_body(view, params, loop, pool)
    except RequiredSourceFailedError:
        cut = "required"
    except TimeoutError:
        if not deadline.expired():
            raise  # the body's own TimeoutError is a bug in it, not our deadline
        cut = "deadline"
    finally:
        _current.reset(token)
    results = dict(calls.results)
    for key, name in calls.outstanding().items():  # cut off by the deadline mid-call
        results[key] = past_deadline(name, calls.deadline, calls.elapsed_ms())
    data = {} if cut else _as_json_object(view, returned)
    return ViewOutcome(data, results, cut)


def _call_body(
    view: AggregateView,
    params: Mapping[str, ParamValue],
    loop: asyncio.AbstractEventLoop,
    pool: Executor | None,
) -> Awaitable[Any]:
    if view.is_async:
        return view.body(**params)  # type: ignore[no-any-return]
    # Each call from the thread needs this context (the run, the request id): run it in a copy.
    call = functools.partial(contextvars.copy_context().run, view.body, **params)
    return loop.run_in_executor(pool, call)


def _as_json_object(view: AggregateView, returned: object) -> JSONDict:
    """The body's answer as the envelope's `data`: a mapping or a pydantic model."""
    if isinstance(returned, BaseModel):
        dumped: JSONDict = returned.model_dump(mode="json")
        return dumped
    if isinstance(returned, Mapping):
        return {str(k): _jsonable(v) for k, v in returned.items()}
    raise TypeError(
        f"view {view.name!r} returned {type(returned).__name__}; an aggregate view returns a "
        f"dict or a pydantic model (it becomes the envelope's `data`)"
    )


def _jsonable(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
