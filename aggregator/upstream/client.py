"""The async upstream call and the shared client it runs on: the one place that calls httpx
(`aggregator.upstream.request` builds and sends each request).

One `httpx.AsyncClient` per worker process, opened on the server loop at lifespan startup
(a client per request costs far more CPU for its TLS context and loses keep-alive).
Code that runs without a server loop (Flask's test client, the CLI) gets a short-lived client
for its own loop instead: clients are looked up per running loop, never assumed.

`fetch` never raises: every failure becomes a `SourceResult` with an error kind, so one bad
source cannot cancel its siblings. httpx has no total-time timeout (a slowly dripping body
outlives `timeout=`), so the whole call runs under `asyncio.timeout`.

The sync twins' blocking call (`aggregator.twins.upstream_sync`) reuses every step here that
does not wait (error translation, result building, the DEBUG line) and those in
`aggregator.upstream.checks`, so a failure maps to the same kind whichever style made the call.

A successful result also carries what the upstream said about caching it (`Cache-Control` and
`Age`, parsed by `aggregator.upstream.cachecontrol`); what that means for how long to keep it is
decided in the cache package, not here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx

from aggregator.config import UpstreamConfig
from aggregator.context import outgoing_headers
from aggregator.errors import (
    UpstreamError,
    UpstreamInvalidPayloadError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from aggregator.models import CacheControl, SourceResult
from aggregator.params import ParamValue
from aggregator.resilience import UpstreamGuard
from aggregator.settings import Settings
from aggregator.upstream.cachecontrol import parse_cache_control
from aggregator.upstream.checks import (
    LimitedBody,
    Redirects,
    check_content_type,
    check_status,
    decode,
)
from aggregator.upstream.engines import build_client
from aggregator.upstream.oauth import close_tokens, tokens_for
from aggregator.upstream.request import build_request, send, upstream_url

# The module's old name: log configurations and the README's examples name this logger.
logger = logging.getLogger("aggregator.upstream")


class UpstreamClients:
    """A worker's shared upstream clients, one per event loop (the engine owns one of these).

    The lifespan opens the client on the server loop; a caller without one (Flask's test
    client, a CLI loop) borrows a short-lived client for its own loop, since a client bound to
    another loop cannot be used from this one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    async def open(self) -> httpx.AsyncClient:
        """Open this loop's shared client (lifespan startup)."""
        client = build_client(self.settings)
        self._by_loop[asyncio.get_running_loop()] = client
        logger.info("upstream client opened (engine=%s)", self.settings.engine)
        return client

    async def close(self) -> None:
        """Close this loop's shared client (lifespan shutdown)."""
        client = self._by_loop.pop(asyncio.get_running_loop(), None)
        if client is not None:
            close_tokens(client)
            await client.aclose()
            logger.info("upstream client closed")

    def shared(self) -> httpx.AsyncClient | None:
        """The client the lifespan opened on the running loop, if any."""
        return self._by_loop.get(asyncio.get_running_loop())

    @asynccontextmanager
    async def borrow(self) -> AsyncIterator[httpx.AsyncClient]:
        """The shared client, or a short-lived one when no lifespan opened one on this loop."""
        client = self.shared()
        if client is not None:
            yield client
            return
        async with build_client(self.settings) as own:
            yield own


async def fetch(
    client: httpx.AsyncClient,
    name: str,
    upstream: UpstreamConfig,
    params: Mapping[str, ParamValue],
    *,
    max_body: int,
    guard: UpstreamGuard | None = None,
    deadline: float | None = None,
) -> SourceResult:
    """Call one upstream; the result is data or an error kind, never an exception.

    With a `guard` the call may be retried, refused (`circuit_open`, `overloaded`) or cut
    short of retries by `deadline` (the aggregate's end, `time.monotonic()` clock); see
    `aggregator.resilience`. Every attempt shares the source's `timeout`.
    """
    started = time.perf_counter()
    url = upstream.template.render(params)
    body_template = upstream.body_template
    content = None if body_template is None else body_template.render(params)
    attempts = 0

    async def attempt(seconds: float) -> SourceResult:
        nonlocal attempts
        attempts += 1
        begun = time.perf_counter()
        try:
            async with asyncio.timeout(seconds):
                body, cache_control = await _authorized(
                    client, name, url, upstream, max_body, content
                )
            data = decode(name, upstream, body)
        except UpstreamError as exc:
            result = _failure(name, exc, started)
        except TimeoutError:
            result = _failure(name, _cut_off(name, upstream), started)
        else:
            result = _success(name, data, cache_control, started)
        if logger.isEnabledFor(logging.DEBUG):
            _log_call(result, attempts, begun)
        return result

    if guard is None:
        return await attempt(upstream.timeout)
    outcome = await guard.call(attempt, deadline=deadline)
    if isinstance(outcome, UpstreamError):
        return _refused(name, outcome, started)
    return outcome


async def _authorized(
    client: httpx.AsyncClient,
    name: str,
    url: str,
    upstream: UpstreamConfig,
    max_body: int,
    content: bytes | None,
) -> tuple[bytes, CacheControl]:
    """`_get` with the source's bearer token when it has `oauth`: a 401 gets one more try with
    a fresh token (a 401 means the request was refused, so a POST may be sent again)."""
    if upstream.oauth is None:
        return await _get(client, name, url, upstream, max_body, content)
    tokens = tokens_for(client).source(upstream.oauth)
    token = await tokens.token(client, name)
    try:
        return await _get(client, name, url, upstream, max_body, content, token)
    except UpstreamError as exc:
        if exc.status != 401:
            raise
    token = await tokens.refreshed(client, name, token)
    return await _get(client, name, url, upstream, max_body, content, token)


def _timeouts(upstream: UpstreamConfig, seconds: float | None = None) -> httpx.Timeout:
    """Per-phase timeouts, none longer than the `seconds` this attempt has (default: all)."""
    total = upstream.timeout if seconds is None else max(0.001, min(seconds, upstream.timeout))
    return httpx.Timeout(total, connect=min(total, upstream.connect_timeout or total))


async def _get(
    client: httpx.AsyncClient,
    name: str,
    url: str,
    upstream: UpstreamConfig,
    max_body: int,
    content: bytes | None = None,
    token: str | None = None,
) -> tuple[bytes, CacheControl]:
    """The decoded body and caching headers of a 2xx answer (the caller bounds the total time).

    `content` is a POST's JSON body; `token` an OAuth2 bearer token (dropped with the other
    headers once a redirect leaves the origin).
    """
    headers = outgoing_headers(upstream.headers, upstream.forwarded)
    if content is not None or token is not None:
        headers = dict(headers)
        if content is not None:
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
    redirects = Redirects(name, upstream, url, headers)
    target = upstream_url(upstream.template, url)
    method = upstream.method
    timeout = _timeouts(upstream)
    try:
        while True:
            request = build_request(client, method, target, redirects.headers, timeout, content)
            resp = await send(client, request)
            try:
                hop = redirects.next_hop(resp)
                if hop is None:
                    body = _accept(name, resp, max_body)
                    async for chunk in resp.aiter_raw():
                        body.add(chunk)
                    return body.value(), _cache_control(resp)
            finally:
                await resp.aclose()
            target = hop
            if resp.status_code in (301, 302, 303) and method != "GET":
                method, content = "GET", None  # as browsers and httpx do; 307/308 keep both
    except _CALL_ERRORS as exc:
        raise _call_error(name, upstream, exc) from exc


def _accept(name: str, resp: httpx.Response, max_body: int) -> LimitedBody:
    """Check a final answer's status and type, then get ready for its body.

    The body is read raw (`aiter_raw`): `LimitedBody` decodes it, so the size limit holds for the
    decoded bytes without ever inflating more than that.
    """
    check_status(name, resp)
    check_content_type(name, resp)
    return LimitedBody(name, resp, max_body)


# What a call may raise besides our own errors. aiohttp errors that httpx-aiohttp does not map
# (a malformed status line or chunk) arrive as themselves.
_CALL_ERRORS = (httpx.TransportError, httpx.DecodingError, OSError, aiohttp.ClientError)


def _call_error(name: str, upstream: UpstreamConfig, exc: Exception) -> UpstreamError:
    """Translate what the HTTP stack raised (async or sync client) into our error kinds."""
    if isinstance(exc, httpx.TimeoutException) and not _is_aiohttp_disconnect(exc):
        return UpstreamTimeoutError(name, f"no answer within {upstream.timeout:g} s")
    if isinstance(exc, httpx.DecodingError):
        return UpstreamInvalidPayloadError(
            name, "the body does not match its Content-Encoding", kind="invalid_json"
        )
    return UpstreamUnavailableError(name, _describe(exc))


def _cut_off(name: str, upstream: UpstreamConfig) -> UpstreamTimeoutError:
    return UpstreamTimeoutError(name, f"no full answer within {upstream.timeout:g} s")


def _cache_control(resp: httpx.Response) -> CacheControl:
    return parse_cache_control(resp.headers.get("cache-control"), resp.headers.get("age"))


def _is_aiohttp_disconnect(exc: BaseException) -> bool:
    # httpx-aiohttp maps every aiohttp ClientConnectionError (including a server that closes
    # the connection) to httpx.ConnectTimeout; only a real timeout should read as "timeout".
    cause = exc.__cause__
    if cause is None:
        return False
    return isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(
        cause, aiohttp.ServerTimeoutError | asyncio.TimeoutError
    )


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    if isinstance(cause, aiohttp.ServerDisconnectedError | httpx.RemoteProtocolError):
        return f"the upstream closed the connection ({type(cause).__name__})"
    return f"cannot reach the upstream ({type(cause).__name__})"


def _success(name: str, data: Any, cache_control: CacheControl, started: float) -> SourceResult:
    return SourceResult(
        name=name, status="ok", ms=_ms(started), data=data, cache_control=cache_control
    )


def _failure(name: str, exc: UpstreamError, started: float) -> SourceResult:
    locations = exc.locations if isinstance(exc, UpstreamInvalidPayloadError) else []
    return SourceResult(
        name=name,
        status=exc.kind,
        ms=_ms(started),
        detail=exc.detail,
        upstream_status=exc.status,
        locations=locations,
    )


def _refused(name: str, exc: UpstreamError, started: float) -> SourceResult:
    """A call the guard refused (`circuit_open`, `overloaded`): no upstream was contacted."""
    result = _failure(name, exc, started)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "upstream %s not called: %s",
            name,
            result.status,
            extra={
                "source": name,
                "attempt": 0,
                "outcome": result.status,
                "error": result.status,
                "ms": result.ms,
            },
        )
    return result


def _log_call(result: SourceResult, attempt: int, begun: float) -> None:
    """One DEBUG line per upstream call (per attempt): never a header value nor a body."""
    ms = round((time.perf_counter() - begun) * 1000, 1)
    http = f" (HTTP {result.upstream_status})" if result.upstream_status is not None else ""
    logger.debug(
        "upstream %s attempt %d: %s%s in %.1f ms",
        result.name,
        attempt,
        result.status,
        http,
        ms,
        extra={
            "source": result.name,
            "attempt": attempt,
            "outcome": result.status,
            "http_status": result.upstream_status,
            "ms": ms,
            "error": None if result.ok else result.status,
        },
    )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
