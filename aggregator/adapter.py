"""The serving path: Flask (WSGI) behind ASGI without making `async def` views serial.

asgiref's stock `WsgiToAsgi` runs every request of a process on ONE thread (`sync_to_async`
with `thread_sensitive=True`): ten concurrent requests to a view awaiting 0.5 s take 5 s.
This adapter answers the ASGI lifespan itself and serves HTTP in one of three modes:

- ``loop`` (default): the WSGI call runs inside a greenlet on the event loop. When Flask
  reaches an `async def` view, `AggregatorFlask.async_to_sync` switches back to the loop,
  which awaits the coroutine natively and switches the result back in (the technique of
  SQLAlchemy's `greenlet_spawn` / `await_only`). A plain `def` view is sent to a bounded thread
  pool so blocking code never blocks the loop. No thread handoff on the hot path.
- ``threads``: each request runs in a bounded thread pool via `sync_to_async(
  thread_sensitive=False, executor=...)`; async views then run on the server loop (asgiref's
  `AsyncToSync` finds it). The conservative fallback and the benchmark's comparison point.
- ``serial``: the stock `WsgiToAsgi`, kept only as the benchmark's baseline.

Outside a server (Flask's test client, the CLI) there is no greenlet and no server loop:
`async_to_sync` falls back to asgiref's.

Overload: at most `max_in_flight` requests are inside Flask at once (loop and threads modes);
one more is answered 503 with `Retry-After` at once, before its body is read, instead of
waiting in an unbounded queue of greenlets (each holding a connection, memory and, soon, a
deadline it can no longer meet). Not counted and never refused: fresh cache hits answered by
the fast path (a fraction of a millisecond of CPU, nothing held while others wait: refusing
them would turn the cheapest answer into a retry) and the paths in `ALWAYS_ANSWERED`: the
probes (a busy worker is alive and still ready; failing them would restart it or pile its
share on others), `/status` and `/metrics`.
Shutdown: the lifespan waits for requests still in Flask before closing what they use.

Every HTTP request, in every mode, first gets its id and forwardable headers set in contextvars
(`aggregator.context`), so the fast cache path, Flask, upstream calls and log lines all see
them, and its `send` is wrapped once so every response sent for it, whoever sends it (the fast
path, Flask, a 413/408/431 refusal, the stock adapter), carries `X-Request-ID`. Answers
Hypercorn makes itself (a malformed request) never reach us. When the request is done, one INFO
line goes to `aggregator.access` (Hypercorn's own access log is off: ours knows the id and the
cache state); with INFO disabled that costs one `isEnabledFor` check.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import io
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast
from urllib.parse import quote

import greenlet
from asgiref.sync import async_to_sync as asgiref_async_to_sync
from asgiref.sync import sync_to_async
from asgiref.wsgi import WsgiToAsgi, WsgiToAsgiInstance
from flask import Flask

from aggregator import requestlimits, upstream
from aggregator.context import forwarded, read_request, request_id
from aggregator.metrics import CLIENT_LEFT, OFF, Recorder
from aggregator.runtime import tune_gc
from aggregator.settings import Settings
from aggregator.status import STATUS_PATH

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from hypercorn.typing import (
        ASGIReceiveCallable,
        ASGISendCallable,
        ASGISendEvent,
        HTTPScope,
        LifespanScope,
        Scope,
    )

    from aggregator.config import AppConfig

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("aggregator.access")

T = TypeVar("T")

#: Paths answered even at the in-flight limit, and not counted in it (see the module docstring):
#: the probes, /status (in-memory counters, as cheap as /healthz) and /metrics (scraped a few
#: times a minute; views/metrics.py): an overloaded worker is exactly when an operator needs
#: to see its breakers and calls, and a failed scrape would read as "target down".
ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz", STATUS_PATH, "/metrics"})
#: Seconds between log lines saying this worker is refusing requests.
_OVERLOAD_LOG_INTERVAL = 30.0


class FastAnswer(Protocol):
    """What a fast path returns for a request it can answer without Flask."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


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


_Response = tuple[int, list[tuple[bytes, bytes]], bytes]


class ASGIAdapter:
    """The ASGI application Hypercorn serves: lifespan plus HTTP in the configured mode."""

    def __init__(self, app: AggregatorFlask, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.mode = settings.mode
        # Aggregate path -> its request metrics; empty when metrics are off (one dict miss).
        recorder: Recorder = app.extensions.get("aggregator.metrics", OFF)
        self._timed = recorder.routes()
        #: Requests inside Flask now (not fast-path cache hits, not `ALWAYS_ANSWERED` probes).
        self.in_flight = 0
        self._max_in_flight = settings.max_in_flight
        self._overload_answer = _overload_answer(settings)
        self._overload_logged_at = -_OVERLOAD_LOG_INTERVAL
        config = app.extensions.get("aggregator.config")
        #: Client headers some upstream forwards; only these are read out of each request.
        self._forward_names: frozenset[bytes] = (
            config.forwarded_anywhere if config is not None else frozenset()
        )
        self._request_pool: ThreadPoolExecutor | None = None
        self._serial: Callable[..., Awaitable[None]] | None = None
        if self.mode == "threads":
            self._request_pool = ThreadPoolExecutor(
                settings.threads, thread_name_prefix="aggregator-request"
            )
        elif self.mode == "serial":
            # Stock asgiref, deliberately: the benchmark's "textbook recipe" baseline.
            self._serial = WsgiToAsgi(app)  # type: ignore[no-untyped-call]  # asgiref is untyped

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            await self._traced(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:  # websocket: refuse the handshake (Hypercorn answers 403)
            await send({"type": "websocket.close", "code": 1003, "reason": None})

    # -- lifespan -------------------------------------------------------------------------

    async def startup(self) -> None:
        """Open per-process resources on the server loop (the client, then app components)."""
        await upstream.open_shared_client(self.settings)
        for start, _ in self.app.extensions.get("aggregator.lifespan", []):
            await start()

    async def shutdown(self) -> None:
        """Close what startup opened, in reverse, once the requests in flight are done."""
        await self._drain()
        for _, stop in reversed(self.app.extensions.get("aggregator.lifespan", [])):
            await stop()
        await upstream.close_shared_client()
        loop = asyncio.get_running_loop()
        for pool in (self.app.view_pool, self._request_pool):
            if pool is not None:
                await loop.run_in_executor(None, pool.shutdown)

    async def _drain(self) -> None:
        """Wait for requests still inside Flask, so closing the client never cuts one off.

        Under Hypercorn this returns at once: it sends the lifespan shutdown only after its
        connections have finished, or its `graceful_timeout` has cancelled them. Other servers
        and tests may send it earlier. Bounded by the longest aggregate deadline plus a second:
        a request still running after that is stuck, and waiting longer would not help it.
        """
        if not self.in_flight:
            return
        config: AppConfig = self.app.extensions["aggregator.config"]
        bound = max((a.deadline for a in config.aggregates.values()), default=0.0) + 1.0
        loop = asyncio.get_running_loop()
        until = loop.time() + bound
        while self.in_flight and loop.time() < until:
            await asyncio.sleep(0.02)
        if self.in_flight:
            logger.warning("shutting down with %d requests still in flight", self.in_flight)

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[ASGIAdapter]:
        """Startup/shutdown for callers that do not speak the lifespan protocol (tests)."""
        await self.startup()
        try:
            yield self
        finally:
            await self.shutdown()

    async def _lifespan(
        self, scope: LifespanScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                # Only a real server's lifespan tunes the process; tests that run the lifespan
                # in their own process (`lifespan()`) keep Python's collector as it is.
                tune_gc(self.settings.gc_threshold)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- http -----------------------------------------------------------------------------

    async def _traced(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve one request with its id and forwarded headers set; log it once answered."""
        started = time.perf_counter()
        rid, values = read_request(scope["headers"], self._forward_names)
        id_token = request_id.set(rid)
        forwarded_token = forwarded.set(values)
        stamped = _Stamped(send, rid.encode())
        status = 500  # what Hypercorn answers when an exception escapes
        try:
            timed = self._timed.get(scope["path"])  # an aggregate, when metrics are recorded
            if timed is None:
                status = await self._serve_http(scope, receive, stamped)
            else:
                # Counted here, around everything, so fast-path hits, 304s, 400s, 413s are too.
                timed.start()
                try:
                    status = await self._serve_http(scope, receive, stamped)
                finally:
                    timed.done(status, time.perf_counter() - started)
        finally:
            if access_logger.isEnabledFor(logging.INFO):
                # What was sent, if anything was (a 503 cut at shutdown raises after sending).
                _log_access(scope, stamped.status or status, stamped, started)
            request_id.reset(id_token)
            forwarded.reset(forwarded_token)

    async def _serve_http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> int:
        """Answer one request; the status sent (CLIENT_LEFT when the client went first)."""
        if not requestlimits.headers_acceptable(scope, self.settings):
            await requestlimits.refuse_headers(send, self.settings)
            return 431
        if self._serial is None:
            return await self._http(scope, receive, send)
        sent = [CLIENT_LEFT]

        async def send_noting_status(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start":
                sent[0] = message["status"]
            await send(message)

        await self._serial(scope, receive, send_noting_status)
        return sent[0]

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> int:
        hint: Any = None
        fast_path = self.app.extensions.get("aggregator.fast_path")
        if fast_path is not None and scope["method"] in ("GET", "HEAD"):
            # A fresh cache hit is answered here, before Flask: no greenlet, no routing, no
            # fan-out machinery. Anything else continues into Flask with what was looked up.
            answer, hint = await fast_path(
                scope["path"], scope["query_string"].decode("latin-1"), scope["headers"]
            )
            if answer is not None:
                await _send_answer(send, answer, head=scope["method"] == "HEAD")
                sent: int = answer.status
                return sent
        if scope["path"] in ALWAYS_ANSWERED:
            return await self._flask(scope, receive, send, hint)
        if 0 < self._max_in_flight <= self.in_flight:
            self._log_overload()
            await _send_answer(send, self._overload_answer, head=scope["method"] == "HEAD")
            return 503
        self.in_flight += 1
        try:
            return await self._flask(scope, receive, send, hint)
        finally:
            self.in_flight -= 1

    def _log_overload(self) -> None:
        now = time.monotonic()
        if now - self._overload_logged_at >= _OVERLOAD_LOG_INTERVAL:
            self._overload_logged_at = now
            logger.warning(
                "refusing requests with 503: %d already in flight (AGGREGATOR_MAX_IN_FLIGHT)",
                self.in_flight,
            )

    async def _flask(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable, hint: Any
    ) -> int:
        """Read the body, run the WSGI app (greenlet or pool thread), send its response.

        The status sent, or CLIENT_LEFT when the client went first.
        """
        body = await requestlimits.read_body(scope, receive, send, self.settings)
        if isinstance(body, int):
            return body
        environ = self._environ(scope, body)
        if hint is not None:
            environ["aggregator.hint"] = hint
        task = asyncio.current_task()
        assert task is not None
        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, task, disconnected))
        try:
            if self._request_pool is not None:
                run = sync_to_async(
                    self._call_wsgi, thread_sensitive=False, executor=self._request_pool
                )
                response = await run(environ)
            else:
                response = await greenlet_spawn(self._call_wsgi, environ)
        except asyncio.CancelledError:
            if not disconnected.is_set():
                # The server cancelled us (at shutdown, past its graceful_timeout): answer a
                # retryable 503 in the one error shape rather than Hypercorn's empty 500.
                with contextlib.suppress(Exception):
                    await _send_answer(send, _CUT_ANSWER, head=scope["method"] == "HEAD")
                raise
            task.uncancel()  # the client left: nobody to answer, and that is not an error
            return CLIENT_LEFT
        finally:
            watcher.cancel()
        status, headers, payload = response
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})
        return status

    def _environ(self, scope: HTTPScope, body: bytes) -> WSGIEnvironment:
        # Reuse asgiref's environ building rather than re-writing it; it reads only `scope`.
        builder = WsgiToAsgiInstance(None)  # type: ignore[no-untyped-call]  # asgiref is untyped
        builder.scope = scope
        environ: WSGIEnvironment = builder.build_environ(  # type: ignore[no-untyped-call]
            scope, io.BytesIO(body)
        )
        return environ

    def _call_wsgi(self, environ: WSGIEnvironment) -> _Response:
        """Run Flask's WSGI callable to completion (in a greenlet or a pool thread)."""
        started: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            started[:] = [(status, headers)]
            return _no_write

        result: Iterable[bytes] = self.app(environ, cast("StartResponse", start_response))
        try:
            payload = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started[0]
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return int(status.split(" ", 1)[0]), raw, payload


@dataclass(slots=True)
class _Answer:
    """A response the adapter sends itself (the FastAnswer shape)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _overload_answer(settings: Settings) -> _Answer:
    """The 503 for a request over the in-flight limit, in the one JSON error shape (built once)."""
    retry_after = settings.overload_retry_after
    body = json.dumps(
        {
            "error": "Service Unavailable",
            "message": f"overloaded: {settings.max_in_flight} requests already in flight in "
            f"this worker; retry after {retry_after} s",
            "retry_after": retry_after,
        }
    ).encode()
    headers = [
        ("content-type", "application/json"),
        ("retry-after", str(retry_after)),
        ("cache-control", "no-store"),
    ]
    return _Answer(503, headers, body)


_CUT_ANSWER = _Answer(
    503,
    [
        ("content-type", "application/json"),
        ("retry-after", "1"),
        ("cache-control", "no-store"),
        ("connection", "close"),
    ],
    json.dumps(
        {
            "error": "Service Unavailable",
            "message": "the server is shutting down and could not finish this request in "
            "its graceful_timeout; retry",
        }
    ).encode(),
)


async def _send_answer(send: ASGISendCallable, answer: FastAnswer, *, head: bool) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    body: bytes = b"" if head else answer.body
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Stamped:
    """The request's `send`, adding `X-Request-ID` to the response and noting what was sent."""

    __slots__ = ("_send", "_rid", "status", "headers", "size")

    def __init__(self, send: ASGISendCallable, rid: bytes) -> None:
        self._send = send
        self._rid = rid
        self.status = 0  # none sent yet
        self.headers: list[tuple[bytes, bytes]] = []
        self.size = 0

    async def __call__(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.body":
            self.size += len(message.get("body", b""))
        elif message["type"] == "http.response.start":
            self.status = message["status"]
            headers = message.get("headers", ())
            if type(headers) is list:  # ours, the refusals' and asgiref's: built per response
                headers.append((b"x-request-id", self._rid))
            else:
                headers = [*headers, (b"x-request-id", self._rid)]
                message = {**message, "headers": headers}
            self.headers = headers
        await self._send(message)


def _log_access(scope: HTTPScope, status: int, sent: _Stamped, started: float) -> None:
    """The request's one INFO line. The path is logged as sent (percent-encoded), so a decoded
    control character can never forge a log line."""
    ms = round((time.perf_counter() - started) * 1000, 1)
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
    if scope["query_string"]:
        path = f"{path}?{scope['query_string'].decode('latin-1')}"
    cache = next((v.decode("latin-1") for k, v in sent.headers if k == b"x-cache"), "-")
    client = scope.get("client")
    access_logger.info(
        "%s %s %d %d B %.1f ms cache=%s",
        scope["method"],
        path,
        status,
        sent.size,
        ms,
        cache,
        extra={
            "method": scope["method"],
            "path": path,
            "status": status,
            "bytes": sent.size,
            "ms": ms,
            "cache": cache,
            "client": client[0] if client else None,
        },
    )


def _no_write(data: bytes) -> object:
    raise RuntimeError("the WSGI write() callable is not supported")


async def _watch_disconnect(
    receive: ASGIReceiveCallable, task: asyncio.Task[Any], disconnected: asyncio.Event
) -> None:
    """Cancel the request's task when the client goes away, ending its fan-out promptly."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            task.cancel()
            return
