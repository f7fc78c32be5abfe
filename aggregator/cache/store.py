"""Async access to the flask-caching backend that never blocks the loop and never fails a request.

flask-caching's backends are synchronous. Redis and file backends do blocking I/O, so their
calls run in a small thread pool, each bounded by `cache_timeout`; the in-memory SimpleCache is
called inline (a thread hop would cost more than the lookup, and a hit should need none).
Any failure (down, slow, garbage from the backend) raises CacheUnavailableError, which callers
turn into "serve uncached" (X-Cache: BYPASS). After a failure the cache is skipped for
`cache_retry_after` seconds, so an outage costs one timeout per interval, not one per request,
and the problem is logged once per `cache_log_interval`, not once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from flask_caching import Cache
from flask_caching import backends as flask_caching_backends

from aggregator.cache import backends
from aggregator.errors import CacheUnavailableError
from aggregator.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class CacheStore:
    """get/set/delete/lock on the backend, bounded, off the loop when the backend blocks."""

    def __init__(
        self, cache: Cache, settings: Settings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.backend: Any = cache.cache
        # In-memory backends: no blocking I/O (called inline), and nothing another process sees.
        self.inline = isinstance(self.backend, backends.SimpleCache | backends.NullCache)
        #: AGGREGATOR_CACHE_TYPE=null: caching off (nothing stored, not even in a worker's memory).
        self.stores_nothing = isinstance(self.backend, backends.NullCache)
        # flask-caching's Redis base: Sentinel and Cluster backends lock across processes too.
        self.is_redis = isinstance(self.backend, flask_caching_backends.RedisCache)
        self.settings = settings
        self._clock = clock
        self._down_until = 0.0
        self._last_log = -float("inf")
        self._suppressed = 0
        self.failures = 0
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="aggregator-cache")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for name in ("_write_client", "_read_client"):
            client = getattr(self.backend, name, None)
            if client is not None and hasattr(client, "close"):
                with contextlib.suppress(Exception):  # closing a dead connection may raise
                    client.close()

    @property
    def shared(self) -> bool:
        """Whether other processes read this cache (files, Redis), so warming it helps them."""
        return not self.inline

    @property
    def available(self) -> bool:
        return self._clock() >= self._down_until

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if not self.available:
            raise CacheUnavailableError(f"cache skipped after a recent failure ({what})")
        return await self._run(what, fn, *args, **kwargs)

    async def _run(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            if self.inline:
                return fn(*args, **kwargs)
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._pool, partial(fn, *args, **kwargs))
            async with asyncio.timeout(self.settings.cache_timeout):
                return await future
        except Exception as exc:  # a sick backend raises anything; the request must not care
            self._failed(what, exc)
            raise CacheUnavailableError(f"cache {what} failed: {exc!r}") from exc

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        now = self._clock()
        self._down_until = now + self.settings.cache_retry_after
        if now - self._last_log >= self.settings.cache_log_interval:
            extra = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            reason = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
            logger.warning(
                "cache %s failed: %s; serving uncached for %.1f s%s",
                what,
                reason,
                self.settings.cache_retry_after,
                extra,
            )
            self._last_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    async def ping(self) -> str:
        """Whether the backend answers now (readiness); returns what was checked.

        Unlike the other calls it ignores the cool-down after a failure (a probe must look, not
        repeat the last verdict), but it is bounded and off the loop like them, and a failure
        counts like theirs: requests then skip the cache for `cache_retry_after`.
        """
        return await self._run("ping", _ping_backend, self.backend)

    async def get_many(self, *keys: str) -> list[Any]:
        result: list[Any] = await self._call("get", self.backend.get_many, *keys)
        return result

    async def set(self, key: str, value: bytes, timeout: int) -> None:
        await self._call("set", self.backend.set, key, value, timeout=timeout)

    async def delete_many(self, *keys: str) -> None:
        await self._call("delete", self.backend.delete_many, *keys)

    # -- cross-process lock (Redis only) ----------------------------------------------------

    async def try_lock(self, key: str, ttl: float) -> str | None:
        """A token when this process now holds `key` (SET NX PX); None when another does."""
        if not self.is_redis:
            return ""  # no cross-process lock on this backend: in-process single-flight only
        token = secrets.token_hex(8)
        client = self.backend._write_client
        name = self.backend.key_prefix + key
        ok = await self._call("lock", client.set, name, token, nx=True, px=int(ttl * 1000))
        return token if ok else None

    async def unlock(self, key: str, token: str) -> None:
        if not self.is_redis or not token:
            return
        client = self.backend._write_client
        await self._call("unlock", client.eval, _UNLOCK, 1, self.backend.key_prefix + key, token)


def _ping_backend(backend: Any) -> str:
    """The cheapest real round trip per backend (blocking: runs in the store's pool)."""
    if isinstance(backend, backends.NullCache):
        return "null backend (caching off)"
    if isinstance(backend, backends.SimpleCache):
        return "in-process memory"
    if isinstance(backend, flask_caching_backends.RedisCache):
        # Sentinel and Cluster backends read from replicas: both sides must answer.
        clients = {id(c): c for c in (backend._write_client, backend._read_client)}
        for client in clients.values():
            if not client.ping():
                raise ConnectionError("PING was not answered with PONG")
        return "redis PING answered"
    if isinstance(backend, backends.FileSystemCache):
        # A file created and removed proves the directory exists and is writable, without
        # cachelib's set(), which may prune (list) the whole directory.
        fd, name = tempfile.mkstemp(prefix=".readyz-", dir=backend._path)
        os.close(fd)
        os.unlink(name)
        return f"directory {backend._path} writable"
    raise TypeError(f"no readiness check for {type(backend).__name__}")
