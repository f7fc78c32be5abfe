"""Shaped answers: a source's `shape` (JMESPath) checked at load against its schema, applied after
validation (and to its fallback), shown in /openapi.json, and served over the wire."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from aggregator.config import UpstreamConfig, parse_config
from aggregator.demo.process import DemoProcess
from aggregator.errors import ConfigError, UpstreamInvalidPayloadError
from aggregator.models import SourceResult
from aggregator.openapi import build_openapi
from aggregator.resilience import with_fallback
from aggregator.shape import apply_shape
from aggregator.upstream.checks import decode
from tests.support.openapi import response_validator

WEATHER = {
    "city": "Oslo",
    "temperature_c": 3.5,
    "conditions": "snow",
    "updated_at": "2026-01-01T00:00:00Z",
}
STOCKS = {"user_id": 7, "quotes": [{"symbol": "A", "price": 1.0, "change_pct": 0.5}]}


def upstream(
    shape: str | None, schema: str | None = "aggregator.demo.models:Weather"
) -> UpstreamConfig:
    raw: dict[str, Any] = {"url": "http://127.0.0.1:9/x", "shape": shape}
    if schema:
        raw["schema"] = schema
    return UpstreamConfig.model_validate(raw)


def config(demo: str, **shapes: str) -> str:
    lines = {name: f"shape = {value!r}" for name, value in shapes.items()}
    return f"""
[upstreams.weather]
url = "{demo}/weather/{{city}}"
schema = "aggregator.demo.models:Weather"
{lines.get("weather", "")}

[upstreams.stocks]
url = "{demo}/stocks/{{user_id}}"
schema = "aggregator.demo.models:Stocks"
{lines.get("stocks", "")}

[upstreams.raw]
url = "{demo}/profile/{{user_id}}"
{lines.get("raw", "")}

[aggregates.home]
path = "/api/home"
sources = ["weather", "stocks", "raw"]
params = {{ city = "str", user_id = "int" }}
"""


SHAPES = {
    "weather": "{place: city, temp: temperature_c}",
    "stocks": "quotes[*].symbol",
    "raw": "name",
}


def test_a_shape_keeps_renames_and_picks_after_validation() -> None:
    body = (
        b'{"city": "Oslo", "temperature_c": 3.5, "conditions": "snow", '
        b'"updated_at": "2026-01-01T00:00:00Z", "extra": 1}'
    )
    assert decode("w", upstream("{place: city, temp: temperature_c}"), body) == {
        "place": "Oslo",
        "temp": 3.5,
    }
    assert decode("w", upstream("city"), body) == "Oslo"
    # The model still sees the whole payload: a bad field the shape drops is still an error.
    with pytest.raises(UpstreamInvalidPayloadError) as caught:
        decode("w", upstream("city"), b'{"city": "Oslo", "temperature_c": "hot"}')
    assert caught.value.kind == "validation" and "temperature_c" in caught.value.locations


def test_a_shape_projects_lists_and_indexes() -> None:
    up = upstream(
        "{first: quotes[0].symbol, all: quotes[*].price}", "aggregator.demo.models:Stocks"
    )
    assert apply_shape("s", up, STOCKS) == {"first": "A", "all": [1.0]}


def test_a_shape_that_cannot_apply_is_the_sources_validation_error() -> None:
    up = upstream("abs(city)")  # a function given a string
    with pytest.raises(UpstreamInvalidPayloadError) as caught:
        apply_shape("w", up, WEATHER)
    assert caught.value.kind == "validation"


def test_the_fallback_is_shaped_like_a_live_answer() -> None:
    up = UpstreamConfig.model_validate(
        {
            "url": "http://127.0.0.1:9/x",
            "schema": "aggregator.demo.models:Weather",
            "shape": "{place: city}",
            "fallback": WEATHER,
        }
    )
    failed = SourceResult(name="w", status="timeout", ms=1.0)
    assert with_fallback(failed, up).data == {"place": "Oslo"}


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("{c: city", "upstreams.weather.shape: not a valid JMESPath expression:"),
        (
            "{c: city, t: temp}",
            "upstreams.weather.shape: temp is not a field of the payload (known: city, "
            "conditions, forecast, temperature_c, updated_at)",
        ),
    ],
)
def test_a_bad_shape_stops_start_up_with_one_line(shape: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config("http://127.0.0.1:9", weather=shape), "t.toml")
    assert len(caught.value.problems) == 1, caught.value
    assert caught.value.problems[0].startswith(message) and "\n" not in caught.value.problems[0]


def test_a_nested_unknown_field_is_named_by_its_key_path() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config("http://127.0.0.1:9", stocks="quotes[*].symbl"), "t.toml")
    assert caught.value.problems[0].startswith(
        "upstreams.stocks.shape: quotes[*].symbl is not a field of the payload (known: "
        "change_pct, price, symbol)"
    ), caught.value


def test_a_source_without_schema_takes_any_shape() -> None:
    parse_config(config("http://127.0.0.1:9", raw="whatever.you.like"), "t.toml")


def test_openapi_shows_the_shaped_schema() -> None:
    document = build_openapi(parse_config(config("http://127.0.0.1:9", **SHAPES), "t.toml"))
    validate(document)
    data = document["components"]["schemas"]["Envelope_home"]["properties"]["data"]["properties"]
    weather = {k: v for k, v in data["weather"].items() if k != "description"}
    assert weather == {
        "type": "object",
        "properties": {
            "place": {"title": "City", "type": "string"},
            "temp": {"title": "Temperature C", "type": "number"},
        },
        "required": ["place", "temp"],
    }
    assert data["stocks"]["type"] == "array"
    assert data["stocks"]["items"] == {"title": "Symbol", "type": "string"}
    assert "JMESPath" in data["weather"]["description"]


@pytest.fixture
def server_config(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    return write_config(config(demo.url, **SHAPES))


@pytest.mark.integration
def test_shaped_answers_over_the_wire_match_the_document(server: Any) -> None:
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as http:
        document = http.get("/openapi.json").json()
        r = http.get("/api/home", params={"city": "Oslo", "user_id": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["complete"] is True, body
    assert set(body["data"]["weather"]) == {"place", "temp"}
    assert body["data"]["weather"]["place"] == "Oslo"
    assert isinstance(body["data"]["stocks"], list) and body["data"]["stocks"]
    assert all(isinstance(s, str) for s in body["data"]["stocks"])
    assert isinstance(body["data"]["raw"], str)
    response_validator(document, "/api/home", 200).validate(body)
