"""One WSGI response sent over ASGI as the app produces it (loop and threads modes).

A `Responder` per request owns PEP 3333's side of the response, between the app and the ASGI
`send`:

- `start_response`: the status and headers. Called again with `exc_info` while no byte has been
  sent, it replaces them; once the head is sent it re-raises `exc_info` (the stream is then
  aborted). A second call without `exc_info` is an error. The `write()` it returns sends its
  bytes at once, in order, before the iterable's.
- The buffered fast path: a list or tuple body, an empty one, or a first chunk that completes a
  declared Content-Length (a Flask `Response` of a str, bytes, dict or `jsonify` is one chunk
  with its length) is returned whole to the adapter, which sends it in one
  `http.response.body`: no more sends and no more switches than a buffering adapter makes.
- Anything else is streamed: `http.response.start` with the first non-empty chunk, then each
  non-empty chunk as it is pulled (`more_body=True`), then an empty last message. Each send is
  awaited before the next pull: Hypercorn's send waits for the socket to drain, so a slow client
  slows the producer, and memory holds one chunk plus the transport's buffer (back-pressure).
- Content-Length: never more bytes than declared. The chunk that reaches it is cut there and
  sent as the last, and the iterable is not pulled again. Fewer bytes than declared when the
  iterable ends: logged, and no last message, so Hypercorn closes the connection and the client
  sees a truncated body instead of waiting for bytes that never come. Not checked where no body
  is sent (HEAD, 1xx, 204, 304).
- `close()` of the iterable: always, once, in the producer: after the last message, or when the
  stream ends early (the app raised mid-stream: logged, connection closed, no traceback sent;
  the client left; the server cut the request).

Where it runs. The producer is the request's greenlet (loop mode) or its pool thread (threads
mode): the iterable is pulled there, so a generator (or `stream_with_context`) may wait on async
work between chunks (`current_app.ensure_sync(coro_fn)()`, `await_only`): in loop mode that
waits on the loop without blocking it; a generator that blocks (`time.sleep`, slow file reads)
blocks the loop between chunks, as any code on the loop does. Sends: in loop mode each one is
handed to the greenlet's driver, which awaits it in the request's own task (`await_inline`)
and then yields the loop once, so a fast generator to a fast client cannot starve the other
requests; in threads mode each is scheduled on the server loop (`run_coroutine_threadsafe`)
and the thread waits for it.

Stopping: the adapter calls `stop()` when the client disconnects, when the server cancels the
request, and at the drain bound (`cut()`). In loop mode the request's task is cancelled too, and
the CancelledError is thrown into the greenlet wherever it waits (a send, or the generator's own
await); in threads mode the pending send is cancelled and the thread stops before its next pull
(`Stopped`), so a producer stops within one chunk and its `close()` runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aggregator.metrics import CLIENT_LEFT
from aggregator.serving.bridge import await_inline

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from hypercorn.typing import ASGIReceiveCallable, ASGISendEvent

    from aggregator.serving.access import Stamped

logger = logging.getLogger("aggregator.adapter")

#: A response sent whole by the adapter: status, headers, body, and whether it is complete
#: (False: fewer bytes than its Content-Length, so no last message and the connection closes).
Buffered = tuple[int, list[tuple[bytes, bytes]], bytes, bool]
#: Statuses that never carry a body (HEAD is the other case).
_BODILESS = frozenset({204, 304})
#: Seconds a pool thread that streams gets to reach its next chunk once its request ends early
#: (client gone, server cut); a producer stuck longer is left to stop on its own when it next
#: yields (its close() runs then; the pool is joined at shutdown).
THREAD_STOP_WAIT = 2.0


class StoppedError(Exception):
    """Raised in the producer (and by `write()`) once the stream was stopped: the client left
    or the server cut the request. An `OSError` would read as a broken pipe; this says why."""


class Responder:
    """One request's response, from `start_response` to the last byte (see the module)."""

    __slots__ = (
        "_send",
        "_loop",
        "_pending",
        "task",
        "head",
        "streams",
        "status",
        "headers",
        "code",
        "raw",
        "length",
        "sent",
        "started",
        "finished",
        "stopped",
        "left",
        "done",
        "note",
    )

    def __init__(
        self,
        send: Stamped,
        task: asyncio.Task[Any],
        streams: set[Responder],
        *,
        head: bool,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        """`loop`: the server loop when the producer is a pool thread (threads mode), else None.

        `streams`: the adapter's set of responses streaming now; this one is in it from its head
        to its end, so the drain can cut it.
        """
        self._send = send
        self._loop = loop
        self._pending: concurrent.futures.Future[None] | None = None
        self.task = task
        self.head = head
        self.streams = streams
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.code = 0
        self.raw: list[tuple[bytes, bytes]] | None = None
        self.length: int | None = None
        #: Body bytes handed to `send` so far.
        self.sent = 0
        #: The head is sent: from here on the response streams, and cannot be replaced.
        self.started = False
        #: The last message is sent.
        self.finished = False
        self.stopped = False
        #: The client disconnected (set by the adapter's watcher).
        self.left = False
        #: The producer has returned (its close() has run).
        self.done = False
        #: Why a started stream ended early, for the access line ("" when it did not).
        self.note = ""

    # -- the app's side (in the producer) ------------------------------------------------------

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None:
            try:
                if self.started:  # PEP 3333: too late to replace the head; re-raise the error
                    error = exc_info[1]
                    if error is not None:
                        raise error.with_traceback(exc_info[2])
            finally:
                exc_info = None  # no cycle through the traceback
        elif self.status is not None:
            raise RuntimeError("start_response() called a second time without exc_info")
        self.status = status
        self.headers = headers
        self.raw = None
        return self.write

    def write(self, data: bytes) -> None:
        """PEP 3333's imperative `write()`: sent at once (the head first), Content-Length kept."""
        if self.status is None:
            raise RuntimeError("write() called before start_response()")
        if self.stopped:
            raise StoppedError("the response was stopped: the client left or the server cut it")
        if not self.started:
            self._start()
        if data and not self.finished:
            self._body(data)

    def run(self, app: WSGIApplication, environ: WSGIEnvironment) -> Buffered | None:
        """Call `app` and deliver its response: returned whole when buffered (the adapter sends
        it), None once streamed or stopped (`code` and `note` say how it ended)."""
        result: Iterable[bytes] | None = None
        try:
            start_response: StartResponse = self.start_response
            result = app(environ, start_response)
            return self._deliver(result)
        except StoppedError:
            return None  # the adapter stopped it and knows why
        except Exception:
            if not self.started:
                raise  # nothing sent yet: Hypercorn answers 500, as for any app error
            logger.exception(
                "response aborted after %d bytes: the app raised mid-stream (connection closed)",
                self.sent,
            )
            self.note = "aborted"
            return None
        finally:
            try:
                self._close(result)
            finally:
                if self.started:
                    self.streams.discard(self)
                self.done = True

    def _deliver(self, result: Iterable[bytes]) -> Buffered | None:
        if self.started:  # write() has sent the head and its bytes already
            self._stream(iter(result))
            return None
        if type(result) is list or type(result) is tuple:  # a raw app's body, whole
            return self._buffered(b"".join(result))
        chunks = iter(result)
        first = b""
        for first in chunks:  # PEP 3333: no head before the first non-empty chunk
            if first:
                break
        if not self.started:  # (write() inside those pulls may have started it)
            if not first:
                return self._buffered(b"")
            self._prepare()
            if self.length is not None and len(first) >= self.length:
                return self._buffered(first)  # complete in one chunk: the common Flask response
            self._start()
        if first and not self.finished and not self._body(first):
            return None  # the declared length is reached: not pulled again
        self._stream(chunks)
        return None

    def _close(self, result: Iterable[bytes] | None) -> None:
        close = getattr(result, "close", None)
        if close is None:
            return
        if not self.started:
            close()  # before the buffered answer is sent, as a buffering adapter does
            return
        try:
            close()
        except Exception:
            # The head is out: nothing to answer with, so say it here instead.
            logger.exception("close() of the response iterable failed")

    # -- the response (in the producer) --------------------------------------------------------

    def _prepare(self) -> None:
        """ASGI's status and headers from start_response's; note a declared Content-Length."""
        if self.status is None:
            raise RuntimeError("the WSGI app returned without calling start_response()")
        self.code = int(self.status.split(" ", 1)[0])
        raw = []
        length = None
        for name, value in self.headers:
            key = name.lower()
            if key == "content-length" and value.isdigit():
                length = int(value)
            raw.append((key.encode("latin-1"), value.encode("latin-1")))
        self.raw = raw
        self.length = length

    def _bodiless(self) -> bool:
        return self.head or self.code < 200 or self.code in _BODILESS

    def _buffered(self, body: bytes) -> Buffered:
        if self.raw is None:
            self._prepare()
        assert self.raw is not None
        complete = True
        length = self.length
        if length is not None and len(body) != length:
            if len(body) > length:
                self._over(length)
                body = body[:length]
            elif not self._bodiless():
                self._short(len(body), length)
                complete = False
        self.sent = len(body)
        return self.code, self.raw, body, complete

    def _start(self) -> None:
        if self.raw is None:
            self._prepare()
        assert self.raw is not None
        self.started = True
        self.streams.add(self)
        self._message({"type": "http.response.start", "status": self.code, "headers": self.raw})

    def _stream(self, chunks: Iterator[bytes]) -> None:
        """Send the rest of the iterable, one chunk per pull, then the last message."""
        if self.finished:
            return
        for chunk in chunks:
            if self.stopped:
                raise StoppedError
            if chunk and not self._body(chunk):
                return  # the declared length is reached: not pulled again
        length = self.length
        if length is not None and self.sent < length and not self._bodiless():
            self._short(self.sent, length)
            return  # no last message: Hypercorn closes the connection
        self.finished = True
        self._message({"type": "http.response.body", "body": b"", "more_body": False})

    def _body(self, chunk: bytes) -> bool:
        """Send `chunk`; False when it reached the declared Content-Length (it was the last)."""
        length = self.length
        if length is not None and len(chunk) >= length - self.sent:
            room = length - self.sent
            if len(chunk) > room:
                self._over(length)
                chunk = chunk[:room]
            self.sent += room
            self.finished = True
            self._message({"type": "http.response.body", "body": chunk, "more_body": False})
            return False
        self.sent += len(chunk)
        self._message({"type": "http.response.body", "body": chunk, "more_body": True})
        return True

    def _message(self, message: ASGISendEvent) -> None:
        """Send one message from the producer and wait until it is sent (back-pressure)."""
        if self.stopped:
            raise StoppedError
        if self._loop is None:
            # Loop mode, in the request's greenlet: the driver awaits it in the request's task.
            await_inline(self._send_and_yield(message))
        else:
            # Threads mode, on a pool thread: the send runs on the server loop; we wait for it.
            future = asyncio.run_coroutine_threadsafe(self._send(message), self._loop)
            self._pending = future
            if self.stopped:  # stop() may have run before `_pending` was set
                future.cancel()
            try:
                future.result()
            except concurrent.futures.CancelledError:
                raise StoppedError from None
            finally:
                self._pending = None
        if self.stopped:
            raise StoppedError

    async def _send_and_yield(self, message: ASGISendEvent) -> None:
        await self._send(message)
        # Hypercorn's send only suspends once the transport's buffer is full: without this, a
        # generator that never waits, to a client that reads fast, would hold the loop.
        await asyncio.sleep(0)

    def _over(self, length: int) -> None:
        logger.warning(
            "the app sent more than its Content-Length of %d bytes: cut there, not pulled again",
            length,
        )

    def _short(self, sent: int, length: int) -> None:
        self.note = "short"
        logger.warning(
            "the app sent %d of the %d bytes its Content-Length declares: connection closed",
            sent,
            length,
        )

    # -- the adapter's side (on the loop) ------------------------------------------------------

    def stop(self) -> None:
        """Stop the producer within one chunk (thread-safe; the adapter cancels its task)."""
        self.stopped = True
        pending = self._pending
        if pending is not None:
            pending.cancel()  # a send waiting on a stalled client: the thread gets StoppedError

    def cut(self) -> None:
        """Stop a stream at the drain bound: its task is cancelled as the server would."""
        self.stop()
        self.task.cancel()

    async def cancelled(self) -> None:
        """The request's task was cancelled (client gone, server cut, drain): stop the producer.

        A pool thread that streams is waited for (bounded), so the request, and the adapter's
        `in_flight`, end with its close(); a loop-mode greenlet got the CancelledError itself.
        """
        self.stop()
        if self._loop is not None and self.started:
            await self.ended(THREAD_STOP_WAIT)
        if self.started:
            self._send.note = "client left" if self.left else "cut"

    def ended_with(self) -> int:
        """The status to record for a response the producer streamed (or stopped) itself."""
        if self.left:
            self._send.note = "client left"
            return CLIENT_LEFT
        self._send.note = self.note
        return self.code

    async def send_buffered(self, response: Buffered) -> int:
        """Send a response the producer returned whole: one head, one body message."""
        status, headers, body, complete = response
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        # Not complete: fewer bytes than its Content-Length; no last message closes the connection.
        await self._send({"type": "http.response.body", "body": body, "more_body": not complete})
        if not complete:
            self._send.note = self.note
        return status

    async def ended(self, bound: float) -> bool:
        """Wait (at most `bound` s) for a pool-thread producer to return; whether it did."""
        loop = asyncio.get_running_loop()
        until = loop.time() + bound
        while not self.done and loop.time() < until:
            await asyncio.sleep(0.01)
        return self.done


async def watch_disconnect(
    receive: ASGIReceiveCallable, task: asyncio.Task[Any], responder: Responder
) -> None:
    """Cancel the request's task when the client goes away, ending its fan-out promptly, and
    stop its response's producer (a stream stops within one chunk)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if responder.finished:
                return  # the whole response was sent: a client closing now left nothing behind
            responder.left = True
            responder.stop()
            task.cancel()
            return
