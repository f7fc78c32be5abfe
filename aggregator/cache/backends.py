"""Which flask-caching backend serves the cache, configured so a sick backend cannot stall us.

Values are bytes we encode ourselves (JSON, see `entries`); every backend gets a serializer that
stores those bytes as they are, so nothing in the cache is ever pickled (a shared cache that
unpickles is a remote-code-execution hole). Redis clients get short socket timeouts and no
retries: redis-py's defaults (5 s timeouts, retries with backoff) can stall one call for about
a minute when the server accepts connections but never answers.
"""

from __future__ import annotations

import logging
from typing import IO, Any

from cachelib.serializers import BaseSerializer
from flask import Flask
from flask_caching import Cache, backends

from aggregator.errors import ConfigError
from aggregator.settings import PER_PROCESS_CACHES, Settings

logger = logging.getLogger(__name__)


class _RawBytes(BaseSerializer):
    """Stores our already-encoded bytes verbatim, in memory, in files and in Redis.

    cachelib's FileSystemCache also keeps its own file count (an int) through the serializer;
    ints are written as `#<digits>`, which no entry of ours (JSON, starting with `{`) can be.
    """

    def dumps(self, value: Any, protocol: int = 0) -> bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return b"#%d" % value
        raise TypeError(f"aggregator stores bytes only, not {type(value).__name__}")

    def loads(self, bvalue: Any) -> Any:
        if isinstance(bvalue, bytes) and bvalue.startswith(b"#") and bvalue[1:].isdigit():
            return int(bvalue[1:])
        return bvalue

    def dump(self, value: Any, f: IO[bytes], protocol: int = 0) -> None:
        f.write(self.dumps(value))

    def load(self, f: IO[bytes]) -> Any:
        return self.loads(f.read())


# flask-caching's own backends, each with our serializer from construction on (cachelib's
# FileSystemCache writes its count file in __init__, so swapping the serializer later is too late).
# cachelib types each backend's serializer as its own pickle-based class, hence the ignores.
class SimpleCache(backends.SimpleCache):
    serializer = _RawBytes()  # type: ignore[assignment]


class FileSystemCache(backends.FileSystemCache):
    """An unusable directory is an outage like a Redis that is down, not a crash or a silent
    miss: start-up goes on (`/readyz` reports it), and a write that fails raises, so the store
    serves uncached (BYPASS) and backs off, instead of filling and losing every entry."""

    serializer = _RawBytes()  # type: ignore[assignment]

    def __init__(self, cache_dir: str, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(cache_dir, *args, **kwargs)
        except OSError as exc:
            # cachelib creates the directory and writes its file count here; every later call
            # fails (and is reported by the store) until the directory is usable.
            logger.warning("cache directory %s is unusable: %s; serving uncached", cache_dir, exc)

    @property
    def _file_count(self) -> int:
        # cachelib keeps its own file count in a file of the directory and compares it with the
        # threshold on every write: a count file holding anything but our int (written by hand,
        # corrupted) would fail every write forever. Read it as 0 and it heals on the next one.
        count = self.get(self._fs_count_file)
        return count if isinstance(count, int) else 0

    def set(self, key: str, value: Any, timeout: Any = None, mgmt_element: bool = False) -> bool:
        if not super().set(key, value, timeout, mgmt_element):  # cachelib logs and says False
            raise OSError(f"could not write a cache file in {self._path}")
        return True


class RedisCache(backends.RedisCache):
    serializer = _RawBytes()  # type: ignore[assignment]


class RedisSentinelCache(backends.RedisSentinelCache):
    serializer = _RawBytes()  # type: ignore[assignment]


class RedisClusterCache(backends.RedisClusterCache):
    """cachelib's MGET/DEL span hash slots, which a real cluster refuses; split them per slot."""

    serializer = _RawBytes()  # type: ignore[assignment]

    def get_many(self, *keys: str) -> list[Any]:
        prefixed = [f"{self._get_prefix()}{key}" for key in keys]
        return [self.serializer.loads(x) for x in self._read_client.mget_nonatomic(prefixed)]

    def delete_many(self, *keys: str) -> Any:
        return sum(self._write_client.delete(f"{self._get_prefix()}{key}") for key in keys)


class NullCache(backends.NullCache):
    serializer = _RawBytes()


_BACKENDS: dict[str, type[backends.BaseCache]] = {
    "simple": SimpleCache,
    "filesystem": FileSystemCache,
    "redis": RedisCache,
    "redissentinel": RedisSentinelCache,
    "rediscluster": RedisClusterCache,
    "null": NullCache,
}


def check_cache_settings(settings: Settings) -> None:
    """Refuse combinations that cannot work, saying what to use instead."""
    if settings.cache_type in PER_PROCESS_CACHES and settings.workers > 1:
        raise ConfigError(
            "AGGREGATOR_CACHE_TYPE",
            [
                f"cache_type={settings.cache_type!r} keeps entries inside one process, but "
                f"{settings.workers} workers are configured: each would fill and miss on its "
                "own. Use cache_type='filesystem' (several workers on one host) or 'redis' "
                "(several hosts), or run one worker."
            ],
        )


def _redis_options(settings: Settings) -> dict[str, Any]:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {
        "socket_timeout": settings.cache_timeout,
        "socket_connect_timeout": settings.cache_timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


def redis_nodes(settings: Settings) -> list[tuple[str, int]]:
    """`cache_redis_nodes` as (host, port) pairs (Sentinels or Cluster nodes)."""
    nodes = []
    for item in filter(None, (n.strip() for n in settings.cache_redis_nodes.split(","))):
        host, _, port = item.rpartition(":")
        nodes.append((host, int(port)))
    return nodes


def build_cache(app: Flask, settings: Settings) -> Cache:
    """The flask-caching `Cache` for `app`, with our serializer on its backend."""
    check_cache_settings(settings)
    config: dict[str, Any] = {
        "CACHE_TYPE": f"{__name__}.{_BACKENDS[settings.cache_type].__name__}",
        "CACHE_KEY_PREFIX": settings.cache_key_prefix,
        "CACHE_DEFAULT_TIMEOUT": 300,
        "CACHE_THRESHOLD": 10_000,
    }
    if settings.cache_type == "filesystem":
        config["CACHE_DIR"] = str(settings.cache_dir)
    elif settings.cache_type == "redis":
        config["CACHE_REDIS_URL"] = settings.cache_redis_url
        config["CACHE_OPTIONS"] = _redis_options(settings)
    elif settings.cache_type == "redissentinel":
        config["CACHE_REDIS_SENTINELS"] = redis_nodes(settings)
        config["CACHE_REDIS_SENTINEL_MASTER"] = settings.cache_redis_master
        config["CACHE_OPTIONS"] = _redis_options(settings)
    elif settings.cache_type == "rediscluster":
        config["CACHE_REDIS_CLUSTER"] = ",".join(f"{h}:{p}" for h, p in redis_nodes(settings))
        config["CACHE_OPTIONS"] = _redis_options(settings)
    return Cache(app, config=config)
