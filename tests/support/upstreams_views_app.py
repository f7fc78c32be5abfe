"""A Flask app whose `async def` views, written on the public `Aggregator` API, call the demo's
real-world upstreams: a POST source with a JSON body, a GraphQL source, an OAuth2-protected
source (the demo's token server; the secret from DEMO_CLIENT_SECRET) and a hedged source
(the demo's first call of every two stalls 2 s). Served over the wire by
tests/test_upstreams_views_serving.py (`aggregator serve --app
tests.support.upstreams_views_app:app`)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from flask import Flask

from aggregator import Aggregator

DEMO = os.environ.get("AGGREGATOR_DEMO_URL", "http://127.0.0.1:8101")

app = Flask(__name__)
agg = Aggregator(app)
agg.source(
    "search",
    url=f"{DEMO}/post/echo",
    method="POST",
    body={"query": {"text": "{q}", "city": "{city}"}, "limit": "{n}"},
)
agg.source(
    "gql",
    url=f"{DEMO}/graphql",
    method="POST",
    graphql=True,
    body={
        "query": "query($city: String!) { weather(city: $city) { temp } }",
        "variables": {"city": "{city}"},
    },
)
agg.source(
    "locked",
    url=f"{DEMO}/protected/{{city}}?delay=0.05",
    retries=0,
    oauth={
        "token_url": f"{DEMO}/oauth/token?delay=0.2",
        "client_id": "demo-client",
        "client_secret": "${DEMO_CLIENT_SECRET}",
        "scopes": ["read:data"],
    },
)
agg.source(
    "stalling",
    url=f"{DEMO}/news?topic={{topic}}&tail_every=2&tail_delay=2",
    timeout=4,
    hedge_after=0.1,
)


@app.get("/search")
@agg.aggregate(required=["search", "locked"], deadline=5)
async def search(q: str, n: int, city: str) -> dict[str, Any]:
    found, graph, locked = await asyncio.gather(
        agg.fetch("search", q=q, n=n, city=city),
        agg.fetch("gql", city=city),
        agg.fetch("locked", city=city),
    )
    return {"search": found, "gql": graph, "locked": locked}


@app.get("/hedged")
@agg.aggregate(deadline=5)
async def hedged(topic: str) -> dict[str, Any]:
    return {"news": await agg.fetch("stalling", topic=topic)}
