"""Pydantic models of the demo payloads, so callers can validate upstream responses by name."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


def _empty(value: list[object]) -> bool:
    """Leave an empty growth list out of every dump, so default payloads keep today's bytes."""
    return not value


class Hour(BaseModel):
    """One hour of a weather forecast (the list grows with the demo's payload size)."""

    at: datetime
    temperature_c: float
    conditions: str


class Weather(BaseModel):
    """Current weather for one city, the classic slow upstream."""

    city: str
    temperature_c: float
    conditions: str
    updated_at: datetime
    #: Hourly outlook; only sent when the demo is asked for bigger payloads (`payload_kb`).
    forecast: list[Hour] = Field(default_factory=list, exclude_if=_empty)


class Quote(BaseModel):
    """One stock quote, nested so validation failures can point inside lists."""

    symbol: str
    price: float
    change_pct: float


class Stocks(BaseModel):
    """A user's watch-list quotes, keyed by an integer user id."""

    user_id: int
    quotes: list[Quote]


class Article(BaseModel):
    """One news headline, with a link that can never resolve."""

    title: str
    url: str
    published_at: datetime


class News(BaseModel):
    """Headlines for one topic, driven by a query parameter rather than a path segment."""

    topic: str
    articles: list[Article]


class Activity(BaseModel):
    """One thing a user did recently (the list grows with the demo's payload size)."""

    kind: str
    item: str
    at: datetime


class Profile(BaseModel):
    """A user's profile, whose city can feed a dependent weather call."""

    user_id: int
    name: str
    city: str
    plan: Literal["free", "pro"]
    #: Recent activity; only sent when the demo is asked for bigger payloads (`payload_kb`).
    activity: list[Activity] = Field(default_factory=list, exclude_if=_empty)


class Item(BaseModel):
    """One recommended item with its relevance score."""

    id: str
    title: str
    score: float


class Recommendations(BaseModel):
    """Ranked recommendations for a user."""

    user_id: int
    items: list[Item]
