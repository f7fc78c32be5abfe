"""Process settings read once from the environment (prefix AGGREGATOR_), passed to create_app."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Mode = Literal["loop", "threads", "serial"]
Engine = Literal["aiohttp", "httpx"]
#: Where /metrics is served on the main port: behind the admin token (default), to anyone, or
#: nowhere (and nothing is recorded).
MetricsMode = Literal["token", "public", "off"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["text", "json"]
CacheType = Literal["simple", "filesystem", "redis", "redissentinel", "rediscluster", "null"]
#: Backends whose entries live inside one process: useless (and wrong) with several workers.
PER_PROCESS_CACHES = frozenset({"simple"})


class Settings(BaseSettings):
    """Serving and client settings; the aggregates themselves live in the TOML config."""

    model_config = SettingsConfigDict(env_prefix="AGGREGATOR_", extra="ignore", frozen=True)

    #: TOML file with upstreams and aggregates; None means the bundled demo config.
    config: Path | None = None
    #: How the ASGI adapter runs Flask (DESIGN §2).
    mode: Mode = "loop"
    #: Connection engine under httpx's API; aiohttp's costs half the CPU per call (DESIGN §1).
    engine: Engine = "aiohttp"
    #: Upstream connections per worker; must exceed concurrent upstream calls or calls queue.
    pool_max_connections: int = Field(default=1024, ge=1)
    pool_max_keepalive: int = Field(default=256, ge=0)
    #: Seconds an idle upstream connection is kept. httpx's default; a long expiry slows
    #: httpcore's pool scan under many concurrent calls, and a short one stays under typical
    #: server idle timeouts (no reuse of a connection the server is closing).
    pool_keepalive_expiry: float = Field(default=5.0, gt=0)
    #: Largest upstream body read before the source is reported `too_large`.
    max_upstream_body: int = Field(default=10 * 1024 * 1024, ge=1)
    #: Largest request body accepted; larger ones get 413 before being buffered whole.
    max_request_body: int = Field(default=1024 * 1024, ge=0)
    #: Seconds a request body may take to arrive in full; a stalled one gets 408.
    request_body_timeout: float = Field(default=10.0, gt=0)
    #: Most request headers, and most bytes of them (names and values), accepted; beyond
    #: either the adapter answers 431 before Flask sees the request.
    max_request_headers: int = Field(default=100, ge=1)
    max_request_header_bytes: int = Field(default=16 * 1024, ge=1)
    #: Requests inside Flask at once, per worker; more are answered 503 with Retry-After at once
    #: instead of queueing (cache hits answered before Flask and /healthz, /readyz are neither
    #: counted nor refused). 0 = no limit. 4x the c=256 bench load of one worker.
    max_in_flight: int = Field(default=1024, ge=0)
    #: Seconds a client is asked to wait (Retry-After) when refused by `max_in_flight`.
    overload_retry_after: int = Field(default=1, ge=0, le=3600)
    #: Threads for `def` views (loop mode) or for whole requests (threads mode).
    threads: int = Field(default=64, ge=1)
    #: The cyclic GC's generation-0 threshold in a serving process (Python's is 700), set with
    #: start-up objects frozen once the lifespan has started (`gc_tuning.tune_gc`: why); 0 keeps
    #: Python's collector as it is.
    gc_threshold: int = Field(default=10_000, ge=0)
    #: Worker processes serving this config (`aggregator serve` sets it from --workers /
    #: hypercorn.toml); a per-process cache with several workers is refused.
    workers: int = Field(default=1, ge=1)

    # -- caching (flask-caching backends; DESIGN §5) -----------------------------------------
    #: simple: one process; filesystem: several workers on one host; redis*: several hosts.
    cache_type: CacheType = "simple"
    cache_dir: Path = Path("/tmp/aggregator-cache")
    cache_redis_url: str = "redis://127.0.0.1:6379/0"
    #: Comma-separated host:port list (redissentinel) or cluster nodes (rediscluster).
    cache_redis_nodes: str = ""
    cache_redis_master: str = "mymaster"
    cache_key_prefix: str = "aggregator:"
    #: Bound on every cache call; past it the request is served uncached (X-Cache: BYPASS).
    cache_timeout: float = Field(default=0.25, gt=0)
    #: After a cache failure, skip the cache for this long instead of paying the timeout again.
    cache_retry_after: float = Field(default=1.0, ge=0)
    #: A fresh entry read from the backend is reused in-process (already decoded and checked)
    #: for up to this long: hot keys then cost no backend round trip, thread hop or decoding.
    #: Purges and refreshes by other workers show within this time (a purge from this process
    #: at once). 0 turns the near cache off.
    cache_local_ttl: float = Field(default=1.0, ge=0, le=60)
    #: Seconds between repeated log lines about the same cache problem.
    cache_log_interval: float = Field(default=30.0, gt=0)
    #: Longest a request waits for another request's fill of the same key before its own.
    singleflight_wait: float = Field(default=10.0, gt=0)
    #: Token for the admin endpoints (Authorization: Bearer ...); unset disables them.
    admin_token: SecretStr | None = None
    #: The live dashboard page at `/` (and its assets under /static/); off: both are 404.
    #: `/status` stays, for scripts and probes.
    dashboard: bool = True

    # -- metrics (aggregator.metrics; README "Metrics") -----------------------------------------
    #: token: GET /metrics needs the admin token (404 while none is set); public: no token;
    #: off: no /metrics and no recording at all (the hot path skips every metrics call).
    metrics: MetricsMode = "token"
    #: host:port of a separate plain-HTTP metrics listener, opened by `aggregator serve` in its
    #: parent process (it reads every worker's numbers); unauthenticated, so bind it privately.
    metrics_bind: str | None = None

    # -- logging (aggregator.log applies them before the app is built; checked here) -----------
    #: INFO: one line per request (aggregator.access); DEBUG adds one per upstream call.
    log_level: LogLevel = "INFO"
    #: text, or json: one JSON object per line (time, level, logger, message, request_id, ...).
    log_format: LogFormat = "text"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    def admin_secret(self) -> str:
        """The admin token, or "" when none is set (an empty one counts as none)."""
        return self.admin_token.get_secret_value() if self.admin_token else ""

    @field_validator("metrics_bind")
    @classmethod
    def _check_bind(cls, value: str | None) -> str | None:
        if value is not None:
            split_bind(value)
        return value


def split_bind(bind: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets: `[::1]:9100`) as (host, port); ValueError naming the fault."""
    host, sep, port = bind.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{bind!r} is not host:port (e.g. 127.0.0.1:9100)")
    return host.removeprefix("[").removesuffix("]"), int(port)
