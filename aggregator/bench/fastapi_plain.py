"""The plain FastAPI peer: the bench aggregate written the way a FastAPI user writes it.

Nothing of aggregator runs here (tests/test_bench_peers.py checks the imports): its own pydantic
models of the demo payloads, one `httpx.AsyncClient` opened in FastAPI's lifespan (on
httpx-aiohttp's `AiohttpTransport` by default, or httpx's own engine with
`PLAIN_ENGINE=httpx`, what most FastAPI users run), a plain `asyncio.gather` with a timeout per
call, and an answer of the same shape as ours: `{"data", "errors", "sources", "complete"}`.
`/bench-cached` answers from a dict of the envelope bytes built on a query's first request,
the cheapest cache a FastAPI app can have, to compare cache hits byte for byte.

The bench tells it where the upstreams are: `PLAIN_UPSTREAMS`, a JSON object of source name to
URL template (`{city}`, `{user_id}` filled from the query); the model of each is picked by the
name's demo service (`weather`, `weather_5`, ...). The pool is sized like ours (1024
connections, 256 kept alive): httpx's default of 100 would queue calls at c=64, and a user who
fans out 5 calls per request raises it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from httpx_aiohttp import AiohttpTransport
from pydantic import BaseModel, ValidationError

TIMEOUT_S = 30.0  # per call: as the bench's config for our targets, never cuts a call short


class Hour(BaseModel):
    at: datetime
    temperature_c: float
    conditions: str


class Weather(BaseModel):
    city: str
    temperature_c: float
    conditions: str
    updated_at: datetime
    forecast: list[Hour] = []


class Quote(BaseModel):
    symbol: str
    price: float
    change_pct: float


class Stocks(BaseModel):
    user_id: int
    quotes: list[Quote]


class Article(BaseModel):
    title: str
    url: str
    published_at: datetime


class News(BaseModel):
    topic: str
    articles: list[Article]


class Activity(BaseModel):
    kind: str
    item: str
    at: datetime


class Profile(BaseModel):
    user_id: int
    name: str
    city: str
    plan: Literal["free", "pro"]
    activity: list[Activity] = []


class Item(BaseModel):
    id: str
    title: str
    score: float


class Recommendations(BaseModel):
    user_id: int
    items: list[Item]


MODELS: dict[str, type[BaseModel]] = {
    "weather": Weather,
    "stocks": Stocks,
    "news": News,
    "profile": Profile,
    "recommendations": Recommendations,
}


class SourceError(BaseModel):
    kind: str
    detail: str
    status: int | None = None


class SourceInfo(BaseModel):
    status: str
    ms: float


class Envelope(BaseModel):
    data: dict[str, Any]
    errors: dict[str, SourceError]
    sources: dict[str, SourceInfo]
    complete: bool


UPSTREAMS: dict[str, str] = json.loads(os.environ.get("PLAIN_UPSTREAMS", "{}"))
ENGINE = os.environ.get("PLAIN_ENGINE", "aiohttp")
LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=256)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    transport = (
        AiohttpTransport(limits=LIMITS)
        if ENGINE == "aiohttp"
        else httpx.AsyncHTTPTransport(limits=LIMITS)
    )
    async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT_S) as client:
        app.state.client = client
        app.state.cached = {}
        yield


app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)


async def fetch(
    client: httpx.AsyncClient, name: str, url: str
) -> tuple[str, BaseModel | None, SourceError | None, float]:
    started = time.perf_counter()
    model = MODELS[name.split("_")[0]]
    try:
        response = await asyncio.wait_for(client.get(url), TIMEOUT_S)
        response.raise_for_status()
        part = model.model_validate_json(response.content)
        error = None
    except TimeoutError:
        part, error = None, SourceError(kind="timeout", detail=f"no answer in {TIMEOUT_S:g} s")
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        part, error = None, SourceError(kind="bad_status", detail=str(exc), status=status)
    except httpx.HTTPError as exc:
        part, error = None, SourceError(kind="unavailable", detail=str(exc))
    except ValidationError as exc:
        part, error = None, SourceError(kind="invalid_payload", detail=str(exc))
    return name, part, error, round((time.perf_counter() - started) * 1000, 1)


async def aggregate(client: httpx.AsyncClient, city: str, user_id: int) -> Response:
    results = await asyncio.gather(
        *(
            fetch(client, name, url.format(city=city, user_id=user_id))
            for name, url in UPSTREAMS.items()
        )
    )
    envelope = Envelope(
        data={name: part.model_dump(mode="json") for name, part, _, _ in results if part},
        errors={name: error for name, _, error, _ in results if error},
        sources={
            name: SourceInfo(status="ok" if error is None else error.kind, ms=ms)
            for name, _, error, ms in results
        },
        complete=all(error is None for _, _, error, _ in results),
    )
    status = 200 if envelope.data or not results else 502
    return Response(envelope.model_dump_json(), status, media_type="application/json")


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/bench")
async def bench(request: Request, city: str, user_id: int) -> Response:
    return await aggregate(request.app.state.client, city, user_id)


@app.get("/bench-cached")
async def bench_cached(request: Request, city: str, user_id: int) -> Response:
    cached: dict[tuple[str, int], bytes] = request.app.state.cached
    body = cached.get((city, user_id))
    if body is None:
        response = await aggregate(request.app.state.client, city, user_id)
        if response.status_code != 200:
            return response
        body = cached[(city, user_id)] = bytes(response.body)
    return Response(body, media_type="application/json")
