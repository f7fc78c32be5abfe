"""The bridge between the event loop and Flask's WSGI call: greenlets, and the Flask subclass.

In loop mode the WSGI call runs inside a greenlet on the event loop. When Flask reaches an
`async def` view, `AggregatorFlask.async_to_sync` switches back to the loop, which awaits the
coroutine natively and switches the result back in (the technique of SQLAlchemy's
`greenlet_spawn` / `await_only`). A plain `def` view is sent to a bounded thread pool so
blocking code never blocks the loop. No thread handoff on the hot path.

Outside a server (Flask's test client, the CLI) there is no greenlet and no server loop:
`async_to_sync` falls back to asgiref's.

The bridge is a mixin, `FlaskBridge`: `AggregatorFlask` (the app `create_app` builds) is Flask
plus it, and `bridge(app)` gives any other Flask app the same behaviour in place (`to_asgi`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import ThreadPoolExecutor
from inspect import iscoroutinefunction
from typing import Any, TypeVar, cast

import greenlet
from asgiref.sync import async_to_sync as asgiref_async_to_sync
from flask import Flask

T = TypeVar("T")


#: Set in the context of a `def` view sent to the pool, so async code it calls goes back to
#: the server loop (where the shared client lives) instead of a private loop of asgiref's.
_server_loop: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "aggregator_server_loop", default=None
)


class _RequestGreenlet(greenlet.greenlet):  # type: ignore[misc]  # greenlet ships no stubs
    """Runs one WSGI call; its parent is the loop-side driver in `greenlet_spawn`."""


def _in_request_greenlet() -> bool:
    return isinstance(greenlet.getcurrent(), _RequestGreenlet)


async def greenlet_spawn(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking-style `fn` in a greenlet, awaiting on its behalf whatever it hands us.

    The child switches to us (its parent) with an awaitable; we await it on the loop and switch
    the result (or exception) back in. A new greenlet would start with an empty context, so it
    gets a copy of ours; coroutines it hands over run as tasks in *its* context, so the async
    view sees Flask's request context and its contextvar changes stay with the request.
    """
    child = _RequestGreenlet(fn)
    child.gr_context = contextvars.copy_context()
    result: Any = child.switch(*args)
    while not child.dead:
        try:
            if asyncio.iscoroutine(result):
                value = await asyncio.create_task(result, context=child.gr_context)
            else:
                value = await result
        except BaseException:
            # Includes CancelledError (client gone): Flask unwinds its contexts, then it re-raises.
            result = child.throw(*sys.exc_info())
        else:
            result = child.switch(value)
    return cast(T, result)


def await_only(awaitable: Awaitable[T]) -> T:
    """From inside a request greenlet, wait for `awaitable` on the loop (switches to the driver)."""
    current = greenlet.getcurrent()
    if not isinstance(current, _RequestGreenlet):
        raise RuntimeError("await_only() called outside a request greenlet")
    return cast(T, current.parent.switch(awaitable))


class _Inline:
    """An awaitable the driver awaits in its own task, not in a task of the request's context.

    For a coroutine that needs nothing of that context (a response `send`): a task per call,
    as `greenlet_spawn` makes for a coroutine, would cost more than the call itself.
    """

    __slots__ = ("_coro",)

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro

    def __await__(self) -> Generator[Any, None, Any]:
        return self._coro.__await__()


def await_inline(coro: Coroutine[Any, Any, T]) -> T:
    """`await_only` for a coroutine that may run in the driver's task (see `_Inline`)."""
    return cast(T, await_only(_Inline(coro)))


async def _in_context(coro: Coroutine[Any, Any, T], ctx: contextvars.Context) -> T:
    return await asyncio.create_task(coro, context=ctx)


class FlaskBridge(Flask):
    """Flask that awaits async views on the server loop and keeps `def` views off it.

    A mixin: it adds no state of its own beyond `_wrapped` and `view_pool`, which
    `AggregatorFlask.__init__` or `bridge()` set.
    """

    _wrapped: dict[Callable[..., Any], Callable[..., Any]]
    #: Runs `def` views in loop mode; threads start lazily, so an app never serving one has none.
    view_pool: ThreadPoolExecutor

    def async_to_sync(self, func: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
        """Await on the server loop when there is one; otherwise defer to asgiref."""

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            if _in_request_greenlet():
                return await_only(func(*args, **kwargs))
            loop = _server_loop.get()
            if loop is not None:
                # A `def` view in the pool called async code: run it on the server loop, in
                # this thread's context. It must never need a pool thread back (deadlock).
                coro = _in_context(func(*args, **kwargs), contextvars.copy_context())
                return asyncio.run_coroutine_threadsafe(coro, loop).result()
            return asgiref_async_to_sync(func)(*args, **kwargs)

        return run

    def add_url_rule(
        self,
        rule: str,
        endpoint: str | None = None,
        view_func: Callable[..., Any] | None = None,
        provide_automatic_options: bool | None = None,
        **options: Any,
    ) -> None:
        """Register views; `def` views are wrapped to run in the pool when on the loop."""
        if view_func is not None:
            view_func = self._offloaded(view_func)
        super().add_url_rule(rule, endpoint, view_func, provide_automatic_options, **options)

    def _offloaded(self, view: Callable[..., Any]) -> Callable[..., Any]:
        """`view` as it must be registered: async views as they are, `def` views wrapped once.

        One wrapper per view, so a view routed from several rules stays one endpoint function
        (Flask refuses a second, different function for the same endpoint).
        """
        if iscoroutinefunction(view) or view in self._wrapped.values():
            return view
        if view not in self._wrapped:
            self._wrapped[view] = self._in_pool(view)
        return self._wrapped[view]

    def _in_pool(self, view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not _in_request_greenlet():
                return view(*args, **kwargs)  # threads/serial mode or test client: already off-loop
            loop = asyncio.get_running_loop()
            ctx = contextvars.copy_context()
            ctx.run(_server_loop.set, loop)
            call = functools.partial(ctx.run, view, *args, **kwargs)
            return await_only(loop.run_in_executor(self.view_pool, call))

        return run


class AggregatorFlask(FlaskBridge):
    """The Flask app `create_app` builds: Flask with the bridge from the start."""

    def __init__(self, *args: Any, view_threads: int = 64, **kwargs: Any) -> None:
        # Set first: Flask.__init__ already adds the static route.
        self._wrapped = {}
        super().__init__(*args, **kwargs)
        self.view_pool = ThreadPoolExecutor(view_threads, thread_name_prefix="aggregator-view")


#: Each Flask class given to `bridge`, and its subclass with the bridge mixed in (made once).
_bridged_classes: dict[type[Flask], type[FlaskBridge]] = {}


def bridge(app: Flask, *, view_threads: int = 64) -> FlaskBridge:
    """Give `app`, any Flask app, the bridge in place, and return it (typed as bridged).

    Its class becomes a subclass of its own class with `FlaskBridge` mixed in first (one such
    class per Flask class). Why in place, and why the class rather than `view_functions`:
    Flask sends every coroutine it meets through `app.ensure_sync` -> `app.async_to_sync`,
    not only views: async `before_request`/`after_request` hooks, error handlers, a
    `MethodView`'s async methods. Wrapping the registered view functions would reach the views
    alone, and asgiref's `async_to_sync` on the loop's own thread refuses to run (a plain
    Flask app's async hook would fail in loop mode). The subclass reaches all of them, keeps
    the app's own overrides (they come after ours in the MRO), catches views registered later
    through `add_url_rule`, and the app object the developer holds stays the one served.
    Views registered before are wrapped here, the way `add_url_rule` would have. Outside a
    server the bridge behaves as Flask does (the test client and `flask run` are unchanged).
    An app already bridged (an `AggregatorFlask`, or a second call) is returned as it is.
    """
    if isinstance(app, FlaskBridge):
        return app
    cls = type(app)
    mixed = _bridged_classes.get(cls)
    if mixed is None:
        mixed = type(cls.__name__, (FlaskBridge, cls), {"__module__": cls.__module__})
        _bridged_classes[cls] = mixed
    app.__class__ = mixed
    bridged = cast(FlaskBridge, app)
    bridged._wrapped = {}
    bridged.view_pool = ThreadPoolExecutor(view_threads, thread_name_prefix="aggregator-view")
    for endpoint, view in list(bridged.view_functions.items()):
        bridged.view_functions[endpoint] = bridged._offloaded(view)
    return bridged
