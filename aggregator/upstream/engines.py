"""How the shared upstream client is built: engine choice and the fixes each engine needs.

Kept apart from `client` (which makes the calls) because this is where httpx, httpcore and
aiohttp internals are touched; each fix says which upstream bug it works around and is covered
by a test that fails without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import httpcore
import httpx
import yarl
from httpx_aiohttp import AiohttpTransport, HttpxAiohttpClient
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions

from aggregator.settings import Settings
from aggregator.upstream.checks import ACCEPT_ENCODING


class _OrphanSafePool(httpcore.AsyncConnectionPool):
    """httpcore's pool, minus the leak that poisons it after a cancellation.

    A request cancelled after the pool created a connection for it, but before that connection
    connected, leaves the connection behind: never connected, never failed, owned by no request.
    No cleanup branch matches it, so it holds a slot forever; once `max_connections` of them
    pile up every call fails with PoolTimeout (httpcore 1.0.9, encode/httpcore#1093, unfixed
    upstream). Deadlines and client disconnects cancel exactly like that, so we drop such
    orphans before each assignment pass.
    """

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        owned = {id(r.connection) for r in self._requests if r.connection is not None}
        for conn in list(self._connections):
            if (
                isinstance(conn, httpcore.AsyncHTTPConnection)
                and conn._connection is None
                and not conn._connect_failed
                and id(conn) not in owned
            ):
                self._connections.remove(conn)
        return super()._assign_requests_to_connections()


def _httpx_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    # Same pool, same state, one overridden method: swapping the class keeps every argument
    # httpx passed to the pool instead of re-deriving them here.
    transport._pool.__class__ = _OrphanSafePool
    return transport


class _VerbatimUrlTransport(AiohttpTransport):
    """httpx-aiohttp's transport, except that aiohttp gets the URL exactly as httpx encoded it.

    The stock transport passes `str(request.url)`, which yarl parses again: it decodes `%2E`
    (an unreserved character) and then removes dot segments, so a path value of `..` that
    urltemplate sent as `%2E%2E` would climb one level on the upstream. httpx has already
    encoded the URL, so yarl is told to leave it alone. Proxies are not supported (trust_env
    is off and none are configured). Its session keeps no cookies (see `_NoCookies`).
    """

    def get_client(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        timeout = request.extensions.get("timeout", {})
        with map_aiohttp_exceptions():
            data: bytes | httpx.AsyncByteStream | None
            try:
                data = request.content or None
            except httpx.RequestNotRead:
                data = request.stream  # type: ignore[assignment]  # aiohttp streams it
                request.headers.pop("transfer-encoding", None)
            response = await self.client.request(
                method=request.method,
                url=yarl.URL(str(request.url), encoded=True),
                headers=request.headers,
                data=data,
                allow_redirects=False,
                auto_decompress=False,
                compress=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                    connect=timeout.get("pool"),
                ),
                server_hostname=request.extensions.get("sni_hostname"),
            ).__aenter__()
        extensions = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=AiohttpResponseStream(response),
            request=request,
            extensions=extensions,
        )


class _NoCookies(httpx.Cookies):
    """A cookie jar that never stores anything.

    The client is shared by every request of the worker: a `Set-Cookie` from an upstream
    answering one user must never ride along on the next user's call. (Skipping the jar also
    saves CPU on every call: docs/benchmarks.md, "Figures behind the code's comments".)
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set(self, name: str, value: str, domain: str = "", path: str = "/") -> None:
        return None


class _NoRedirectCrash(httpx._client.BaseClient):
    """httpx's client, minus the crash on a malformed `Location` in a redirect it won't follow.

    Even with `follow_redirects=False` httpx builds the next request of every 3xx (for
    `response.next_request`), and a `Location` such as `javascript:alert(1)` makes that raise
    `InvalidURL` out of `send`: an upstream could turn a call into an exception instead of a
    result (httpx 0.28.1). We never use `next_request` (`checks.Redirects` judges the Location
    itself), so an unbuildable one is left pointing at the request that got it.
    """

    def _build_redirect_request(
        self, request: httpx.Request, response: httpx.Response
    ) -> httpx.Request:
        try:
            return super()._build_redirect_request(request, response)
        except (httpx.InvalidURL, httpx.RemoteProtocolError):
            return request


class _AsyncClient(_NoRedirectCrash, httpx.AsyncClient):
    """httpx's async client on its own engine (httpcore), with the fix above."""


class _AiohttpClient(_NoRedirectCrash, HttpxAiohttpClient):
    """httpx's async client on aiohttp's engine, with the fix above."""


class _SyncClient(_NoRedirectCrash, httpx.Client):
    """httpx's blocking client, with the fix above."""


def _limits(settings: Settings) -> httpx.Limits:
    return httpx.Limits(
        max_connections=settings.pool_max_connections,
        max_keepalive_connections=settings.pool_max_keepalive,
        keepalive_expiry=settings.pool_keepalive_expiry,
    )


def build_client(settings: Settings) -> httpx.AsyncClient:
    """A client on the configured engine with pool limits sized for fan-out concurrency."""
    limits = _limits(settings)
    kwargs: dict[str, Any] = {
        "limits": limits,
        "follow_redirects": False,  # `aggregator.upstream.checks.Redirects` decides, per source
        "trust_env": False,
        "headers": {"Accept-Encoding": ACCEPT_ENCODING},
    }
    if settings.engine == "aiohttp":
        transport = _VerbatimUrlTransport(limits=limits, trust_env=False)
        client: httpx.AsyncClient = _AiohttpClient(transport=transport, **kwargs)
    else:
        client = _AsyncClient(transport=_httpx_transport(limits), **kwargs)
    client._cookies = _NoCookies()  # the public setter would copy into a normal jar
    return client


def build_sync_client(settings: Settings) -> httpx.Client:
    """A blocking client for the sync twins: same pool limits, no cookie jar, no env proxies.

    Always httpx's own (httpcore) transport: the engine setting chooses between async stacks,
    and the orphan fix above concerns cancelled tasks, which threads do not have.
    """
    limits = _limits(settings)
    transport = httpx.HTTPTransport(limits=limits, trust_env=False)
    client = _SyncClient(
        transport=transport,
        limits=limits,
        follow_redirects=False,
        trust_env=False,
        headers={"Accept-Encoding": ACCEPT_ENCODING},
    )
    client._cookies = _NoCookies()  # shared by every thread: nothing may carry over
    return client


@dataclass(frozen=True, slots=True)
class PoolUsage:
    """What a client's connection pool holds right now (for /readyz and leak tests)."""

    #: Connections serving a request (connecting, sending or reading).
    in_use: int
    #: Open connections kept for reuse.
    idle: int
    #: Requests waiting for a connection.
    waiting: int


def pool_usage(client: httpx.AsyncClient) -> PoolUsage:
    """Count the pool's connections by state, on either engine (reads their private state).

    After every request has ended, `in_use` and `waiting` must be 0 whatever happened to the
    calls (deadlines, cancellations, bodies cut short); a leaked connection stays `in_use`.
    """
    transport = client._transport
    if isinstance(transport, httpx.AsyncHTTPTransport):
        pool = transport._pool
        conns = pool.connections
        idle = sum(1 for c in conns if c.is_idle())
        in_use = sum(1 for c in conns if not (c.is_idle() or c.is_closed()))
        waiting = sum(1 for r in pool._requests if r.connection is None)
        return PoolUsage(in_use=in_use, idle=idle, waiting=waiting)
    session = getattr(transport, "client", None)
    connector = session.connector if isinstance(session, aiohttp.ClientSession) else None
    if not isinstance(connector, aiohttp.BaseConnector):
        return PoolUsage(in_use=0, idle=0, waiting=0)  # no request yet: no session either
    return PoolUsage(
        in_use=len(connector._acquired),
        idle=sum(len(kept) for kept in connector._conns.values()),
        waiting=sum(len(queue) for queue in connector._waiters.values()),
    )
