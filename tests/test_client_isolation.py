"""The shared client carries nothing from one user's upstream call into another's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from aggregator.config import UpstreamConfig
from aggregator.settings import Engine, Settings
from aggregator.upstream import fetch
from aggregator.upstream.engines import build_client


@pytest.fixture
async def cookie_server() -> AsyncIterator[str]:
    """Sets a session cookie on every answer and reports the Cookie header it received."""

    async def handler(request: web.Request) -> web.Response:
        response = web.json_response({"cookie": request.headers.get("Cookie")})
        response.set_cookie("session", f"user-{request.match_info['user']}")
        return response

    app = web.Application()
    app.router.add_get("/u/{user}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize("engine", ["aiohttp", "httpx"])
async def test_upstream_cookies_never_leak_between_calls(
    cookie_server: str, engine: Engine
) -> None:
    upstream = UpstreamConfig(url=cookie_server + "/u/{user}")
    async with build_client(Settings(engine=engine)) as client:
        first = await fetch(client, "u", upstream, {"user": "alice"}, max_body=1000)
        second = await fetch(client, "u", upstream, {"user": "bob"}, max_body=1000)
        assert len(client.cookies) == 0
    assert first.ok and second.ok, (first, second)
    assert first.data == {"cookie": None}
    assert second.data == {"cookie": None}  # alice's session cookie was not sent for bob
