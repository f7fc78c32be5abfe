"""A test-only ASGI app: the real one plus failures in every place a request can run code.

Served by real Hypercorn (`serve(..., app="tests.support.crashing_app:create()")`) to prove that no
traceback or exception text ever reaches a response body, whatever fails.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aggregator import create_asgi_app_or_exit
from aggregator.cache import Lookup
from aggregator.log import configure_logging
from aggregator.serving import ASGIAdapter
from aggregator.serving.answers import FastAnswer

#: Text carried by every injected exception; it must never appear in a response.
SECRET = "internal-detail-7f3a9c"


def _fail() -> Any:
    raise RuntimeError(f"{SECRET}: /etc/aggregator/secret.toml line 3")


def add_failing_routes(adapter: ASGIAdapter) -> None:
    """`/boom/async` and `/boom/sync` raise in the view; `/boom/fast` in the adapter's fast path."""

    async def boom_async() -> Any:
        return _fail()

    def boom_sync() -> Any:
        return _fail()

    adapter.app.add_url_rule("/boom/async", view_func=boom_async)
    adapter.app.add_url_rule("/boom/sync", view_func=boom_sync)
    fast_path = adapter.fast_path

    async def failing_fast_path(
        path: str, query: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> tuple[FastAnswer | None, Lookup | None]:
        if path == "/boom/fast":
            _fail()
        return await fast_path(path, query, headers)

    adapter.fast_path = failing_fast_path


def create() -> ASGIAdapter:
    """What Hypercorn serves: the app `asgi.py` builds, plus the failing routes."""
    configure_logging()
    adapter = create_asgi_app_or_exit()
    add_failing_routes(adapter)
    return adapter
