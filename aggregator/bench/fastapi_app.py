"""The FastAPI + uvicorn reference: what a user leaving Flask for the same fan-out would run.

`uvicorn aggregator.bench.fastapi_app:app` serves every configured aggregate (AGGREGATOR_CONFIG)
the idiomatic FastAPI way: one shared `httpx.AsyncClient` opened in the lifespan, an `async def`
endpoint per aggregate. The fan-out, validation, resilience and merge are aggregator's own
(`fan_out` with the same per-upstream guards, `merge`), on a client built with the same settings
(engine, pool, timeouts), so the comparison
isolates the framework and server: Flask + our adapter + Hypercorn vs FastAPI + uvicorn. It has
no cache (the bench compares uncached fan-outs with it). Needs the `bench` extra.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import parse_qs

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from aggregator.config import AppConfig, load_config
from aggregator.errors import InvalidRequestError
from aggregator.fanout import fan_out
from aggregator.gc_tuning import tune_gc
from aggregator.merge import merge, server_timing
from aggregator.resilience import Guards
from aggregator.settings import Settings
from aggregator.upstream.engines import build_client


def create_reference_app(settings: Settings | None = None) -> FastAPI:
    """One route per aggregate, plus /healthz for the bench's readiness probe."""
    settings = settings or Settings()
    config = load_config(settings.config)
    guards = Guards(config.upstreams)  # the same retries, breakers and bulkheads as ours
    clients: list[httpx.AsyncClient] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        clients.append(build_client(settings))
        tune_gc(settings.gc_threshold)  # the bench sets 0 (Python's GC) unless the target has +gc
        try:
            yield
        finally:
            await clients.pop().aclose()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    for name, aggregate in config.aggregates.items():
        endpoint = _endpoint(name, config, settings, clients, guards)
        app.add_api_route(aggregate.path, endpoint, methods=["GET"])
    return app


def _endpoint(
    name: str,
    config: AppConfig,
    settings: Settings,
    clients: list[httpx.AsyncClient],
    guards: Guards,
) -> Callable[[Request], Awaitable[Response]]:
    aggregate = config.aggregates[name]

    async def endpoint(request: Request) -> Response:
        query = parse_qs(request.url.query, keep_blank_values=True)
        try:
            params = aggregate.parse_params(query)
        except InvalidRequestError as exc:
            return JSONResponse({"error": "Bad Request", "message": str(exc)}, status_code=400)
        results = await fan_out(
            clients[0],
            config,
            aggregate,
            params,
            max_body=settings.max_upstream_body,
            guards=guards,
        )
        envelope, status = merge(results, aggregate.required)
        return Response(
            envelope.model_dump_json(exclude_none=True),
            status_code=status,
            media_type="application/json",
            headers={"Server-Timing": server_timing(results)},
        )

    endpoint.__name__ = f"aggregate_{name}"
    return endpoint


app = create_reference_app()
