"""The sync twins' upstream call: `fetch` for plain `def` views on a blocking `httpx.Client`.

A benchmark comparison only (the classic blocking style), so it lives with the twins and not in
the core. Every step that does not wait is the async call's own (`aggregator.upstream.client`
and `aggregator.upstream.checks`): limits, redirects, checks, error translation and the DEBUG
line are shared, so a failure maps to the same kind whichever style made the call. It logs
under the async call's logger (`aggregator.upstream`) for the same reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import httpx

from aggregator.config import UpstreamConfig
from aggregator.context import outgoing_headers
from aggregator.errors import UpstreamError
from aggregator.models import CacheControl, SourceResult
from aggregator.params import ParamValue
from aggregator.resilience import UpstreamGuard
from aggregator.settings import Settings
from aggregator.upstream.checks import Redirects, decode
from aggregator.upstream.client import (
    _CALL_ERRORS,
    _accept,
    _cache_control,
    _call_error,
    _cut_off,
    _failure,
    _log_call,
    _refused,
    _success,
    _timeouts,
)
from aggregator.upstream.engines import build_sync_client

logger = logging.getLogger("aggregator.upstream")


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
