"""The serving path: Flask (WSGI) behind ASGI without making `async def` views serial.

asgiref's stock `WsgiToAsgi` runs every request of a process on ONE thread (`sync_to_async`
with `thread_sensitive=True`): ten concurrent requests to a view awaiting 0.5 s take 5 s.
This adapter answers the ASGI lifespan itself and serves HTTP in one of three modes:

- ``loop`` (default): the WSGI call runs inside a greenlet on the event loop, and async views
  are awaited on the loop itself (`aggregator.serving.bridge`).
- ``threads``: each request runs in a bounded thread pool via `sync_to_async(
  thread_sensitive=False, executor=...)`; async views then run on the server loop (asgiref's
  `AsyncToSync` finds it). The conservative fallback and the benchmark's comparison point.
- ``serial``: the stock `WsgiToAsgi`, kept only as the benchmark's baseline.

Any Flask app can be served (`to_asgi`): the adapter gives it the bridge in place
(`bridge.bridge`). An app may carry our engine (`create_app`'s does; so does any app the
`Aggregator` extension is given) or not. With one, the lifespan starts and stops it, its route
metrics are recorded, and, before Flask, a fresh cache hit is answered by the engine's fast
path; anything else goes on into Flask with what the fast path looked up (`cache.looked_up`),
so the view neither parses the request nor reads the cache again. Without one there is no fast
path and nothing to start: the rest of this contract (modes, limits, overload, ids, access line,
drain) is the same.

Overload: at most `max_in_flight` requests are inside Flask at once (loop and threads modes);
one more is answered 503 with `Retry-After` at once, before its body is read, instead of
waiting in an unbounded queue of greenlets (each holding a connection, memory and, soon, a
deadline it can no longer meet). Not counted and never refused: fresh cache hits answered by
the fast path (a fraction of a millisecond of CPU, nothing held while others wait: refusing
them would turn the cheapest answer into a retry) and the paths in `routes.ALWAYS_ANSWERED`:
the probes (a busy worker is alive and still ready; failing them would restart it or pile its
share on others), `/status` and `/metrics`, when they are the engine's (an app without one may
route those paths to anything: they are counted like the rest).
Shutdown: the lifespan waits for requests still in Flask before closing what they use; a
response still streaming at the drain bound is cut (an endless one would hold the shutdown
forever), and its iterable's close() runs.

Responses, in loop and threads modes (`aggregator.serving.stream`): sent as the app produces
them. A buffered one (a first chunk that completes its Content-Length, a list, an empty body:
nearly every Flask response) goes out as one `http.response.body`, as it always has. Anything
else streams: each chunk as it is pulled (`more_body=True`), each send awaited before the next
pull, so a slow client slows the producer instead of growing memory. The iterable is pulled
where the app ran (the request's greenlet, or its pool thread), so a generator may await async
work between chunks (in loop mode on the loop, without blocking it; a generator that blocks
blocks the loop between chunks). Never more bytes than a declared Content-Length (the iterable
is not pulled past it); fewer closes the connection rather than leave the client waiting. The
iterable's close() always runs: after the last byte, when the app raises mid-stream (logged, the
connection closed, no traceback sent), when the client leaves (the producer stops within one
chunk) and when the server cuts the request. `write()` and `exc_info` behave as PEP 3333 says.
A stream counts in `in_flight` until it ends, and its access line is written then, with the
bytes really sent and, when it ended early, how (`client left`, `cut`, `aborted`, `short`).

Every HTTP request, in every mode, first gets its id and forwardable headers set in contextvars
(`aggregator.context`), so the fast cache path, Flask, upstream calls and log lines all see
them; every response carries `X-Request-ID` and each request gets one access line
(`aggregator.serving.access`). Answers Hypercorn makes itself (a malformed request) never
reach us.

This module owns one thing, the ASGI application (lifespan, then each request from scope to
sent status); its long docstring is the serving contract. Its parts live beside it: the
greenlet bridge (`bridge`), the fast path (`fastpath`), the request limits (`limits`), the
answers it sends itself (`answers`), the access line (`access`) and each WSGI response from
`start_response` to its last byte (`stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from asgiref.wsgi import WsgiToAsgi, WsgiToAsgiInstance
from flask import Flask

from aggregator.cache import Lookup, looked_up
from aggregator.context import forwarded, read_request, request_id
from aggregator.engine import find_engine
from aggregator.gc_tuning import tune_gc
from aggregator.metrics import CLIENT_LEFT
from aggregator.routes import ALWAYS_ANSWERED
from aggregator.serving import limits
from aggregator.serving.access import Stamped, access_logger, log_access
from aggregator.serving.answers import CUT_ANSWER, FastAnswer, overload_answer, send_answer
from aggregator.serving.bridge import bridge, greenlet_spawn
from aggregator.serving.fastpath import FastPath
from aggregator.serving.stream import THREAD_STOP_WAIT, Responder, watch_disconnect
from aggregator.settings import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
    from hypercorn.typing import (
        ASGIReceiveCallable,
        ASGISendCallable,
        ASGISendEvent,
        HTTPScope,
        LifespanScope,
        Scope,
    )

# Named for the module it had before `serving` was a package: operators filter logs by it.
logger = logging.getLogger("aggregator.adapter")

#: Answers a request before Flask (path, query string, raw headers), or says what it looked up.
FastPathFn = Callable[
    [str, str, Iterable[tuple[bytes, bytes]]], Awaitable[tuple[FastAnswer | None, Lookup | None]]
]
#: Seconds between log lines saying this worker is refusing requests.
_OVERLOAD_LOG_INTERVAL = 30.0


async def _no_fast_path(
    path: str, query_string: str, headers: Iterable[tuple[bytes, bytes]]
) -> tuple[FastAnswer | None, Lookup | None]:
    """An app without an engine has no cache to answer from: everything goes to Flask."""
    return None, None


class ASGIAdapter:
    """The ASGI application Hypercorn serves: lifespan plus HTTP in the configured mode."""

    def __init__(self, app: Flask, settings: Settings | None = None) -> None:
        """Serve `app`, any Flask app (given the bridge in place: `bridge.bridge`).

        `settings`: how to serve (mode, limits); by default the app's engine's, and for an app
        without an engine `Settings()` (AGGREGATOR_* variables). `to_asgi` is the public door.
        """
        #: The app's engine, or None for a Flask app without one.
        self.engine = engine = find_engine(app)
        if settings is None:
            settings = engine.settings if engine is not None else Settings()
        self.settings = settings
        self.app = bridge(app, view_threads=settings.threads)
        self.mode = settings.mode
        # Aggregate path -> its request metrics; empty when metrics are off (one dict miss).
        self._timed = engine.metrics.routes() if engine is not None else {}
        #: Answers fresh hits before Flask; a test may wrap it (before the first request).
        self.fast_path: FastPathFn = (
            FastPath(engine.cache, engine.config) if engine is not None else _no_fast_path
        )
        #: Paths never refused at the in-flight limit: the engine's probes and status pages.
        self._always_answered = ALWAYS_ANSWERED if engine is not None else frozenset()
        #: Requests inside Flask now (not fast-path cache hits, not `ALWAYS_ANSWERED` probes).
        self.in_flight = 0
        self._max_in_flight = settings.max_in_flight
        self._overload_answer = overload_answer(settings)
        self._overload_logged_at = -_OVERLOAD_LOG_INTERVAL
        #: Client headers some upstream forwards; only these are read out of each request.
        self._forward_names = (
            engine.config.forwarded_anywhere if engine is not None else frozenset()
        )
        #: Responses streaming now (head sent, not ended): the drain cuts those left at its bound.
        self._streams: set[Responder] = set()
        self._request_pool: ThreadPoolExecutor | None = None
        self._serial: Callable[..., Awaitable[None]] | None = None
        if self.mode == "threads":
            self._request_pool = ThreadPoolExecutor(
                settings.threads, thread_name_prefix="aggregator-request"
            )
        elif self.mode == "serial":
            # Stock asgiref, deliberately: the benchmark's "textbook recipe" baseline.
            self._serial = WsgiToAsgi(self.app)  # type: ignore[no-untyped-call]  # asgiref is untyped

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
        """Open per-process resources on the server loop (`Engine.start`), if there is an engine."""
        if self.engine is not None:
            await self.engine.start()

    async def shutdown(self) -> None:
        """Close what startup opened, in reverse, once the requests in flight are done."""
        await self._drain()
        if self.engine is not None:
            await self.engine.stop()
        loop = asyncio.get_running_loop()
        for pool in (self.app.view_pool, self._request_pool):
            if pool is not None:
                await loop.run_in_executor(None, pool.shutdown)

    async def _drain(self) -> None:
        """Wait for requests still inside Flask, so closing the client never cuts one off.

        Under Hypercorn this returns at once: it sends the lifespan shutdown only after its
        connections have finished, or its `graceful_timeout` has cancelled them. Other servers
        and tests may send it earlier. Bounded by the longest aggregate deadline plus a second:
        a request still running after that is stuck, and waiting longer would not help it. An
        app without an engine declares no deadlines: `drain_timeout` bounds it instead.
        """
        if not self.in_flight:
            return
        if self.engine is not None:
            aggregates = self.engine.config.aggregates.values()
            bound = max((a.deadline for a in aggregates), default=0.0) + 1.0
        else:
            bound = self.settings.drain_timeout
        loop = asyncio.get_running_loop()
        until = loop.time() + bound
        while self.in_flight and loop.time() < until:
            await asyncio.sleep(0.02)
        if self._streams:
            # A stream can be endless: past the bound, cut those still open as the server's
            # graceful_timeout would (each one's close() runs as it ends).
            logger.warning("cutting %d responses still streaming", len(self._streams))
            for responder in list(self._streams):
                responder.cut()
            until = loop.time() + THREAD_STOP_WAIT
            while self._streams and loop.time() < until:
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
        stamped = Stamped(send, rid.encode())
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
                log_access(scope, stamped.status or status, stamped, started)
            request_id.reset(id_token)
            forwarded.reset(forwarded_token)

    async def _serve_http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: Stamped
    ) -> int:
        """Answer one request; the status sent (CLIENT_LEFT when the client went first)."""
        if not limits.headers_acceptable(scope, self.settings):
            await limits.refuse_headers(send, self.settings)
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

    async def _http(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: Stamped) -> int:
        lookup: Lookup | None = None
        if scope["method"] in ("GET", "HEAD"):
            # A fresh cache hit is answered here, before Flask: no greenlet, no routing, no
            # fan-out machinery. Anything else continues into Flask with what was looked up.
            answer, lookup = await self.fast_path(
                scope["path"], scope["query_string"].decode("latin-1"), scope["headers"]
            )
            if answer is not None:
                await send_answer(send, answer, head=scope["method"] == "HEAD")
                sent: int = answer.status
                return sent
        if scope["path"] in self._always_answered:
            return await self._flask(scope, receive, send, lookup)
        if 0 < self._max_in_flight <= self.in_flight:
            self._log_overload()
            await send_answer(send, self._overload_answer, head=scope["method"] == "HEAD")
            return 503
        self.in_flight += 1
        try:
            return await self._flask(scope, receive, send, lookup)
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
        self,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: Stamped,
        lookup: Lookup | None,
    ) -> int:
        """Read the body, run the WSGI app (greenlet or pool thread), send its response.

        The status sent, or CLIENT_LEFT when the client went first. `lookup` reaches the view
        through the request's context (both ways of running Flask copy it).
        """
        body = await limits.read_body(scope, receive, send, self.settings)
        if isinstance(body, int):
            return body
        environ = self._environ(scope, body)
        token = looked_up.set(lookup)
        try:
            return await self._run_flask(scope, receive, send, environ)
        finally:
            looked_up.reset(token)

    async def _run_flask(
        self,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: Stamped,
        environ: WSGIEnvironment,
    ) -> int:
        task = asyncio.current_task()
        assert task is not None
        threads = self._request_pool is not None
        responder = Responder(
            send,
            task,
            self._streams,
            head=scope["method"] == "HEAD",
            loop=asyncio.get_running_loop() if threads else None,
        )
        watcher = asyncio.create_task(watch_disconnect(receive, task, responder))
        try:
            if self._request_pool is not None:
                run = sync_to_async(
                    responder.run, thread_sensitive=False, executor=self._request_pool
                )
                response = await run(self.app, environ)
            else:
                response = await greenlet_spawn(responder.run, self.app, environ)
        except asyncio.CancelledError:
            await responder.cancelled()
            if not responder.left:
                if not responder.started:
                    # The server cancelled us (at shutdown, past its graceful_timeout): answer a
                    # retryable 503 in the one error shape rather than Hypercorn's empty 500.
                    with contextlib.suppress(Exception):
                        await send_answer(send, CUT_ANSWER, head=scope["method"] == "HEAD")
                raise
            task.uncancel()  # the client left: nobody to answer, and that is not an error
            return CLIENT_LEFT
        finally:
            watcher.cancel()
        if response is None:  # streamed, or stopped: the responder says how it ended
            return responder.ended_with()
        return await responder.send_buffered(response)

    def _environ(self, scope: HTTPScope, body: bytes) -> WSGIEnvironment:
        # Reuse asgiref's environ building rather than re-writing it; it reads only `scope`.
        builder = WsgiToAsgiInstance(None)  # type: ignore[no-untyped-call]  # asgiref is untyped
        builder.scope = scope
        environ: WSGIEnvironment = builder.build_environ(  # type: ignore[no-untyped-call]
            scope, io.BytesIO(body)
        )
        return environ
