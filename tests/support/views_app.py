"""A Flask app whose views are written on the `Aggregator` extension, served over the wire by
tests/test_extension_serving.py (`aggregator serve --app tests.support.views_app:app`).

Every source takes `DELAY` seconds at the demo (AGGREGATOR_DEMO_URL): `/home` calls profile,
then weather for the profile's city, with news and stocks alongside, so its answer takes two
delays where the sum would be four; `/home-sync` is its plain `def` twin (four delays).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from flask import Flask

from aggregator import Aggregator
from aggregator.demo.models import Profile, Weather

DELAY = 0.3
DEMO = os.environ.get("AGGREGATOR_DEMO_URL", "http://127.0.0.1:8101")

app = Flask(__name__)
agg = Aggregator(app)
agg.source("profile", url=f"{DEMO}/profile/{{user_id}}?delay={DELAY}", schema=Profile)
agg.source("weather", url=f"{DEMO}/weather/{{city}}?delay={DELAY}", schema=Weather)
agg.source("news", url=f"{DEMO}/news?topic={{topic}}&delay={DELAY}")
agg.source("stocks", url=f"{DEMO}/stocks/{{user_id}}?delay={DELAY}")


@app.get("/home")
@agg.aggregate(required=["profile"], cache_ttl=1, stale_ttl=60, deadline=5, warm=[{"user_id": 1}])
async def home(user_id: int, topic: str = "tech") -> dict[str, Any]:
    async def weather_for_profile() -> tuple[Profile, Weather | None]:
        profile = await agg.fetch("profile", user_id=user_id)
        return profile, await agg.fetch("weather", city=profile.city)

    (profile, weather), news, stocks = await asyncio.gather(
        weather_for_profile(),
        agg.fetch("news", topic=topic),
        agg.fetch("stocks", user_id=user_id),
    )
    return {"profile": profile, "weather": weather, "news": news, "stocks": stocks}


@app.get("/home-sync")
@agg.aggregate(required=["profile"], deadline=5)
def home_sync(user_id: int, topic: str = "tech") -> dict[str, Any]:
    profile = agg.fetch_sync("profile", user_id=user_id)
    return {
        "profile": profile,
        "weather": agg.fetch_sync("weather", city=profile.city),
        "news": agg.fetch_sync("news", topic=topic),
        "stocks": agg.fetch_sync("stocks", user_id=user_id),
    }


@app.get("/plain")
def plain() -> dict[str, str]:
    """An ordinary view of the app's own, untouched by the extension."""
    return {"plain": "yes"}
