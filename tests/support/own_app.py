"""A developer's own plain Flask app, no engine: what `serve --app`, `hypercorn` and `bench --app`
serve in the tests (`tests.support.own_app:app`, `:create_app()`, `:asgi_app`).

An async view and a `def` view that each wait `DELAY` seconds, one that raises, and an async
`before_request` hook (Flask runs it through `ensure_sync`, which a plain Flask app cannot do on
the server loop without the bridge). `/calls` forwards one GET to the demo upstreams when the
bench says where they are (AGGREGATOR_DEMO_URL), the way a developer's app would.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import httpx
from flask import Flask, g, request

from aggregator import to_asgi

DELAY = 0.3
#: Text of the exception `/boom` raises; it must never reach a client.
SECRET = "own-app-internal-4b1d"


def create_app() -> Flask:
    """The app, built fresh (also served as `tests.support.own_app:create_app()`)."""
    app = Flask(__name__)

    @app.before_request
    async def tag() -> None:
        await asyncio.sleep(0)
        g.tag = request.args.get("tag", "")

    @app.get("/async")
    async def slow_async() -> dict[str, Any]:
        await asyncio.sleep(float(request.args.get("delay", DELAY)))
        return {"view": "async", "tag": g.tag, "thread": threading.current_thread().name}

    @app.get("/sync")
    def slow_sync() -> dict[str, Any]:
        time.sleep(float(request.args.get("delay", DELAY)))
        return {"view": "sync", "tag": g.tag, "thread": threading.current_thread().name}

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError(SECRET)

    @app.get("/calls")
    async def calls() -> dict[str, Any]:
        demo = os.environ.get("AGGREGATOR_DEMO_URL", "http://127.0.0.1:8101")
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = await client.get(f"{demo}/profile/{request.args.get('user_id', '7')}")
        return {"status": answer.status_code}

    return app


app = create_app()
#: What `hypercorn tests.support.own_app:asgi_app` serves.
asgi_app = to_asgi(app)
#: Not an app: `serve --app tests.support.own_app:NOT_AN_APP` must refuse it.
NOT_AN_APP = 42
