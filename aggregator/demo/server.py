"""aiohttp app serving the slow, deterministic demo upstreams, so benchmarks never wait on it.

Per-request knobs in the query string shape each answer:
`delay=S` and `jitter=S` (seconds before answering), `kb=N` (the payload grown to about N KB of
JSON its model keeps; the server-wide default is `--payload-kb`, 0: the small payloads),
`tail=P` (chance of taking `tail_delay=S` seconds more, default 1: a heavy tail, as real
upstreams have, unlike `jitter`'s uniform spread) or `tail_every=N` (every Nth call to the
service since the last reset is in that tail, the first included: deterministic, for tests),
`fail=P` (chance of a 503), `stall=P` (chance of answering nothing until the caller gives up and
closes the connection: a timeout on the caller's side; at most 60 s), `status=N` (answer HTTP
N), `drip=S` (send the body over S seconds), `size=N` (pad the body to N bytes), `invalid=1`
(cut JSON), `html=1` (an HTML page), `shape=wrong` (JSON of the wrong shape), `cc=VALUE` (send
`Cache-Control: VALUE` verbatim, e.g. `cc=max-age%3D60`), and the hostile ones:
`redirect=LOCATION` (answer `status` (default 302) with that `Location`, verbatim), `gzip=1`
(gzip the body as it streams: with `size=1073741824` a 1 GiB bomb of ~1 MiB), `ctype=VALUE`
(that Content-Type on a JSON body) and `depth=N` (a body of N nested JSON arrays).

Every request received, whatever its path, is recorded (method, Host header, raw path and query
as sent) and listed by `GET /_requests` (the last 10,000; `POST /_reset` clears them), so tests
can prove that no request ever reached an unexpected host or path. `GET /_requests?headers=1`
adds each request's headers, so tests can see what the aggregator sent upstream (request ids,
forwarded client headers, and the ones it must never forward).

The OAuth2 token server, the bearer-protected service and the POST/GraphQL endpoints are
`auth`'s (`/oauth/token`, `/protected/...`, `/post/echo`, `/graphql`).

This module is the app: its routes and how a knob picks an answer. Parsing the knobs is
`knobs`, the payloads `payloads`, delivering an answer (padding, drip, gzip, redirect, stall)
`behaviours`, and the counters behind `/_stats` and `/_requests` `stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from aggregator.demo.auth import add_auth_routes
from aggregator.demo.behaviours import (
    error_response,
    json_response,
    redirect,
    send_body,
    stall,
    with_headers,
)
from aggregator.demo.knobs import BadKnobError, Knobs, RequestKnobs, parse_knobs
from aggregator.demo.payloads import cached_body
from aggregator.demo.stats import Stats

_HTML = b"<html><head><title>demo</title></head><body><h1>Not JSON</h1></body></html>"
_WRONG_SHAPES: dict[str, dict[str, Any]] = {
    "weather": {"city": 42, "temperature_c": "very hot"},
    "stocks": {"user_id": "seven", "quotes": "none"},
    "news": {"topic": ["x"], "articles": {"title": 1}},
    "profile": {"user_id": "nobody", "plan": "platinum"},
    "recommendations": {"user_id": 7, "items": [{"id": 1, "score": "high"}]},
    "echo": {"unexpected": True},
}


class _NotFound(LookupError):
    """A path parameter the service cannot resolve, answered as JSON 404."""


KNOBS_KEY = web.AppKey("knobs", Knobs)
STATS_KEY = web.AppKey("stats", Stats)


def _user_id(request: web.Request) -> int:
    """Parse the user id path segment, which must be an integer."""
    try:
        return int(request.match_info["user_id"])
    except ValueError:
        raise _NotFound("user_id must be an integer") from None


async def _serve(
    request: web.Request, service: str, build: Callable[[float], bytes]
) -> web.StreamResponse:
    """Apply the knobs around one service call and keep the stats honest."""
    stats = request.app[STATS_KEY]
    stats.record(service, request.transport)
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    try:
        try:
            knobs = parse_knobs(request.query, request.app[KNOBS_KEY])
            body = build(knobs.kb)
        except BadKnobError as exc:
            return error_response(400, service, str(exc), knob=exc.knob)
        except _NotFound as exc:
            return error_response(404, service, str(exc))
        if knobs.stall and random.random() < knobs.stall:
            await stall(request)
        delay = knobs.delay + (random.uniform(0.0, knobs.jitter) if knobs.jitter else 0.0)
        if _in_tail(knobs, stats.requests[service]):
            delay += knobs.tail_delay
        if delay > 0:
            await asyncio.sleep(delay)
        headers = {} if knobs.cache_control is None else {"Cache-Control": knobs.cache_control}
        if knobs.redirect is not None:
            return redirect(knobs.status, knobs.redirect, headers)
        if knobs.status is not None:
            failure = error_response(knobs.status, service, f"status {knobs.status} forced by knob")
            return with_headers(failure, headers)
        if knobs.fail and random.random() < knobs.fail:
            return with_headers(
                error_response(503, service, "random failure injected by knob"), headers
            )
        if knobs.html:
            return web.Response(body=_HTML, content_type="text/html", headers=headers)
        if knobs.invalid:
            body = body[: len(body) // 2]
        elif knobs.wrong_shape:
            body = json.dumps(_WRONG_SHAPES[service]).encode()
        elif knobs.depth:
            body = b"[" * knobs.depth + b"]" * knobs.depth
        size = 0 if knobs.invalid or knobs.depth else knobs.size
        return await send_body(
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


def _in_tail(knobs: RequestKnobs, count: int) -> bool:
    """Whether the `count`th call to a service since the last reset is in the heavy tail."""
    if knobs.tail_every:
        return (count - 1) % knobs.tail_every == 0
    return bool(knobs.tail) and random.random() < knobs.tail


async def _weather_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /weather/{city}."""
    return await _serve(
        request, "weather", lambda kb: cached_body("weather", request.match_info["city"], kb)
    )


async def _stocks_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /stocks/{user_id}."""
    return await _serve(request, "stocks", lambda kb: cached_body("stocks", _user_id(request), kb))


async def _news_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /news?topic=..."""
    return await _serve(
        request, "news", lambda kb: cached_body("news", request.query.get("topic") or "general", kb)
    )


async def _profile_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /profile/{user_id}."""
    return await _serve(
        request, "profile", lambda kb: cached_body("profile", _user_id(request), kb)
    )


async def _recommendations_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /recommendations/{user_id}."""
    return await _serve(
        request, "recommendations", lambda kb: cached_body("recommendations", _user_id(request), kb)
    )


def _echo_body(request: web.Request) -> bytes:
    """Describe the request exactly as received, to prove how callers encoded it; `args` are
    the query's parameters decoded (the first value of each), so an answer can carry any value
    a test asks for (hostile ones included) to a source that needs it."""
    path, _, query = request.raw_path.partition("?")
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    args: dict[str, str] = {}
    for name, value in request.query.items():
        args.setdefault(name, value)
    return json.dumps({"path": path, "query": query, "headers": headers, "args": args}).encode()


async def _echo_handler(request: web.Request) -> web.StreamResponse:
    """Serve GET /echo/{rest}."""
    return await _serve(request, "echo", lambda _kb: _echo_body(request))


async def _healthz(request: web.Request) -> web.Response:
    """Answer readiness probes immediately."""
    return json_response(200, {"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    """Expose the counters."""
    return json_response(200, request.app[STATS_KEY].snapshot())


async def _reset(request: web.Request) -> web.Response:
    """Zero the counters between test phases."""
    request.app[STATS_KEY].reset()
    return json_response(200, {"status": "reset"})


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
    return json_response(200, {"requests": listed})


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
    return error_response(404, "none", f"no demo service at {request.path}")


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
        ]
    )
    add_auth_routes(app)  # the token server, a protected service, POST and GraphQL endpoints
    app.router.add_route("*", "/{tail:.*}", _not_found)
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
