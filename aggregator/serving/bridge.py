"""The bridge between the event loop and Flask's WSGI call: greenlets, and the Flask subclass.

In loop mode the WSGI call runs inside a greenlet on the event loop. When Flask reaches an
`async def` view, `AggregatorFlask.async_to_sync` switches back to the loop, which awaits the
coroutine natively and switches the result back in (the technique of SQLAlchemy's
`greenlet_spawn` / `await_only`). A plain `def` view is sent to a bounded thread pool so
blocking code never blocks the loop. No thread handoff on the hot path.

Outside a server (Flask's test client, the CLI) there is no greenlet and no server loop:
`async_to_sync` falls back to asgiref's.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys
from collections.abc import Awaitable, Callable, Coroutine
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


async def _in_context(coro: Coroutine[Any, Any, T], ctx: contextvars.Context) -> T:
    return await asyncio.create_task(coro, context=ctx)


class AggregatorFlask(Flask):
    """Flask that awaits async views on the server loop and keeps `def` views off it."""

    def __init__(self, *args: Any, view_threads: int = 64, **kwargs: Any) -> None:
        # One wrapper per view, so a view routed from several rules stays one endpoint function
        # (Flask refuses a second, different function for the same endpoint). Set first:
        # Flask.__init__ already adds the static route.
        self._wrapped: dict[Callable[..., Any], Callable[..., Any]] = {}
        super().__init__(*args, **kwargs)
        # Threads start lazily, so an app that never serves a `def` view in loop mode has none.
        self.view_pool = ThreadPoolExecutor(view_threads, thread_name_prefix="aggregator-view")

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
        if view_func is not None and not iscoroutinefunction(view_func):
            if view_func not in self._wrapped:
                self._wrapped[view_func] = self._offloaded(view_func)
            view_func = self._wrapped[view_func]
        super().add_url_rule(rule, endpoint, view_func, provide_automatic_options, **options)

    def _offloaded(self, view: Callable[..., Any]) -> Callable[..., Any]:
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
