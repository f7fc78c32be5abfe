"""The demo services' payloads: deterministic per input, validated by their models, cached."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from aggregator.demo.models import (
    Article,
    Item,
    News,
    Profile,
    Quote,
    Recommendations,
    Stocks,
    Weather,
)

_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
_CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")
_SYMBOLS = ("ACME", "GLOBEX", "INITECH", "UMBRELLA", "HOOLI", "STARK", "WAYNE", "WONKA")
_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken")
_CITIES = ("Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Nairobi", "Austin", "Hanoi")


def _rng(*parts: object) -> random.Random:
    """Seed a generator from the inputs so every payload is reproducible across runs."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _stamp(rng: random.Random) -> datetime:
    """Pick a deterministic timestamp within the demo's fixed year."""
    return _EPOCH + timedelta(seconds=rng.randrange(365 * 86400))


def _weather(city: str) -> Weather:
    """Build the weather for a city."""
    rng = _rng("weather", city)
    return Weather(
        city=city,
        temperature_c=round(rng.uniform(-10.0, 35.0), 1),
        conditions=rng.choice(_CONDITIONS),
        updated_at=_stamp(rng),
    )


def _stocks(user_id: int) -> Stocks:
    """Build a user's quotes."""
    rng = _rng("stocks", user_id)
    symbols = rng.sample(_SYMBOLS, 3 + user_id % 3)
    quotes = [
        Quote(
            symbol=s, price=round(rng.uniform(5, 500), 2), change_pct=round(rng.uniform(-5, 5), 2)
        )
        for s in symbols
    ]
    return Stocks(user_id=user_id, quotes=quotes)


def _news(topic: str) -> News:
    """Build headlines for a topic."""
    rng = _rng("news", topic)
    slug = quote(topic, safe="")
    articles = [
        Article(
            title=f"{topic.title()} story #{i}: {rng.choice(_CITIES)} {rng.choice(_CONDITIONS)}",
            url=f"https://example.invalid/news/{slug}/{i}",
            published_at=_stamp(rng),
        )
        for i in range(1, 6)
    ]
    return News(topic=topic, articles=articles)


def _profile(user_id: int) -> Profile:
    """Build a user's profile."""
    rng = _rng("profile", user_id)
    plan = "pro" if user_id % 3 == 0 else "free"
    return Profile(user_id=user_id, name=rng.choice(_NAMES), city=rng.choice(_CITIES), plan=plan)


def _recommendations(user_id: int) -> Recommendations:
    """Build a user's ranked recommendations."""
    rng = _rng("recommendations", user_id)
    scores = sorted((round(rng.random(), 2) for _ in range(5)), reverse=True)
    items = [
        Item(
            id=f"item-{rng.randrange(10000):04d}",
            title=f"{rng.choice(_SYMBOLS).title()} kit",
            score=s,
        )
        for s in scores
    ]
    return Recommendations(user_id=user_id, items=items)


@lru_cache(maxsize=4096)
def cached_body(service: str, key: str | int) -> bytes:
    """Serialize a payload once, since the data is deterministic and this is the hot path."""
    builders: dict[str, Callable[[Any], BaseModel]] = {
        "weather": _weather,
        "stocks": _stocks,
        "news": _news,
        "profile": _profile,
        "recommendations": _recommendations,
    }
    return builders[service](key).model_dump_json().encode()
