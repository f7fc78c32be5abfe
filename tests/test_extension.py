"""The `Aggregator` extension on a plain Flask app: views that await sources, one after another
or at once, answered through the engine (envelope, statuses, cache, OpenAPI, metrics), and
set-up mistakes refused with one clear message. Real demo upstreams; Flask's test client (the
same views over the wire, under Hypercorn, are in test_extension_serving.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from pydantic import BaseModel

from aggregator import Aggregator
from aggregator.demo.models import Profile, Weather
from aggregator.demo.process import DemoProcess
from aggregator.engine import engine_of
from aggregator.errors import ConfigError
from aggregator.settings import Settings
from tests.support.clients import closed_port
from tests.support.demo import demo_stats, reset_demo

pytestmark = pytest.mark.integration

SETTINGS = Settings(metrics="public", dashboard=False)


class Home(BaseModel):
    """What the typed view below returns."""

    name: str
    city: str
    temperature_c: float | None


def home_app(demo: DemoProcess, *, delay: float = 0.2, **options: Any) -> tuple[Flask, Aggregator]:
    """profile (delay), weather for the profile's city (delay), news (1.5 x delay) alongside."""
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    agg.source("profile", url=f"{demo.url}/profile/{{user_id}}?delay={delay}", schema=Profile)
    agg.source("weather", url=f"{demo.url}/weather/{{city}}?delay={delay}", schema=Weather)
    agg.source("news", url=f"{demo.url}/news?topic={{topic}}&delay={1.5 * delay}")
    agg.source("down", url=f"http://127.0.0.1:{closed_port()}/x", retries=0)

    @app.get("/api/home")
    @agg.aggregate(required=["profile"], deadline=5, **options)
    async def home(user_id: int, topic: str = "tech") -> dict[str, Any]:
        async def profile_then_weather() -> tuple[Profile, Weather | None]:
            profile = await agg.fetch("profile", user_id=user_id)
            return profile, await agg.fetch("weather", city=profile.city)

        (profile, weather), news = await asyncio.gather(
            profile_then_weather(), agg.fetch("news", topic=topic)
        )
        return {"profile": profile, "weather": weather, "news": news}

    @app.get("/api/typed")
    @agg.aggregate()
    async def typed(user_id: int) -> Home:
        profile = await agg.fetch("profile", user_id=user_id)
        weather = await agg.fetch("weather", city=profile.city)
        return Home(name=profile.name, city=profile.city, temperature_c=weather.temperature_c)

    @app.get("/api/optional")
    @agg.aggregate()
    async def optional(user_id: int) -> dict[str, Any]:
        return {
            "down": await agg.fetch("down"),
            "profile": await agg.fetch("profile", user_id=user_id),
        }

    @app.get("/api/sync")
    @agg.aggregate()
    def sync_home(user_id: int) -> dict[str, Any]:
        profile = agg.fetch_sync("profile", user_id=user_id)
        return {"profile": profile, "weather": agg.fetch_sync("weather", city=profile.city)}

    return app, agg


def timed_get(app: Flask, path: str, **kwargs: Any) -> tuple[float, Any]:
    client = app.test_client()
    started = time.monotonic()
    response = client.get(path, **kwargs)
    return time.monotonic() - started, response


def test_a_dependent_pair_takes_a_plus_b_while_an_independent_source_overlaps(
    demo: DemoProcess,
) -> None:
    app, _ = home_app(demo, delay=0.3)
    reset_demo(demo)

    elapsed, r = timed_get(app, "/api/home?user_id=7")

    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["complete"] is True and body["errors"] == {}
    assert body["data"]["weather"]["city"] == body["data"]["profile"]["city"]
    assert body["data"]["news"]["topic"] == "tech"
    # profile then weather (0.3 + 0.3) with news (0.45) alongside: ~0.6 s, not the 1.05 s sum.
    assert 0.58 < elapsed < 0.95, elapsed
    sources = body["sources"]
    assert list(sources) == ["profile", "news", "weather"]  # in the order they were called
    assert demo_stats(demo)["requests"]["weather"] == 1
    timing = r.headers["Server-Timing"]
    assert timing.startswith("profile;dur=") and "weather;dur=" in timing


def test_a_typed_view_returns_its_model_as_data_and_documents_it(demo: DemoProcess) -> None:
    app, _ = home_app(demo, delay=0.0)

    _, r = timed_get(app, "/api/typed?user_id=3")
    assert r.status_code == 200
    data = r.get_json()["data"]
    assert data == {"name": "Ada", "city": "Berlin", "temperature_c": data["temperature_c"]}
    assert isinstance(data["temperature_c"], float)

    document = app.test_client().get("/openapi.json").get_json()
    operation = document["paths"]["/api/typed"]["get"]
    assert [p["name"] for p in operation["parameters"] if p["in"] == "query"] == ["user_id"]
    query = next(p for p in operation["parameters"] if p["name"] == "user_id")
    assert query["required"] is True and query["schema"]["type"] == "integer"
    envelope = document["components"]["schemas"]["Envelope_typed"]
    assert envelope["properties"]["data"] == {"$ref": "#/components/schemas/Home"}
    assert set(document["components"]["schemas"]["Home"]["properties"]) == {
        "name",
        "city",
        "temperature_c",
    }
    home = document["paths"]["/api/home"]["get"]
    topic = next(p for p in home["parameters"] if p["name"] == "topic")
    assert topic["required"] is False and topic["schema"]["default"] == "tech"


def test_a_failed_optional_source_is_none_with_its_error_in_the_envelope(
    demo: DemoProcess,
) -> None:
    app, _ = home_app(demo, delay=0.0)

    _, r = timed_get(app, "/api/optional?user_id=7")

    assert r.status_code == 200
    body = r.get_json()
    assert body["data"]["down"] is None and body["data"]["profile"]["user_id"] == 7
    assert body["errors"]["down"]["kind"] == "connect"
    assert body["complete"] is False and r.headers["X-Aggregate-Complete"] == "false"


def test_a_failed_required_source_ends_the_view_with_a_502_envelope(demo: DemoProcess) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    agg.source("profile", url=f"{demo.url}/profile/{{user_id}}?status=500", retries=0)
    agg.source("news", url=f"{demo.url}/news?topic=x")
    reached: list[str] = []

    @app.get("/api/home")
    @agg.aggregate(required=["profile"])
    async def home(user_id: int) -> dict[str, Any]:
        news = await agg.fetch("news")
        profile = await agg.fetch("profile", user_id=user_id)
        reached.append("after profile")  # never: a failed required source ends the body
        return {"news": news, "profile": profile}

    _, r = timed_get(app, "/api/home?user_id=7")

    assert r.status_code == 502
    body = r.get_json()
    assert body["data"] == {} and body["complete"] is False
    assert body["errors"]["profile"]["kind"] == "http_status"
    assert body["sources"]["news"]["status"] == "ok"
    assert reached == []


def test_the_views_deadline_cuts_a_call_off_with_a_504(demo: DemoProcess) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    agg.source("slow", url=f"{demo.url}/profile/{{user_id}}?delay=5")

    @app.get("/api/slow")
    @agg.aggregate(deadline=0.4)
    async def slow(user_id: int) -> dict[str, Any]:
        return {"slow": await agg.fetch("slow", user_id=user_id)}

    elapsed, r = timed_get(app, "/api/slow?user_id=1")

    assert r.status_code == 504, r.get_data(as_text=True)
    assert r.get_json()["errors"]["slow"]["kind"] == "deadline"
    assert elapsed < 2.0


def test_a_sync_twin_calls_its_sources_one_after_another(demo: DemoProcess) -> None:
    app, _ = home_app(demo, delay=0.2)

    elapsed, r = timed_get(app, "/api/sync?user_id=3")

    assert r.status_code == 200, r.get_data(as_text=True)
    data = r.get_json()["data"]
    assert data["weather"]["city"] == data["profile"]["city"] == "Berlin"
    assert 0.38 < elapsed < 1.5, elapsed


def test_a_cached_view_answers_hits_and_304s_without_calling_again(demo: DemoProcess) -> None:
    app, _ = home_app(demo, delay=0.0, cache_ttl=30)
    client = app.test_client()
    reset_demo(demo)

    first = client.get("/api/home?user_id=5")
    second = client.get("/api/home?user_id=5&_=cache-buster")
    revalidated = client.get(
        "/api/home?user_id=5", headers={"If-None-Match": first.headers["ETag"]}
    )

    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.get_data() == first.get_data()
    assert revalidated.status_code == 304
    assert demo_stats(demo)["requests"]["profile"] == 1


def test_bad_parameters_get_the_one_error_body(demo: DemoProcess) -> None:
    app, _ = home_app(demo)

    _, r = timed_get(app, "/api/home?user_id=seven")

    assert r.status_code == 400
    assert r.get_json() == {
        "error": "Bad Request",
        "message": "user_id: must be an integer",
        "field": "user_id",
    }


def test_metrics_count_each_view_and_each_of_its_sources(demo: DemoProcess) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    agg.source("metered_profile", url=f"{demo.url}/profile/{{user_id}}")

    @app.get("/api/metered")
    @agg.aggregate(cache_ttl=30)
    async def metered(user_id: int) -> dict[str, Any]:
        return {"p": await agg.fetch("metered_profile", user_id=user_id)}

    client = app.test_client()
    for user_id in (1, 2, 2):
        client.get(f"/api/metered?user_id={user_id}")

    text = client.get("/metrics").get_data(as_text=True)
    assert 'aggregator_source_duration_seconds_count{source="metered_profile"} 2.0' in text
    assert 'aggregator_cache_results_total{aggregate="metered",result="miss"} 2.0' in text
    assert 'aggregator_cache_results_total{aggregate="metered",result="hit"} 1.0' in text


def test_fetch_outside_an_aggregate_view_says_where_it_belongs(demo: DemoProcess) -> None:
    agg = Aggregator()
    with pytest.raises(RuntimeError, match=r"view decorated with @aggregator.aggregate"):
        asyncio.run(agg.fetch("profile", user_id=1))


def _build(app: Flask) -> None:
    engine_of(app)  # first use builds the engine


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        pytest.param(
            lambda app, agg: agg.source("x", url="ftp://nowhere/"),
            r"source 'x'.*url: .*must start with http",
            id="bad-source",
        ),
        pytest.param(
            lambda app, agg: agg.source("x", url="http://h/", timout=1),
            r"timout: unknown key",
            id="unknown-option",
        ),
    ],
)
def test_a_bad_source_is_refused_when_declared(
    declare: Callable[[Flask, Aggregator], None], message: str
) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    with pytest.raises(ConfigError, match=message):
        declare(app, agg)


def test_a_parameter_of_an_unsupported_type_is_refused_at_decoration() -> None:
    agg = Aggregator()
    with pytest.raises(ConfigError, match=r"view 'f'.*when: annotate it as str, int, float"):

        @agg.aggregate()
        async def f(when: list[int]) -> dict[str, Any]:
            return {}


def test_a_view_routed_with_path_arguments_is_refused_with_one_line(demo: DemoProcess) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    agg.source("p", url=f"{demo.url}/profile/{{user_id}}")

    @app.get("/u/<int:user_id>")
    @agg.aggregate()
    async def user(user_id: int) -> dict[str, Any]:
        return {}

    with pytest.raises(ConfigError, match=r"view 'user'.*from the query string, not the path"):
        _build(app)


def test_declaring_after_the_engine_is_built_is_an_error(demo: DemoProcess) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    agg.source("p", url=f"{demo.url}/profile/{{user_id}}")
    _build(app)
    with pytest.raises(RuntimeError, match="already built"):
        agg.source("q", url=f"{demo.url}/profile/{{user_id}}")


def test_calling_an_undeclared_source_is_a_500_and_says_which(demo: DemoProcess) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    agg.source("p", url=f"{demo.url}/profile/{{user_id}}")

    @app.get("/api/x")
    @agg.aggregate(sources=["p"])
    async def x() -> dict[str, Any]:
        return {"q": await agg.fetch("q")}

    app.testing = False
    _, r = timed_get(app, "/api/x")
    assert r.status_code == 500


def test_sources_and_configured_aggregates_come_from_a_file_too(
    demo: DemoProcess, write_config: Callable[[str], Any]
) -> None:
    path = write_config(
        f"""
[upstreams.profile]
url = "{demo.url}/profile/{{user_id}}"
schema = "aggregator.demo.models:Profile"

[aggregates.configured]
path = "/configured"
sources = ["profile"]
params = {{ user_id = "int" }}
"""
    )
    app = Flask(__name__)
    agg = Aggregator(app, sources=path, settings=SETTINGS)

    @app.get("/api/mine")
    @agg.aggregate()
    async def mine(user_id: int) -> dict[str, Any]:
        return {"name": (await agg.fetch("profile", user_id=user_id)).name}

    client = app.test_client()
    assert client.get("/configured?user_id=3").get_json()["data"]["profile"]["name"] == "Ada"
    assert client.get("/api/mine?user_id=3").get_json()["data"] == {"name": "Ada"}


def test_a_source_called_twice_keeps_both_and_a_fallback_is_a_model(demo: DemoProcess) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    agg.source("profile", url=f"{demo.url}/profile/{{user_id}}", schema=Profile)
    agg.source(
        "weather",
        url=f"{demo.url}/weather/{{city}}?status=503",
        schema=Weather,
        retries=0,
        fallback={
            "city": "nowhere",
            "temperature_c": 0.0,
            "conditions": "unknown",
            "updated_at": "1970-01-01T00:00:00Z",
        },
    )

    @app.get("/api/pair")
    @agg.aggregate()
    async def pair() -> dict[str, Any]:
        first, second = await asyncio.gather(
            agg.fetch("profile", user_id=1), agg.fetch("profile", user_id=2)
        )
        weather = await agg.fetch("weather", city=first.city)
        assert isinstance(weather, Weather)
        return {"names": [first.name, second.name], "weather": weather.conditions}

    _, r = timed_get(app, "/api/pair")

    body = r.get_json()
    assert r.status_code == 200, body
    assert body["data"] == {"names": ["Alan", "Donald"], "weather": "unknown"}
    assert set(body["sources"]) == {"profile", "profile~2", "weather"}
    assert body["sources"]["weather"]["fallback"] is True
    assert body["errors"]["weather"]["kind"] == "http_status" and body["complete"] is False


def test_an_uncached_answer_keeps_its_etag_while_its_content_does_not_change(
    demo: DemoProcess,
) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS)
    agg.source("profile", url=f"{demo.url}/profile/{{user_id}}?delay=0.01", schema=Profile)

    @app.get("/api/who")
    @agg.aggregate()  # cache_ttl = 0: nothing stored, every answer a new fill
    async def who(user_id: int) -> dict[str, Any]:
        return {"name": (await agg.fetch("profile", user_id=user_id)).name}

    client = app.test_client()
    first, second = (client.get("/api/who?user_id=3") for _ in range(2))
    revalidated = client.get("/api/who?user_id=3", headers={"If-None-Match": first.headers["ETag"]})
    other = client.get("/api/who?user_id=4", headers={"If-None-Match": first.headers["ETag"]})

    assert first.headers["ETag"] == second.headers["ETag"]
    assert first.headers["ETag"].startswith('W/"')
    assert revalidated.status_code == 304 and revalidated.get_data() == b""
    assert other.status_code == 200 and other.headers["ETag"] != first.headers["ETag"]


def test_the_null_cache_caches_nothing_not_even_in_a_workers_memory(demo: DemoProcess) -> None:
    app = Flask(__name__)
    agg = Aggregator(app, settings=SETTINGS.model_copy(update={"cache_type": "null"}))
    agg.source("counted", url=f"{demo.url}/profile/{{user_id}}")

    @app.get("/api/counted")
    @agg.aggregate(cache_ttl=30)
    async def counted(user_id: int) -> dict[str, Any]:
        return {"p": await agg.fetch("counted", user_id=user_id)}

    client = app.test_client()
    reset_demo(demo)
    answers = [client.get("/api/counted?user_id=9") for _ in range(3)]

    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all("X-Cache" not in a.headers for a in answers)  # caching is off
    assert demo_stats(demo)["requests"]["profile"] == 3
