"""Process settings read once from the environment (prefix AGGREGATOR_), passed to create_app."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Mode = Literal["loop", "threads", "serial"]
Engine = Literal["aiohttp", "httpx"]


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
    #: Seconds an idle upstream connection is kept. httpx's default; 30 s made httpcore's pool
    #: ~3x slower at 320 concurrent calls (measured), and a short expiry stays under typical
    #: server idle timeouts (no reuse of a connection the server is closing).
    pool_keepalive_expiry: float = Field(default=5.0, gt=0)
    #: Largest upstream body read before the source is reported `too_large`.
    max_upstream_body: int = Field(default=10 * 1024 * 1024, ge=1)
    #: Largest request body accepted; larger ones get 413 before being buffered whole.
    max_request_body: int = Field(default=1024 * 1024, ge=0)
    #: Threads for `def` views (loop mode) or for whole requests (threads mode).
    threads: int = Field(default=64, ge=1)
