"""`to_asgi`: any Flask app as the ASGI application our adapter serves, in any mode.

The public door to `ASGIAdapter` for a developer's own app (`aggregator serve --app`, `hypercorn
module:asgi_app`, `aggregator bench --app`); `create_asgi_app` is the same door for ours.
"""

from __future__ import annotations

from typing import get_args

from flask import Flask

from aggregator.engine import find_engine
from aggregator.serving.adapter import ASGIAdapter
from aggregator.settings import Mode, Settings

MODES: tuple[Mode, ...] = get_args(Mode)


def to_asgi(
    app: Flask, *, mode: Mode | None = None, settings: Settings | None = None
) -> ASGIAdapter:
    """Wrap `app`, any Flask app, for an ASGI server: our lifespan, limits and serving modes.

    In ``loop`` mode (the default) the app's `async def` views, hooks and error handlers are
    awaited on the server loop (a greenlet per request, no thread hand-off) and its plain
    `def` views run on a bounded pool, so neither blocks the loop; ``threads`` runs each
    request in a pool thread; ``serial`` is asgiref's stock one-thread recipe. Whatever the
    mode: request header and body limits (431, 413, 408), a 503 with `Retry-After` past
    `max_in_flight`, `X-Request-ID` on every response, one `aggregator.access` log line per
    request, and a graceful shutdown that waits for the requests still inside Flask. Streamed
    responses (a generator, `stream_with_context`, `send_file`) are sent chunk by chunk with
    back-pressure, their Content-Length kept and their close() always called (``serial``
    leaves them to asgiref's stock adapter).

    The app is given the bridge in place (its class gains a mixin; `bridge.bridge` says why),
    so views registered before or after this call behave alike, and Flask's test client or
    `flask run` still work on it. An app carrying our engine (built by `create_app`, or given
    one by the `Aggregator` extension) also gets the engine's lifespan, its cache fast path and
    its route metrics.

    `settings`: how to serve (mode, limits, pool sizes); by default the engine's, else
    `Settings()` (the AGGREGATOR_* environment). `mode` overrides the settings' mode.

    Example (`hello.py`; `hypercorn hello:asgi_app` serves it, or run it as it is)::

        import asyncio

        import httpx
        from flask import Flask

        import aggregator

        app = Flask(__name__)


        @app.get("/hello")
        async def hello() -> dict[str, str]:
            await asyncio.sleep(0.1)  # awaited on the server loop: many at once overlap
            return {"hello": "world"}


        asgi_app = aggregator.to_asgi(app)  # loop mode unless AGGREGATOR_MODE says otherwise


        async def main() -> None:
            async with asgi_app.lifespan():  # what the server's lifespan does
                transport = httpx.ASGITransport(app=asgi_app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    print((await c.get("/hello")).json())  # {'hello': 'world'}


        if __name__ == "__main__":
            asyncio.run(main())
    """
    if not isinstance(app, Flask):
        raise TypeError(f"to_asgi() needs a Flask app, not {type(app).__name__}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if settings is None:
        engine = find_engine(app)
        settings = engine.settings if engine is not None else Settings()
    if mode is not None and mode != settings.mode:
        settings = settings.model_copy(update={"mode": mode})
    return ASGIAdapter(app, settings)
