"""Limits on what a client may send, applied by the adapter before Flask sees a request.

Hypercorn's h11 bounds a request head only while it arrives in pieces (`h11_max_incomplete_size`)
and closes idle or slow-head connections after `keep_alive_timeout`; everything else is ours:
- headers: at most `max_request_headers` of them and `max_request_header_bytes` in all, else 431
  (a block sent whole, or over h2, reaches the app at any size, and asgiref's environ building
  fails on more than 100 duplicates with a ValueError, i.e. a 500);
- body: at most `max_request_body` bytes, else 413 before it is buffered (a declared
  `Content-Length` is refused before a byte is read), arriving within `request_body_timeout`,
  else 408 (a stalled upload, or a `Content-Length` larger than what is sent, would otherwise
  hold the request forever: Hypercorn's keep-alive timer is off while a request is open).
Every refusal is a JSON error with `Connection: close`.
"""

from __future__ import annotations

import asyncio
from itertools import chain
from typing import TYPE_CHECKING, cast

from aggregator.metrics import CLIENT_LEFT
from aggregator.serving.answers import send_refusal
from aggregator.settings import Settings

if TYPE_CHECKING:
    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope


def headers_acceptable(scope: HTTPScope, settings: Settings) -> bool:
    """Within the header count and size limits (Hypercorn passes the headers as a list)."""
    headers = cast("list[tuple[bytes, bytes]]", scope["headers"])
    return len(headers) <= settings.max_request_headers and (
        sum(map(len, chain.from_iterable(headers))) <= settings.max_request_header_bytes
    )


async def refuse_headers(send: ASGISendCallable, settings: Settings) -> None:
    await send_refusal(
        send,
        431,
        f"the request has more than {settings.max_request_headers} headers or more than "
        f"{settings.max_request_header_bytes} bytes of them",
    )


async def read_body(
    scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable, settings: Settings
) -> bytes | int:
    """The whole request body, or the status that ended the request: 413 or 408 (answered
    here), CLIENT_LEFT (nobody to answer).

    HTTP/1 requests that declare no body have it complete at once, so only the others pay
    for the timer.
    """
    limit = settings.max_request_body
    has_body = scope.get("http_version") == "2"
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                await send_refusal(send, 413, f"the request body is larger than {limit} bytes")
                return 413
            has_body = has_body or value != b"0"
        elif name == b"transfer-encoding":
            has_body = True
    if not has_body:
        return await _receive_body(receive, send, limit)
    timeout = settings.request_body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await _receive_body(receive, send, limit)
    except TimeoutError:
        await send_refusal(send, 408, f"the request body did not arrive within {timeout:g} s")
        return 408


async def _receive_body(
    receive: ASGIReceiveCallable, send: ASGISendCallable, limit: int
) -> bytes | int:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return CLIENT_LEFT
        chunk = cast(bytes, message.get("body", b""))
        size += len(chunk)
        if size > limit:
            await send_refusal(send, 413, f"the request body is larger than {limit} bytes")
            return 413
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
