"""The one place that knows httpx: the shared client, its engine, and one upstream call.

One `httpx.AsyncClient` per worker process, opened on the server loop at lifespan startup
(DESIGN §1: a client per request costs ~38 ms CPU for its TLS context and loses keep-alive).
Code that runs without a server loop (Flask's test client, the CLI) gets a short-lived client
for its own loop instead: clients are looked up per running loop, never assumed.

`fetch` never raises: every failure becomes a `SourceResult` with an error kind, so one bad
source cannot cancel its siblings. httpx has no total-time timeout (a slowly dripping body
outlives `timeout=`), so the whole call runs under `asyncio.timeout`.

`fetch_sync` is the same call for plain `def` views (the sync twins, a benchmark comparison) on
one lazily built `httpx.Client` per worker (`SyncClient`). Both share every step that does not
wait (redirects, status and type checks, decoded size limit, JSON, validation: all in
`aggregator.responses`; error translation here), so a failure maps to the same kind whichever
style made the call.

A successful result also carries what the upstream said about caching it (`Cache-Control` and
`Age`, parsed by `parse_cache_control`); what that means for how long to keep it is decided in
the cache package, not here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx

from aggregator.cachecontrol import parse_cache_control
from aggregator.config import ParamValue, UpstreamConfig
from aggregator.context import outgoing_headers
from aggregator.engines import build_client, build_sync_client
from aggregator.errors import (
    UpstreamError,
    UpstreamInvalidPayloadError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from aggregator.models import CacheControl, SourceResult
from aggregator.resilience import UpstreamGuard
from aggregator.responses import (
    LimitedBody,
    Redirects,
    check_content_type,
    check_status,
    decode,
)
from aggregator.settings import Settings

logger = logging.getLogger(__name__)

#: One list element of a header: quoted strings may hold commas (RFC 9110 §5.6.1).
# Clients opened by the ASGI lifespan, keyed by the loop they live on.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


async def open_shared_client(settings: Settings) -> httpx.AsyncClient:
    """Open this loop's shared client (lifespan startup)."""
    loop = asyncio.get_running_loop()
    client = build_client(settings)
    _clients[loop] = client
    logger.info("upstream client opened (engine=%s)", settings.engine)
    return client


async def close_shared_client() -> None:
    """Close this loop's shared client (lifespan shutdown)."""
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()
        logger.info("upstream client closed")


def shared_client() -> httpx.AsyncClient | None:
    """The client the lifespan opened on the running loop, if any."""
    return _clients.get(asyncio.get_running_loop())


@asynccontextmanager
async def borrow_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The shared client, or a short-lived one when no server loop owns a client."""
    client = shared_client()
    if client is not None:
        yield client
        return
    async with build_client(settings) as own:
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
    attempts = 0

    async def attempt(seconds: float) -> SourceResult:
        nonlocal attempts
        attempts += 1
        begun = time.perf_counter()
        try:
            async with asyncio.timeout(seconds):
                body, cache_control = await _get(client, name, url, upstream, max_body)
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


def fetch_sync(
    client: httpx.Client,
    name: str,
    upstream: UpstreamConfig,
    params: Mapping[str, ParamValue],
    *,
    max_body: int,
    guard: UpstreamGuard | None = None,
    deadline: float | None = None,
) -> SourceResult:
    """`fetch` for blocking code (the sync twins): same limits, same error kinds, never raises.

    A thread cannot be cancelled, so the source's total timeout is a monotonic deadline checked
    between body chunks; a stall between chunks is cut by httpx's read timeout, so a call ends
    within about twice its timeout at worst (a drip until just before the deadline, then a stall).
    A `guard` applies the same policy as in `fetch`, on the same per-process state.
    """
    started = time.perf_counter()
    url = upstream.template.render(params)
    attempts = 0

    def attempt(seconds: float) -> SourceResult:
        nonlocal attempts
        attempts += 1
        begun = time.perf_counter()
        try:
            body, cache_control = _get_sync(client, name, url, upstream, max_body, seconds)
            data = decode(name, upstream, body)
        except UpstreamError as exc:
            result = _failure(name, exc, started)
        else:
            result = _success(name, data, cache_control, started)
        if logger.isEnabledFor(logging.DEBUG):
            _log_call(result, attempts, begun)
        return result

    if guard is None:
        return attempt(upstream.timeout)
    outcome = guard.call_sync(attempt, deadline=deadline)
    if isinstance(outcome, UpstreamError):
        return _refused(name, outcome, started)
    return outcome


class SyncClient:
    """The worker's one `httpx.Client` for `def` views, built on first use by any thread.

    Built lazily because most workers never serve a sync twin; the lock makes sure racing
    threads get the same client (a second one would leak its pool). `close` is for shutdown.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None

    def get(self) -> httpx.Client:
        """The shared client, built if this is the first call (or the first after `close`)."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                self._client = build_sync_client(self._settings)
                logger.info("sync upstream client opened")
            return self._client

    def close(self) -> None:
        """Close the client if one was built (blocking: closes its sockets)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
            logger.info("sync upstream client closed")


def _timeouts(upstream: UpstreamConfig, seconds: float | None = None) -> httpx.Timeout:
    """Per-phase timeouts, none longer than the `seconds` this attempt has (default: all)."""
    total = upstream.timeout if seconds is None else max(0.001, min(seconds, upstream.timeout))
    return httpx.Timeout(total, connect=min(total, upstream.connect_timeout or total))


async def _get(
    client: httpx.AsyncClient, name: str, url: str, upstream: UpstreamConfig, max_body: int
) -> tuple[bytes, CacheControl]:
    """The decoded body and caching headers of a 2xx answer (the caller bounds the total time)."""
    redirects = Redirects(
        name, upstream, url, outgoing_headers(upstream.headers, upstream.forwarded)
    )
    target: str | httpx.URL = url
    try:
        while True:
            async with client.stream(
                "GET", target, headers=redirects.headers, timeout=_timeouts(upstream)
            ) as resp:
                hop = redirects.next_hop(resp)
                if hop is None:
                    body = _accept(name, resp, max_body)
                    async for chunk in resp.aiter_raw():
                        body.add(chunk)
                    return body.value(), _cache_control(resp)
            target = hop
    except _CALL_ERRORS as exc:
        raise _call_error(name, upstream, exc) from exc


def _get_sync(
    client: httpx.Client,
    name: str,
    url: str,
    upstream: UpstreamConfig,
    max_body: int,
    seconds: float,
) -> tuple[bytes, CacheControl]:
    """`_get` for a blocking client; it bounds the total time itself (see `fetch_sync`)."""
    deadline = time.monotonic() + seconds
    redirects = Redirects(
        name, upstream, url, outgoing_headers(upstream.headers, upstream.forwarded)
    )
    target: str | httpx.URL = url
    try:
        while True:
            with client.stream(
                "GET", target, headers=redirects.headers, timeout=_timeouts(upstream, seconds)
            ) as resp:
                hop = redirects.next_hop(resp)
                if hop is None:
                    body = _accept(name, resp, max_body)
                    for chunk in resp.iter_raw():
                        if time.monotonic() > deadline:
                            raise _cut_off(name, upstream)
                        body.add(chunk)
                    if time.monotonic() > deadline:  # connect and headers alone may take that long
                        raise _cut_off(name, upstream)
                    return body.value(), _cache_control(resp)
            if time.monotonic() > deadline:
                raise _cut_off(name, upstream)
            target = hop
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
