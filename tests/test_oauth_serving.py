"""OAuth2-protected, POST and GraphQL sources over the wire: real Hypercorn, the real demo
upstream with its token server, protected service, POST echo and GraphQL-ish endpoint."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator.demo.auth import CLIENT_SECRET
from aggregator.demo.process import DemoProcess
from tests.support.configs import METRICS_TOKEN
from tests.support.servers import Server

pytestmark = pytest.mark.integration

Serve = Callable[..., Server]
WriteConfig = Callable[[str], Path]
ADMIN = {"Authorization": f"Bearer {METRICS_TOKEN}"}


@pytest.fixture(autouse=True)
def secret(demo: DemoProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client secret in the environment the served config expands, the demo's counts zero."""
    monkeypatch.setenv("DEMO_CLIENT_SECRET", CLIENT_SECRET)
    httpx.post(f"{demo.url}/_oauth/reset", trust_env=False).raise_for_status()


def oauth_counts(demo: DemoProcess) -> dict[str, Any]:
    counts: dict[str, Any] = httpx.get(f"{demo.url}/_oauth", trust_env=False).json()
    return counts


def protected_config(demo: str, *, token_query: str = "", extra: str = "") -> str:
    return f"""
[upstreams.locked]
url = "{demo}/protected/data?delay=0.05"
retries = 0

[upstreams.locked.oauth]
token_url = "{demo}/oauth/token{token_query}"
client_id = "demo-client"
client_secret = "${{DEMO_CLIENT_SECRET}}"
scopes = ["read:data", "read:more"]
audience = "https://demo.test"
{extra}
[aggregates.locked]
path = "/api/locked"
sources = ["locked"]
"""


def get(server: Server, path: str) -> httpx.Response:
    return httpx.get(server.url + path, trust_env=False, timeout=10)


async def test_n_concurrent_cold_requests_fetch_one_token(
    serve: Serve, demo: DemoProcess, write_config: WriteConfig
) -> None:
    server = serve(write_config(protected_config(demo.url, token_query="?delay=0.3")))
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as http:
        answers = await asyncio.gather(*(http.get("/api/locked") for _ in range(16)))

    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["locked"] == {"ok": True, "path": "data"}
    counts = oauth_counts(demo)
    assert counts["token_requests"] == 1
    assert (counts["protected_calls"], counts["rejected"]) == (16, 0)
    assert counts["last_grant"] == {
        "grant_type": "client_credentials",
        "scope": "read:data read:more",
        "audience": "https://demo.test",
    }


def test_a_token_is_refreshed_before_it_expires(
    serve: Serve, demo: DemoProcess, write_config: WriteConfig
) -> None:
    # 2 s tokens: refreshed in the background from 1.5 s, never used past 1.8 s.
    server = serve(write_config(protected_config(demo.url, token_query="?ttl=2")))
    begun = time.monotonic()
    assert get(server, "/api/locked").status_code == 200
    while time.monotonic() - begun < 1.6:
        time.sleep(0.05)
    assert get(server, "/api/locked").status_code == 200  # answered with the first token
    time.sleep(0.2)
    assert oauth_counts(demo)["token_requests"] == 2  # the early refresh, behind that answer
    while time.monotonic() - begun < 2.3:
        time.sleep(0.05)
    assert get(server, "/api/locked").status_code == 200  # the first token has expired by now

    counts = oauth_counts(demo)
    assert (counts["token_requests"], counts["rejected"]) == (2, 0)


def test_a_401_after_rotation_refreshes_once_and_succeeds(
    serve: Serve, demo: DemoProcess, write_config: WriteConfig
) -> None:
    server = serve(write_config(protected_config(demo.url)))
    assert get(server, "/api/locked").status_code == 200
    httpx.post(f"{demo.url}/_oauth/rotate", trust_env=False).raise_for_status()

    answer = get(server, "/api/locked")

    assert answer.status_code == 200, answer.text
    assert answer.json()["complete"] is True
    counts = oauth_counts(demo)
    assert (counts["token_requests"], counts["rejected"], counts["protected_calls"]) == (2, 1, 3)


@pytest.mark.parametrize(
    "token_url",
    [
        pytest.param("{demo}/oauth/token?status=503", id="503"),
        pytest.param("http://127.0.0.1:9/oauth/token", id="unreachable"),
    ],
)
def test_a_dead_token_endpoint_fails_that_source_only_and_leaks_nothing(
    serve: Serve, demo: DemoProcess, write_config: WriteConfig, token_url: str
) -> None:
    text = f"""
[upstreams.open]
url = "{demo.url}/weather/Paris"
schema = "aggregator.demo.models:Weather"

[upstreams.good]
url = "{demo.url}/protected/good"

[upstreams.good.oauth]
token_url = "{demo.url}/oauth/token"
client_id = "demo-client"
client_secret = "${{DEMO_CLIENT_SECRET}}"

[upstreams.locked]
url = "{demo.url}/protected/data"

[upstreams.locked.oauth]
token_url = "{token_url.format(demo=demo.url)}"
client_id = "demo-client"
client_secret = "${{DEMO_CLIENT_SECRET}}"

[aggregates.mixed]
path = "/api/mixed"
sources = ["open", "good", "locked"]
"""
    server = serve(write_config(text), admin_token=METRICS_TOKEN, log_level="DEBUG")

    answer = get(server, "/api/mixed")
    again = get(server, "/api/mixed")  # the worker is fine: the good token is reused

    body = answer.json()
    assert answer.status_code == 200, body
    assert body["sources"]["open"]["status"] == "ok"
    assert body["sources"]["good"]["status"] == "ok"
    assert body["errors"]["locked"]["kind"] == "auth"
    assert "token endpoint" in body["errors"]["locked"]["detail"]
    assert again.json()["errors"]["locked"]["kind"] == "auth"
    metrics = httpx.get(f"{server.url}/metrics", headers=ADMIN, trust_env=False).text
    assert 'kind="auth",source="locked"' in metrics
    status = httpx.get(f"{server.url}/status", trust_env=False).text
    issued = oauth_counts(demo)["issued"]
    assert len(issued) == 1  # the good source's, once
    for secret in [CLIENT_SECRET, *issued]:
        for text_seen in (answer.text, again.text, metrics, status, server.log()):
            assert secret not in text_seen
    assert "upstream locked attempt 1: auth" in server.log()  # DEBUG was on: lines were written


def test_post_with_hostile_values_keeps_its_json_structure(
    serve: Serve, demo: DemoProcess, write_config: WriteConfig
) -> None:
    text = f"""
[upstreams.profile]
url = "{demo.url}/echo/profile?city={{city}}"

[upstreams.search]
url = "{demo.url}/post/echo"
method = "POST"
cache_ttl = 30

[upstreams.search.body]
query = {{ text = "{{q}}", city = "{{profile.args.city}}" }}
limit = "{{n}}"
tag = "q:{{q}}"

[aggregates.search]
path = "/api/search"
sources = ["profile", "search"]
params = {{ q = "str", n = "int", city = "str" }}
"""
    server = serve(write_config(text))
    hostile = '", "admin": true, "x": {"'
    city = '"}]}, "limit": 1000, "z": ["'

    answer = httpx.get(
        f"{server.url}/api/search",
        params={"q": hostile, "n": "3", "city": city},
        trust_env=False,
        timeout=10,
    )
    other = httpx.get(
        f"{server.url}/api/search",
        params={"q": "plain", "n": "3", "city": city},
        trust_env=False,
        timeout=10,
    )

    body = answer.json()
    assert answer.status_code == 200, body
    received = body["data"]["search"]
    assert received["content_type"] == "application/json"
    assert received["json"] == {
        "query": {"text": hostile, "city": city},
        "limit": 3,
        "tag": f"q:{hostile}",
    }
    # another body is another source-cache entry, not the first one's answer
    assert other.json()["data"]["search"]["json"]["query"]["text"] == "plain"


def test_graphql_data_and_errors(
    serve: Serve, demo: DemoProcess, write_config: WriteConfig
) -> None:
    text = f"""
[upstreams.gql]
url = "{demo.url}/graphql"
method = "POST"
graphql = true

[upstreams.gql.body]
query = "query($city: String!) {{ weather(city: $city) {{ temp }} }}"
variables = {{ city = "{{city}}" }}

[upstreams.broken]
url = "{demo.url}/graphql"
method = "POST"
graphql = true
body = {{ query = "{{ failing }}" }}

[aggregates.gql]
path = "/api/gql"
sources = ["gql", "broken"]
params = {{ city = "str" }}
"""
    server = serve(write_config(text))

    answer = get(server, "/api/gql?city=Paris%22%7D")

    body = answer.json()
    assert answer.status_code == 200, body
    assert body["data"]["gql"]["echo"]["variables"] == {"city": 'Paris"}'}
    assert body["errors"]["broken"]["kind"] == "graphql"
    assert "1 error and no data" in body["errors"]["broken"]["detail"]
    assert "secret internals" not in answer.text
