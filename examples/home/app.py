"""A dashboard's home endpoint written as Flask views on the aggregator engine.

`/api/home` needs the user's profile first (for their city), then the weather there; the news
does not depend on either, so it runs alongside. `/api/home-sync` is the same answer from a
plain `def` view, one call after another: the sync twin to bench it against. Both are cached,
single-flighted, documented at /docs and counted at /metrics like any configured aggregate.

    aggregator demo &                             # the slow upstreams (port 8101)
    aggregator serve --app examples.home.app:app  # or: hypercorn examples.home.app:asgi_app
    curl 'http://127.0.0.1:8000/api/home?user_id=7'
    AGGREGATOR_CACHE_TYPE=null aggregator bench --app examples.home.app:app \\
        --path '/api/home?user_id=7' --path '/api/home-sync?user_id=7'
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from flask import Flask
from pydantic import BaseModel

from aggregator import Aggregator, to_asgi
from aggregator.demo.models import News, Profile, Weather

app = Flask(__name__)
agg = Aggregator(app, sources=Path(__file__).with_name("sources.toml"))
# Both views are cached alike, so a bench compares like with like: hits by default, and the
# two styles of fan-out with AGGREGATOR_CACHE_TYPE=null (caching off: every request fills).


class Home(BaseModel):
    """What the dashboard's home tile shows (the envelope's `data`)."""

    name: str
    city: str
    weather: Weather | None
    headlines: list[str]


def home_of(profile: Profile, weather: Weather | None, news: News | None) -> Home:
    headlines = [article.title for article in news.articles[:3]] if news else []
    return Home(name=profile.name, city=profile.city, weather=weather, headlines=headlines)


@app.get("/api/home")
@agg.aggregate(required=["profile"], deadline=2.0, cache_ttl=10, stale_ttl=30)
async def home(user_id: int, topic: str = "tech") -> Home:
    """Profile, then the weather in its city; the news alongside."""

    async def weather_for_profile() -> tuple[Profile, Weather | None]:
        profile: Profile = await agg.fetch("profile", user_id=user_id)
        return profile, await agg.fetch("weather", city=profile.city)

    (profile, weather), news = await asyncio.gather(
        weather_for_profile(), agg.fetch("news", topic=topic)
    )
    return home_of(profile, weather, news)


@app.get("/api/home-sync")
@agg.aggregate(required=["profile"], deadline=2.0, cache_ttl=10, stale_ttl=30)
def home_sync(user_id: int, topic: str = "tech") -> Home:
    """The same answer, one blocking call after another (a benchmark's sync twin)."""
    profile: Profile = agg.fetch_sync("profile", user_id=user_id)
    weather = agg.fetch_sync("weather", city=profile.city)
    news = agg.fetch_sync("news", topic=topic)
    return home_of(profile, weather, news)


asgi_app = to_asgi(app)
