"""A plain Flask app (no engine) whose views stream: what tests/test_streaming.py serves with
`aggregator serve --app tests.support.stream_app:app`, or in-process with `to_asgi`.

Every streamed body is a `Recorded` iterable: it counts its pulls and bytes and records its
`close()` (a method of its own, not a generator's `finally`, which garbage collection would run
too), in `STATS` (read over the wire at `/stats?name=...`) and, when STREAM_APP_CLOSED is set,
as a line in that file (for a server that has exited). Raw WSGI apps under `/raw` (mounted as
WSGI middleware on `app.wsgi_app`) use `write()` and `exc_info`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from flask import Flask, Response, request, stream_with_context
from werkzeug.middleware.dispatcher import DispatcherMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

#: Text of the error `/raw/late-error` raises mid-stream; it must never reach the client.
SECRET = "stream-app-internal-9c2e"
#: name -> {"pulls": chunks pulled, "bytes": bytes produced, "closed": close() calls}
STATS: dict[str, dict[str, int]] = {}


class Recorded:
    """An iterable of chunks that records its pulls, bytes and close() under `name`."""

    def __init__(self, name: str, chunks: Iterator[bytes]) -> None:
        self.name = name
        self.chunks = chunks
        self.stats = STATS.setdefault(name, {"pulls": 0, "bytes": 0, "closed": 0})

    def __iter__(self) -> Recorded:
        return self

    def __next__(self) -> bytes:
        chunk = next(self.chunks)
        self.stats["pulls"] += 1
        self.stats["bytes"] += len(chunk)
        return chunk

    def close(self) -> None:
        self.stats["closed"] += 1
        path = os.environ.get("STREAM_APP_CLOSED")
        if path:
            with open(path, "a") as out:
                out.write(f"{self.name}\n")


def create_app() -> Flask:
    app = Flask(__name__)

    def wait(seconds: float, how: str) -> None:
        if how == "block":
            time.sleep(seconds)  # threads mode only: it would block the loop in loop mode
        else:
            app.ensure_sync(asyncio.sleep)(seconds)  # on the server loop, in either mode

    @app.get("/async")
    async def quick() -> dict[str, str]:
        await asyncio.sleep(float(request.args.get("delay", "0")))
        return {"view": "async"}

    @app.get("/chunks")
    def chunks() -> Response:
        """`n` chunks `gap` s apart; the generator reads the request (stream_with_context)."""

        def produce() -> Iterator[bytes]:
            n, gap = int(request.args.get("n", "3")), float(request.args.get("gap", "0.2"))
            for i in range(n):
                if i:
                    wait(gap, request.args.get("wait", "async"))
                yield f"chunk-{i};".encode()

        return Response(stream_with_context(produce()), mimetype="text/plain")

    @app.get("/overlong")
    def overlong() -> Response:
        """Declares 4 bytes, yields 10 (in one chunk, or in two from `first`), then forever."""
        first = int(request.args.get("first", "10"))

        def produce() -> Iterator[bytes]:
            yield b"0123456789"[:first]
            yield b"0123456789"[first:]
            while True:
                yield b"x" * 1024

        body = Recorded(request.args["name"], produce())
        return Response(body, headers={"Content-Length": "4"}, mimetype="text/plain")

    @app.get("/endless")
    def endless() -> Response:
        """Chunks of `chunk` bytes, `gap` s apart, forever."""
        size, gap = int(request.args.get("chunk", "1024")), float(request.args.get("gap", "0"))
        how = request.args.get("wait", "async")

        def produce() -> Iterator[bytes]:
            block = b"e" * size
            while True:
                yield block
                if gap:
                    wait(gap, how)

        return Response(Recorded(request.args["name"], produce()), mimetype="text/plain")

    @app.get("/big")
    def big() -> Response:
        """`size` bytes with their Content-Length, in chunks of `chunk` (one buffer, reused)."""
        size, chunk = int(request.args["size"]), int(request.args.get("chunk", "65536"))

        def produce() -> Iterator[bytes]:
            block = b"b" * chunk
            for _ in range(size // chunk):
                yield block

        body = Recorded(request.args["name"], produce())
        return Response(body, headers={"Content-Length": str(size)}, mimetype="text/plain")

    @app.get("/stats")
    def stats() -> dict[str, int]:
        return STATS.get(request.args["name"], {"pulls": 0, "bytes": 0, "closed": 0})

    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/raw": raw_app})  # type: ignore[method-assign]
    return app


def raw_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Plain WSGI, as PEP 3333 allows it: write(), exc_info, Content-Length of its own."""
    path = environ["PATH_INFO"]
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"w1;")
        write(b"w2;")
        return Recorded("raw-write", iter([b"i1;", b"i2;"]))
    if path == "/replace":
        return _replaced(start_response)
    if path == "/late-error":
        return _late_error(start_response)
    if path == "/short":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        return Recorded("raw-short", iter([b"a", b"bc"]))
    if path in ("/short-list", "/long-list"):  # a buffered body that breaks its own length
        length = "10" if path == "/short-list" else "4"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", length)])
        return [b"0123", b"456"]
    if path == "/twice":
        start_response("200 OK", [])
        start_response("201 Created", [])  # an error: no exc_info
        return [b"never sent"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"no such raw path"]


def _replaced(start_response: StartResponse) -> Iterator[bytes]:
    """Fails before its first byte and replaces its head, as PEP 3333 lets it."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-First", "yes")])
    try:
        raise ValueError("before any byte")
    except ValueError:
        start_response(
            "500 Internal Server Error",
            [("Content-Type", "text/plain"), ("X-Replaced", "yes")],
            sys.exc_info(),
        )
    yield b"replaced"


def _late_error(start_response: StartResponse) -> Iterator[bytes]:
    """Fails after its first bytes: start_response(exc_info) re-raises, the stream aborts."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"partial"
    try:
        raise RuntimeError(SECRET)
    except RuntimeError:
        start_response("500 Internal Server Error", [], sys.exc_info())
    yield b"never sent"


app = create_app()
