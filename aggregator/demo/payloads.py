"""The demo services' payloads: deterministic per input, validated by their models, cached.

By default each payload is small (50-700 bytes). Asked for `kb` kilobytes (the demo's
`payload_kb` knob, `kb=` per request), each one grows a list its model keeps (weather's
`forecast`, stocks' `quotes`, news' `articles`, profile's `activity`, recommendations'
`items`) until its JSON is about that size, so the bytes survive validation into the envelope
(padding with extra fields would not: validation drops them).
"""

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
    Activity,
    Article,
    Hour,
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


def _grow(model: BaseModel, items: list[Any], make: Callable[[int], Any], size: int) -> bytes:
    """Append `make(i)` to `items` until `model`'s JSON is about `size` bytes; that JSON."""
    current = len(model.model_dump_json())
    i = len(items)
    while current < size:
        item = make(i)
        added = len(item.model_dump_json()) + 1  # and a comma (or the list's key, first)
        if current + added - size > size - current:  # it would overshoot more than it helps
            break
        items.append(item)
        current += added
        i += 1
    return model.model_dump_json().encode()


def _grown(service: str, model: BaseModel, key: str | int, size: int) -> bytes:
    """`model` (the default payload of `service` for `key`) grown to about `size` bytes."""
    rng = _rng(service, key, "grown")
    if isinstance(model, Weather):
        return _grow(
            model,
            model.forecast,
            lambda i: Hour(
                at=model.updated_at + timedelta(hours=i + 1),
                temperature_c=round(rng.uniform(-10.0, 35.0), 1),
                conditions=rng.choice(_CONDITIONS),
            ),
            size,
        )
    if isinstance(model, Stocks):
        return _grow(
            model,
            model.quotes,
            lambda i: Quote(
                symbol=f"{_SYMBOLS[i % len(_SYMBOLS)]}.{i // len(_SYMBOLS)}",
                price=round(rng.uniform(5, 500), 2),
                change_pct=round(rng.uniform(-5, 5), 2),
            ),
            size,
        )
    if isinstance(model, News):
        slug = quote(model.topic, safe="")
        return _grow(
            model,
            model.articles,
            lambda i: Article(
                title=f"{model.topic.title()} story #{i + 1}: {rng.choice(_CITIES)}",
                url=f"https://example.invalid/news/{slug}/{i + 1}",
                published_at=_stamp(rng),
            ),
            size,
        )
    if isinstance(model, Profile):
        return _grow(
            model,
            model.activity,
            lambda i: Activity(
                kind=rng.choice(("viewed", "bought", "rated", "shared")),
                item=f"item-{rng.randrange(10000):04d}",
                at=_stamp(rng),
            ),
            size,
        )
    assert isinstance(model, Recommendations)
    return _grow(
        model,
        model.items,
        lambda i: Item(
            id=f"item-{rng.randrange(10000):04d}",
            title=f"{rng.choice(_SYMBOLS).title()} kit",
            score=round(rng.random(), 2),
        ),
        size,
    )


@lru_cache(maxsize=4096)
def cached_body(service: str, key: str | int, kb: float = 0.0) -> bytes:
    """Serialize a payload once, since the data is deterministic and this is the hot path.

    `kb` > 0: grown to about that many kilobytes (1024 bytes) of JSON; 0: the default payload.
    """
    builders: dict[str, Callable[[Any], BaseModel]] = {
        "weather": _weather,
        "stocks": _stocks,
        "news": _news,
        "profile": _profile,
        "recommendations": _recommendations,
    }
    model = builders[service](key)
    if kb > 0:
        return _grown(service, model, key, round(kb * 1024))
    return model.model_dump_json().encode()
