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
import hashlib
import json
import math
import random
import signal
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from aiohttp import web
from pydantic import BaseModel

from aggregator.demo.models import (
    Article,
    Item,
    News,
    Profile,
    Quote,
    Recommendations,
    Stocks,
    Weather,
)

SERVICES = ("weather", "stocks", "news", "profile", "recommendations", "echo")
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
_CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")
_SYMBOLS = ("ACME", "GLOBEX", "INITECH", "UMBRELLA", "HOOLI", "STARK", "WAYNE", "WONKA")
_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken")
_CITIES = ("Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Nairobi", "Austin", "Hanoi")
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


@dataclass(frozen=True)
class Knobs:
    """Server-wide defaults for the per-request knobs, so one flag slows every upstream."""

    latency: float = 0.1
    jitter: float = 0.0
    failure_rate: float = 0.0
    #: Chance that a call stalls until its caller times out (the `stall` knob's default).
    stall_rate: float = 0.0

    def __post_init__(self) -> None:
        """Reject nonsense early so a misconfigured demo fails at startup, not per request."""
        for name in ("latency", "jitter"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("failure_rate", "stall_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value!r}")


@dataclass(frozen=True)
class _RequestKnobs:
    """Knobs resolved for one request, so handlers read typed values."""

    delay: float
    jitter: float
    fail: float
    stall: float = 0.0
    status: int | None = None
    drip: float = 0.0
    size: int = 0
    invalid: bool = False
    html: bool = False
    wrong_shape: bool = False
    cache_control: str | None = None
    redirect: str | None = None
    gzip: bool = False
    content_type: str = "application/json"
    depth: int = 0


class _BadKnob(ValueError):
    """A knob value that cannot be parsed, so the 400 body can name it."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(f"bad value for knob {knob!r}: {message}")
        self.knob = knob


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


def _rng(*parts: object) -> random.Random:
    """Seed a generator from the inputs so every payload is reproducible across runs."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _stamp(rng: random.Random) -> datetime:
    """Pick a deterministic timestamp within the demo's fixed year."""
    return _EPOCH + timedelta(seconds=rng.randrange(365 * 86400))


def _weather(city: str) -> Weather:
    """Build the weather for a city."""
    rng = _rng("weather", city)
    return Weather(
        city=city,
        temperature_c=round(rng.uniform(-10.0, 35.0), 1),
        conditions=rng.choice(_CONDITIONS),
        updated_at=_stamp(rng),
    )


def _stocks(user_id: int) -> Stocks:
    """Build a user's quotes."""
    rng = _rng("stocks", user_id)
    symbols = rng.sample(_SYMBOLS, 3 + user_id % 3)
    quotes = [
        Quote(
            symbol=s, price=round(rng.uniform(5, 500), 2), change_pct=round(rng.uniform(-5, 5), 2)
        )
        for s in symbols
    ]
    return Stocks(user_id=user_id, quotes=quotes)


def _news(topic: str) -> News:
    """Build headlines for a topic."""
    rng = _rng("news", topic)
    slug = quote(topic, safe="")
    articles = [
        Article(
            title=f"{topic.title()} story #{i}: {rng.choice(_CITIES)} {rng.choice(_CONDITIONS)}",
            url=f"https://example.invalid/news/{slug}/{i}",
            published_at=_stamp(rng),
        )
        for i in range(1, 6)
    ]
    return News(topic=topic, articles=articles)


def _profile(user_id: int) -> Profile:
    """Build a user's profile."""
    rng = _rng("profile", user_id)
    plan = "pro" if user_id % 3 == 0 else "free"
    return Profile(user_id=user_id, name=rng.choice(_NAMES), city=rng.choice(_CITIES), plan=plan)


def _recommendations(user_id: int) -> Recommendations:
    """Build a user's ranked recommendations."""
    rng = _rng("recommendations", user_id)
    scores = sorted((round(rng.random(), 2) for _ in range(5)), reverse=True)
    items = [
        Item(
            id=f"item-{rng.randrange(10000):04d}",
            title=f"{rng.choice(_SYMBOLS).title()} kit",
            score=s,
        )
        for s in scores
    ]
    return Recommendations(user_id=user_id, items=items)


@lru_cache(maxsize=4096)
def _cached_body(service: str, key: str | int) -> bytes:
    """Serialize a payload once, since the data is deterministic and this is the hot path."""
    builders: dict[str, Callable[[Any], BaseModel]] = {
        "weather": _weather,
        "stocks": _stocks,
        "news": _news,
        "profile": _profile,
        "recommendations": _recommendations,
    }
    return builders[service](key).model_dump_json().encode()


def _user_id(request: web.Request) -> int:
    """Parse the user id path segment, which must be an integer."""
    try:
        return int(request.match_info["user_id"])
    except ValueError:
        raise _NotFound("user_id must be an integer") from None


def _number(query: Mapping[str, str], knob: str, default: float, hi: float) -> float:
    """Parse a float knob within 0..hi."""
    raw = query.get(knob)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _BadKnob(knob, f"{raw!r} is not a number") from None
    if not 0.0 <= value <= hi:  # also rejects nan
        raise _BadKnob(knob, f"{raw!r} is outside 0..{hi:g}")
    return value


def _integer(query: Mapping[str, str], knob: str, lo: int, hi: int) -> int | None:
    """Parse an integer knob within lo..hi."""
    raw = query.get(knob)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _BadKnob(knob, f"{raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise _BadKnob(knob, f"{raw!r} is outside {lo}..{hi}")
    return value


def _flag(query: Mapping[str, str], knob: str) -> bool:
    """Parse a boolean knob such as invalid=1."""
    raw = query.get(knob)
    if raw is None:
        return False
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on", ""):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise _BadKnob(knob, f"{raw!r} is not a boolean")


def _header_value(query: Mapping[str, str], knob: str) -> str | None:
    """Parse a knob sent verbatim as a header value (no line breaks, no NUL)."""
    raw = query.get(knob)
    if raw is not None and any(c in raw for c in "\r\n\0"):
        raise _BadKnob(knob, "a header value cannot contain line breaks or NUL")
    return raw


def _parse_knobs(query: Mapping[str, str], defaults: Knobs) -> _RequestKnobs:
    """Resolve the per-request knobs over the server-wide defaults."""
    delay = _number(query, "delay", defaults.latency, 3600.0)
    jitter = _number(query, "jitter", defaults.jitter, 3600.0)
    fail = _number(query, "fail", defaults.failure_rate, 1.0)
    stall = _number(query, "stall", defaults.stall_rate, 1.0)
    if len(query) == 0:
        return _RequestKnobs(delay=delay, jitter=jitter, fail=fail, stall=stall)
    shape = query.get("shape")
    if shape not in (None, "wrong", "ok"):
        raise _BadKnob("shape", f"{shape!r} is not 'wrong' or 'ok'")
    status = _integer(query, "status", 200, 599)
    redirect = _header_value(query, "redirect")
    if redirect is not None and status is not None and not 300 <= status <= 399:
        raise _BadKnob("status", f"{status} is not a redirect status (with redirect=)")
    return _RequestKnobs(
        delay=delay,
        jitter=jitter,
        fail=fail,
        stall=stall,
        status=status,
        drip=_number(query, "drip", 0.0, 3600.0),
        size=_integer(query, "size", 0, 2**31) or 0,
        invalid=_flag(query, "invalid"),
        html=_flag(query, "html"),
        wrong_shape=shape == "wrong",
        cache_control=_header_value(query, "cc"),
        redirect=redirect,
        gzip=_flag(query, "gzip"),
        content_type=_header_value(query, "ctype") or "application/json",
        depth=_integer(query, "depth", 1, 1_000_000) or 0,
    )


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
            knobs = _parse_knobs(request.query, request.app[KNOBS_KEY])
            body = build()
        except _BadKnob as exc:
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
        request, "weather", lambda: _cached_body("weather", request.match_info["city"])
    )


async def _stocks_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /stocks/{user_id}."""
    return await _serve(request, "stocks", lambda: _cached_body("stocks", _user_id(request)))


async def _news_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /news?topic=..."""
    return await _serve(
        request, "news", lambda: _cached_body("news", request.query.get("topic") or "general")
    )


async def _profile_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /profile/{user_id}."""
    return await _serve(request, "profile", lambda: _cached_body("profile", _user_id(request)))


async def _recommendations_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /recommendations/{user_id}."""
    return await _serve(
        request, "recommendations", lambda: _cached_body("recommendations", _user_id(request))
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
