"""Pydantic models of the demo payloads, so callers can validate upstream responses by name."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class Weather(BaseModel):
    """Current weather for one city, the classic slow upstream."""

    city: str
    temperature_c: float
    conditions: str
    updated_at: datetime


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


class Profile(BaseModel):
    """A user's profile, whose city can feed a dependent weather call."""

    user_id: int
    name: str
    city: str
    plan: Literal["free", "pro"]


class Item(BaseModel):
    """One recommended item with its relevance score."""

    id: str
    title: str
    score: float


class Recommendations(BaseModel):
    """Ranked recommendations for a user."""

    user_id: int
    items: list[Item]
