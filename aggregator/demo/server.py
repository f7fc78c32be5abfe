"""aiohttp app serving the slow, deterministic demo upstreams, so benchmarks never wait on it.

Per-request knobs in the query string shape each answer:
`delay=S` and `jitter=S` (seconds before answering), `fail=P` (chance of a 503), `stall=P`
(chance of answering nothing until the caller gives up and closes the connection: a timeout
on the caller's side; at most 60 s), `status=N` (answer HTTP N), `drip=S` (send the body over
S seconds), `size=N` (pad the body to N bytes), `invalid=1` (cut JSON), `html=1` (an HTML
page), `shape=wrong` (JSON of the wrong shape), `cc=VALUE` (send `Cache-Control: VALUE`
verbatim, e.g. `cc=max-age%3D60`), and the hostile ones: `redirect=LOCATION` (answer `status`
(default 302) with that `Location`, verbatim), `gzip=1` (gzip the body as it streams: with
`size=1073741824` a 1 GiB bomb of ~1 MiB), `ctype=VALUE` (that Content-Type on a JSON body)
and `depth=N` (a body of N nested JSON arrays).

Every request received, whatever its path, is recorded (method, Host header, raw path and query
as sent) and listed by `GET /_requests` (the last 10,000; `POST /_reset` clears them), so tests
can prove that no request ever reached an unexpected host or path. `GET /_requests?headers=1`
adds each request's headers, so tests can see what the aggregator sent upstream (request ids,
forwarded client headers, and the ones it must never forward).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web

from aggregator.demo.knobs import BadKnobError, Knobs, parse_knobs
from aggregator.demo.payloads import cached_body

SERVICES = ("weather", "stocks", "news", "profile", "recommendations", "echo")
_HTML = b"<html><head><title>demo</title></head><body><h1>Not JSON</h1></body></html>"
_WRONG_SHAPES: dict[str, dict[str, Any]] = {
    "weather": {"city": 42, "temperature_c": "very hot"},
    "stocks": {"user_id": "seven", "quotes": "none"},
    "news": {"topic": ["x"], "articles": {"title": 1}},
    "profile": {"user_id": "nobody", "plan": "platinum"},
    "recommendations": {"user_id": 7, "items": [{"id": 1, "score": "high"}]},
    "echo": {"unexpected": True},
}
_CHUNK = 256 * 1024
_PAD_CHUNK = b"x" * _CHUNK
_PAD_OPEN = b', "padding": "'
_PAD_CLOSE = b'"}'
_DRIP_TICK = 0.05
_GZIP_WRITE = 64 * 1024
#: Longest a stalled call waits for its caller to give up, and how often it looks.
_STALL_MAX = 60.0
_STALL_TICK = 0.05


class _NotFound(LookupError):
    """A path parameter the service cannot resolve, answered as JSON 404."""


class Stats:
    """Counters exposed on /_stats, so tests can prove fan-out, caching and connection reuse."""

    def __init__(self) -> None:
        self.requests = dict.fromkeys(SERVICES, 0)
        self.total = 0
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._epoch = 0
        self._transports: dict[asyncio.BaseTransport, int] = {}
        self._prune_at = 64
        #: Every request received (bounded): what `GET /_requests` lists, each with its headers
        #: (aiohttp's read-only object, kept as is: nothing is copied per request).
        self.received: deque[tuple[dict[str, str], Mapping[str, str]]] = deque(maxlen=10_000)

    def record(self, service: str, transport: asyncio.BaseTransport | None) -> None:
        """Count a request and, if its connection is new since the last reset, the connection."""
        self.requests[service] += 1
        self.total += 1
        if transport is None or self._transports.get(transport) == self._epoch:
            return
        if transport not in self._transports and len(self._transports) >= self._prune_at:
            self._prune()
            self._prune_at = max(64, 2 * len(self._transports))
        self._transports[transport] = self._epoch
        self.connections += 1

    def _prune(self) -> None:
        """Forget closed transports so a no-keep-alive benchmark cannot grow memory."""
        closing = [t for t in self._transports if t.is_closing()]
        for transport in closing:
            del self._transports[transport]

    def reset(self) -> None:
        """Zero every counter; open connections are counted again when they next send."""
        self.requests = dict.fromkeys(SERVICES, 0)
        self.total = 0
        self.connections = 0
        self.max_in_flight = self.in_flight
        self._epoch += 1
        self.received.clear()

    def snapshot(self) -> dict[str, Any]:
        """Render the counters as the JSON body of /_stats."""
        self._prune()
        return {
            "connections": self.connections,
            "open_connections": len(self._transports),
            "requests": dict(self.requests),
            "total_requests": self.total,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


KNOBS_KEY = web.AppKey("knobs", Knobs)
STATS_KEY = web.AppKey("stats", Stats)


def _user_id(request: web.Request) -> int:
    """Parse the user id path segment, which must be an integer."""
    try:
        return int(request.match_info["user_id"])
    except ValueError:
        raise _NotFound("user_id must be an integer") from None


def _json(status: int, payload: Mapping[str, Any]) -> web.Response:
    """Answer with a JSON body."""
    if status in (204, 205, 304):
        return web.Response(status=status)
    return web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json"
    )


def _error(status: int, service: str, message: str, **extra: Any) -> web.Response:
    """Answer with the uniform JSON error body."""
    return _json(status, {"error": message, "service": service, "status": status, **extra})


def _with_headers(response: web.Response, headers: Mapping[str, str]) -> web.Response:
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


async def _send(
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


def _redirect(status: int | None, location: str, headers: Mapping[str, str]) -> web.Response:
    """A redirect to the knob's value, verbatim (relative, another origin, any scheme)."""
    code = status or 302
    body = json.dumps({"redirect": code}).encode()
    return web.Response(
        status=code,
        body=body,
        headers={**headers, "Location": location, "Content-Type": "application/json"},
    )


async def _stall(request: web.Request) -> None:
    """Wait until the caller closes the connection (its timeout), so no stalled call outlives it."""
    loop = asyncio.get_running_loop()
    until = loop.time() + _STALL_MAX
    while loop.time() < until:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(_STALL_TICK)


async def _serve(
    request: web.Request, service: str, build: Callable[[], bytes]
) -> web.StreamResponse:
    """Apply the knobs around one service call and keep the stats honest."""
    stats = request.app[STATS_KEY]
    stats.record(service, request.transport)
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        try:
            knobs = parse_knobs(request.query, request.app[KNOBS_KEY])
            body = build()
        except BadKnobError as exc:
            return _error(400, service, str(exc), knob=exc.knob)
        except _NotFound as exc:
            return _error(404, service, str(exc))
        if knobs.stall and random.random() < knobs.stall:
            await _stall(request)
        delay = knobs.delay + (random.uniform(0.0, knobs.jitter) if knobs.jitter else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        headers = {} if knobs.cache_control is None else {"Cache-Control": knobs.cache_control}
        if knobs.redirect is not None:
            return _redirect(knobs.status, knobs.redirect, headers)
        if knobs.status is not None:
            failure = _error(knobs.status, service, f"status {knobs.status} forced by knob")
            return _with_headers(failure, headers)
        if knobs.fail and random.random() < knobs.fail:
            return _with_headers(_error(503, service, "random failure injected by knob"), headers)
        if knobs.html:
            return web.Response(body=_HTML, content_type="text/html", headers=headers)
        if knobs.invalid:
            body = body[: len(body) // 2]
        elif knobs.wrong_shape:
            body = json.dumps(_WRONG_SHAPES[service]).encode()
        elif knobs.depth:
            body = b"[" * knobs.depth + b"]" * knobs.depth
        size = 0 if knobs.invalid or knobs.depth else knobs.size
        return await _send(
            request,
            body,
            size,
            knobs.drip,
            headers,
            content_type=knobs.content_type,
            compress=knobs.gzip,
        )
    finally:
        stats.in_flight -= 1


async def _weather_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /weather/{city}."""
    return await _serve(
        request, "weather", lambda: cached_body("weather", request.match_info["city"])
    )


async def _stocks_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /stocks/{user_id}."""
    return await _serve(request, "stocks", lambda: cached_body("stocks", _user_id(request)))


async def _news_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /news?topic=..."""
    return await _serve(
        request, "news", lambda: cached_body("news", request.query.get("topic") or "general")
    )


async def _profile_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /profile/{user_id}."""
    return await _serve(request, "profile", lambda: cached_body("profile", _user_id(request)))


async def _recommendations_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /recommendations/{user_id}."""
    return await _serve(
        request, "recommendations", lambda: cached_body("recommendations", _user_id(request))
    )


def _echo_body(request: web.Request) -> bytes:
    """Describe the request exactly as received, to prove how callers encoded it."""
    path, _, query = request.raw_path.partition("?")
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return json.dumps({"path": path, "query": query, "headers": headers}).encode()


async def _echo_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /echo/{rest}."""
    return await _serve(request, "echo", lambda: _echo_body(request))


async def _healthz(request: web.Request) -> web.Response:
    """Answer readiness probes immediately."""
    return _json(200, {"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    """Expose the counters."""
    return _json(200, request.app[STATS_KEY].snapshot())


async def _reset(request: web.Request) -> web.Response:
    """Zero the counters between test phases."""
    request.app[STATS_KEY].reset()
    return _json(200, {"status": "reset"})


async def _requests(request: web.Request) -> web.Response:
    """List the requests received since the last reset, oldest first (`?headers=1`: with their
    headers, names lowercased, repeats joined with `, `)."""
    with_headers = request.query.get("headers") == "1"
    listed: list[dict[str, Any]] = []
    for record, headers in request.app[STATS_KEY].received:
        if not with_headers:
            listed.append(record)
            continue
        joined: dict[str, str] = {}
        for name, value in headers.items():
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        listed.append({**record, "headers": joined})
    return _json(200, {"requests": listed})


@web.middleware
async def _record(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Note every request before routing: unknown paths and control endpoints too."""
    request.app[STATS_KEY].received.append(
        (
            {"method": request.method, "host": request.host, "raw_path": request.raw_path},
            request.headers,
        )
    )
    return await handler(request)


async def _not_found(request: web.Request) -> web.Response:
    """Answer unknown paths with JSON, like every other demo response."""
    return _error(404, "none", f"no demo service at {request.path}")


def create_demo_app(knobs: Knobs | None = None) -> web.Application:
    """Build the demo app, so tests can serve it in-process and run_demo can serve it for real."""
    app = web.Application(middlewares=[_record])
    app[KNOBS_KEY] = knobs or Knobs()
    app[STATS_KEY] = Stats()
    app.router.add_routes(
        [
            web.get("/weather/{city}", _weather_handler),
            web.get("/stocks/{user_id}", _stocks_handler),
            web.get("/news", _news_handler),
            web.get("/profile/{user_id}", _profile_handler),
            web.get("/recommendations/{user_id}", _recommendations_handler),
            web.get("/echo/{rest:.*}", _echo_handler),
            web.get("/healthz", _healthz),
            web.get("/_stats", _stats),
            web.post("/_reset", _reset),
            web.get("/_requests", _requests),
            web.route("*", "/{tail:.*}", _not_found),
        ]
    )
    return app


async def _serve_until_signalled(host: str, port: int, knobs: Knobs) -> None:
    """Listen, announce the address, and clean up on SIGINT/SIGTERM."""
    runner = web.AppRunner(create_demo_app(knobs), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        bound_port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        print(f"demo upstreams on http://{shown}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def run_demo(host: str, port: int, knobs: Knobs) -> None:
    """Serve the demo upstreams until SIGINT/SIGTERM; blocking, for the CLIs."""
    asyncio.run(_serve_until_signalled(host, port, knobs))
