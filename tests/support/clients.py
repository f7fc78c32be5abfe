"""Clients of the app and of upstreams: the upstream engines, upstream configs, a port nobody
listens on, and raw ASGI scopes."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from aggregator.config import UpstreamConfig

#: The two upstream client engines, as pytest params (ids "aiohttp" and "httpx").
ENGINES = [pytest.param("aiohttp", id="aiohttp"), pytest.param("httpx", id="httpx")]


def http_scope(path: str, query: bytes = b"", headers: list[Any] | None = None) -> dict[str, Any]:
    """An ASGI HTTP scope for `path`: a GET, or a POST when `headers` are given."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST" if headers else "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers or [],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


def closed_port() -> int:
    """A loopback port nothing listens on: bound to learn it, then closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def upstream(url: str, **extra: Any) -> UpstreamConfig:
    """One upstream's config, validated as the config file's would be."""
    return UpstreamConfig.model_validate({"url": url, **extra})
