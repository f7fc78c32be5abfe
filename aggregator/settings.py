"""Process settings read once from the environment (prefix AGGREGATOR_), passed to create_app."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from aggregator.errors import AggregatorError

ENV_PREFIX = "AGGREGATOR_"


class SettingsError(AggregatorError, ValueError):
    """An AGGREGATOR_* variable is unusable: one line naming the variable, the value and what
    is allowed (the `aggregator` command prints it and exits 2)."""


Mode = Literal["loop", "threads", "serial"]
Engine = Literal["aiohttp", "httpx"]
#: Where /metrics is served on the main port: behind the admin token (default), to anyone, or
#: nowhere (and nothing is recorded).
MetricsMode = Literal["token", "public", "off"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["text", "json"]
#: Where breakers and concurrency limits live: each worker (off) or the cache's Redis (fleet-wide).
SharedResilience = Literal["off", "redis"]
#: What Hypercorn parses HTTP/1.1 with: stock h11, or its compiled fork (aggregator.serving.http1).
Http1Parser = Literal["h11", "h11-mypyc"]
CacheType = Literal["simple", "filesystem", "redis", "redissentinel", "rediscluster", "null"]
#: Backends whose entries live inside one process: useless (and wrong) with several workers.
PER_PROCESS_CACHES = frozenset({"simple"})


class Settings(BaseSettings):
    """Serving and client settings; the aggregates themselves live in the TOML config."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    def __init__(self, **values: Any) -> None:
        """From the environment (and `values`); SettingsError, one line, when one is unusable."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(describe(exc, type(self).model_fields, given=values)) from None

    #: TOML file with upstreams and aggregates; None means the bundled demo config.
    config: Path | None = None
    #: How the ASGI adapter runs Flask (docs/architecture.md, serving).
    mode: Mode = "loop"
    #: Connection engine under httpx's API; aiohttp's costs less CPU per call (docs/benchmarks.md).
    engine: Engine = "aiohttp"
    #: h11-mypyc: Hypercorn parses HTTP/1.1 with the compiled h11 fork (`fast` extra), checked
    #: at start-up; stock h11 when it is missing or fails the checks (one warning line).
    http1_parser: Http1Parser = "h11"
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
    #: Seconds the lifespan shutdown waits for requests still inside Flask, for an app served
    #: without an engine (`to_asgi` of a plain Flask app; with one, the longest aggregate
    #: deadline plus a second). Under Hypercorn its graceful_timeout has ended them already.
    drain_timeout: float = Field(default=10.0, gt=0)
    #: Threads for `def` views (loop mode) or for whole requests (threads mode).
    threads: int = Field(default=64, ge=1)
    #: The cyclic GC's generation-0 threshold in a serving process (Python's is 700), set with
    #: start-up objects frozen once the lifespan has started (`gc_tuning.tune_gc`: why); 0 keeps
    #: Python's collector as it is.
    gc_threshold: int = Field(default=10_000, ge=0)
    #: Worker processes serving this config (`aggregator serve` sets it from --workers /
    #: hypercorn.toml); a per-process cache with several workers is refused.
    workers: int = Field(default=1, ge=1)

    # -- caching (flask-caching backends) ------------------------------------------------
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

    # -- shared resilience state (aggregator.resilience.shared; docs/resilience.md) ----------
    #: off: every worker keeps its own breakers and limits; redis: one breaker (one probe per
    #: cool-down) and one max_concurrency per upstream for the whole fleet, in the cache's
    #: Redis (needs a redis* cache_type), failing open to the local state when Redis is away.
    shared_resilience: SharedResilience = "off"
    #: Bound on each shared-state command; past it the worker decides alone (fails open).
    shared_resilience_timeout: float = Field(default=0.25, gt=0, le=5)
    #: Seconds between reads of the fleet's state (how soon a worker sees another's trip).
    shared_resilience_interval: float = Field(default=0.25, gt=0, le=10)
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


def describe(
    exc: ValidationError, fields: dict[str, FieldInfo], given: dict[str, Any] | None = None
) -> str:
    """pydantic's errors about settings as one line: `AGGREGATOR_MODE='fast': expected one of
    loop, threads, serial` (the variable, the value as set and what is allowed). `given`: the
    values passed in code, which the environment does not override."""
    parts = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else "?"
        field = fields.get(name)
        variable = ENV_PREFIX + name.upper()
        secret = field is not None and "SecretStr" in str(field.annotation)
        raw = os.environ.get(variable) if name not in (given or {}) else None
        value = "<hidden>" if secret else repr(raw if raw is not None else error.get("input"))
        if error["type"] == "value_error":
            allowed = str(error.get("ctx", {}).get("error", error["msg"]))
        else:
            allowed = _allowed(field) if field is not None else ""
            allowed = f"expected {allowed}" if allowed else error["msg"]
        parts.append(f"{variable}={value}: {allowed}")
    return "; ".join(parts)


def _allowed(field: FieldInfo) -> str:
    """What a field accepts, in words (empty when there is nothing better than pydantic's)."""
    annotation = field.annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(annotation))
    if annotation is bool:
        return "true or false (1/0, yes/no, on/off)"
    kind = "an integer" if annotation is int else "a number" if annotation is float else None
    if kind is None:
        if args and get_origin(args[0]) is Literal:
            return "one of " + ", ".join(str(a) for a in get_args(args[0]))
        return ""
    bounds = []
    for rule in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(rule, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{sign} {getattr(rule, attr)}")
    return f"{kind} {' and '.join(bounds)}" if bounds else kind
