"""How the demo delivers an answer once the knobs have chosen it: padded, dripped, gzipped,
redirected, stalled, or a JSON error.

Apart from the routes (`server`) because this is where the hostile behaviours live, and each
must cost the demo little: a padded or gzipped body is streamed part by part without copies, so
a gigabyte-sized answer costs only what the client actually reads, and a stall ends as soon as
its caller gives up.
"""

from __future__ import annotations

import asyncio
import json
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web

_CHUNK = 256 * 1024
_PAD_CHUNK = b"x" * _CHUNK
_PAD_OPEN = b', "padding": "'
_PAD_CLOSE = b'"}'
_DRIP_TICK = 0.05
_GZIP_WRITE = 64 * 1024
#: Longest a stalled call waits for its caller to give up, and how often it looks.
_STALL_MAX = 60.0
_STALL_TICK = 0.05


def json_response(status: int, payload: Mapping[str, Any]) -> web.Response:
    """Answer with a JSON body."""
    if status in (204, 205, 304):
        return web.Response(status=status)
    return web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json"
    )


def error_response(status: int, service: str, message: str, **extra: Any) -> web.Response:
    """Answer with the uniform JSON error body."""
    return json_response(status, {"error": message, "service": service, "status": status, **extra})


def with_headers(response: web.Response, headers: Mapping[str, str]) -> web.Response:
    """Add headers to a response that has not been sent yet."""
    response.headers.update(headers)
    return response


def _rechunk(parts: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Re-slice a byte stream into pieces of exactly size bytes (except the last)."""
    buf = bytearray()
    for part in parts:
        buf += part
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


async def send_body(
    request: web.Request,
    body: bytes,
    size: int,
    drip: float,
    headers: Mapping[str, str] | None = None,
    *,
    content_type: str = "application/json",
    compress: bool = False,
) -> web.StreamResponse:
    """Send a JSON body, padded to size bytes and/or dripped over drip seconds, without copies.

    With `compress` the body is gzipped part by part as it is sent, so a huge padded body (a
    gzip bomb) costs the demo only what the client actually reads.
    """
    headers = {**(headers or {}), "Content-Type": content_type}
    if size <= len(body) and drip <= 0 and not compress:
        return web.Response(body=body, headers=headers)
    if size > len(body):
        pad = max(0, size - len(body) + 1 - len(_PAD_OPEN) - len(_PAD_CLOSE))
        full, rest = divmod(pad, _CHUNK)
        head = [body[:-1] + _PAD_OPEN]
        parts: Iterable[bytes] = [*head, *([_PAD_CHUNK] * full), _PAD_CHUNK[:rest], _PAD_CLOSE]
        total = len(head[0]) + pad + len(_PAD_CLOSE)
    else:
        parts, total = [body], len(body)
    response = web.StreamResponse(headers=headers)
    pause = 0.0
    if drip > 0:
        per_chunk = max(1, math.ceil(total / max(1, math.ceil(drip / _DRIP_TICK))))
        parts = _rechunk(parts, per_chunk)
        pause = drip / math.ceil(total / per_chunk)
    if compress:
        response.headers["Content-Encoding"] = "gzip"
        parts = _gzipped(parts, flush_each=pause > 0)
    else:
        response.content_length = total
    await response.prepare(request)
    try:
        for part in parts:
            if pause:
                await asyncio.sleep(pause)
            if part:
                await response.write(part)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client gave up on a slow body; that is the point of the drip knob
    return response


def _gzipped(parts: Iterable[bytes], *, flush_each: bool) -> Iterator[bytes]:
    """gzip a byte stream lazily; `flush_each` makes every part decodable as it arrives.

    Otherwise output goes out in pieces of at least 64 KiB, as a bomb served from a file would:
    each network read then holds a lot of compressed data (~64 MiB of padding), not a trickle.
    """
    packer = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    pending = bytearray()
    for part in parts:
        pending += packer.compress(part)
        if flush_each:
            pending += packer.flush(zlib.Z_SYNC_FLUSH)
        if flush_each or len(pending) >= _GZIP_WRITE:
            yield bytes(pending)
            pending.clear()
    yield bytes(pending + packer.flush())


def redirect(status: int | None, location: str, headers: Mapping[str, str]) -> web.Response:
    """A redirect to the knob's value, verbatim (relative, another origin, any scheme)."""
    code = status or 302
    body = json.dumps({"redirect": code}).encode()
    return web.Response(
        status=code,
        body=body,
        headers={**headers, "Location": location, "Content-Type": "application/json"},
    )


async def stall(request: web.Request) -> None:
    """Wait until the caller closes the connection (its timeout), so no stalled call outlives it."""
    loop = asyncio.get_running_loop()
    until = loop.time() + _STALL_MAX
    while loop.time() < until:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(_STALL_TICK)
