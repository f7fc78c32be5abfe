"""Per-request bookkeeping around every response: `X-Request-ID` and the one access line.

The request's `send` is wrapped once, so every response sent for it, whoever sends it (the fast
path, Flask, a 413/408/431 refusal, the stock adapter), carries `X-Request-ID`; when the request
is done, one INFO line goes to `aggregator.access` (Hypercorn's own access log is off: ours
knows the id and the cache state). With INFO disabled that costs one `isEnabledFor` check.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from hypercorn.typing import ASGISendCallable, ASGISendEvent, HTTPScope

access_logger = logging.getLogger("aggregator.access")


class Stamped:
    """The request's `send`, adding `X-Request-ID` to the response and noting what was sent."""

    __slots__ = ("_send", "_rid", "status", "headers", "size", "note")

    def __init__(self, send: ASGISendCallable, rid: bytes) -> None:
        self._send = send
        self._rid = rid
        self.status = 0  # none sent yet
        self.headers: list[tuple[bytes, bytes]] = []
        self.size = 0
        #: How a response whose head was sent ended early, if it did: "client left", "cut"
        #: (by the server), "aborted" (the app raised), "short" (less than its Content-Length).
        self.note = ""

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


def log_access(scope: HTTPScope, status: int, sent: Stamped, started: float) -> None:
    """The request's one INFO line, once its response has ended (a stream: at its end). The
    path is logged as sent (percent-encoded), so a decoded control character can never forge a
    log line. A response that ended early after its head was sent says how (`Stamped.note`).

    One per request, on the event loop, so it is built directly: the message formatted once
    (no `%` args left for the handler to merge) and the record handed to the logger's own
    `handle` (its filters, handlers and propagation as usual) without `Logger.info`'s
    `findCaller` stack walk, whose answer would always be this function.
    """
    ms = round((time.perf_counter() - started) * 1000, 1)
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
    if scope["query_string"]:
        path = f"{path}?{scope['query_string'].decode('latin-1')}"
    cache = next((v.decode("latin-1") for k, v in sent.headers if k == b"x-cache"), "-")
    client = scope.get("client")
    method = scope["method"]
    extra = {
        "method": method,
        "path": path,
        "status": status,
        "bytes": sent.size,
        "ms": ms,
        "cache": cache,
        "client": client[0] if client else None,
    }
    message = f"{method} {path} {status:d} {sent.size:d} B {ms:.1f} ms cache={cache}"
    if sent.note:
        extra["ended"] = sent.note
        message = f"{message} {sent.note}"
    record = access_logger.makeRecord(
        access_logger.name, logging.INFO, __file__, _LINE, message, (), None, "log_access", extra
    )
    access_logger.handle(record)


#: The line records say they were logged from (what `findCaller` would have found).
_LINE = log_access.__code__.co_firstlineno
