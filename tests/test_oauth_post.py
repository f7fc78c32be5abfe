"""OAuth2 client credentials and POST/GraphQL sources, one call at a time (respx upstreams)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any
from urllib.parse import parse_qs

import httpx
import jsonschema
import pytest
import respx
from openapi_spec_validator import validate

from aggregator.bodytemplate import BodyTemplate
from aggregator.cache.sources import SourceCache
from aggregator.config import OAuthConfig, UpstreamConfig, parse_config
from aggregator.errors import ConfigError
from aggregator.metrics import ERROR_KINDS, REFUSED_KINDS
from aggregator.openapi import build_openapi
from aggregator.resilience import UpstreamGuard
from aggregator.upstream import fetch
from aggregator.upstream.oauth import TokenSource, tokens_for

BASE = "http://upstream.test"
TOKEN_URL = "http://auth.test/token"
SECRET = "very-secret-client-secret-42"


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_CLIENT_SECRET", SECRET)


def oauth_upstream(url: str = f"{BASE}/data", **extra: Any) -> UpstreamConfig:
    oauth = {
        "token_url": TOKEN_URL,
        "client_id": "me",
        "client_secret": "${DEMO_CLIENT_SECRET}",
        "scopes": ["read:data", "read:more"],
        "audience": "https://api.test",
    }
    return UpstreamConfig.model_validate({"url": url, "oauth": oauth, **extra})


def issuing(tokens: list[str], *, ttl: float = 300, delay: float = 0.0) -> Any:
    """A token endpoint answering the next of `tokens` each time."""
    issued = iter(tokens)

    async def answer(request: httpx.Request) -> httpx.Response:
        if delay:
            await asyncio.sleep(delay)
        body = {"access_token": next(issued), "token_type": "bearer", "expires_in": ttl}
        return httpx.Response(200, json=body)

    return answer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- tokens ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("secret_env")
async def test_concurrent_cold_calls_share_one_token_request(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    token_route = respx_mock.post(TOKEN_URL).mock(side_effect=issuing(["tok-1"], delay=0.05))
    data_route = respx_mock.get(f"{BASE}/data").respond(200, json={"ok": True})
    up = oauth_upstream()

    results = await asyncio.gather(
        *(fetch(httpx_client, "src", up, {}, max_body=10_000) for _ in range(20))
    )

    assert [r.status for r in results] == ["ok"] * 20
    assert token_route.call_count == 1
    grant = token_route.calls[0].request
    form = parse_qs(grant.content.decode())
    assert form == {
        "grant_type": ["client_credentials"],
        "scope": ["read:data read:more"],
        "audience": ["https://api.test"],
    }
    user, _, password = base64.b64decode(grant.headers["authorization"][6:]).decode().partition(":")
    assert (user, password) == ("me", SECRET)
    assert {c.request.headers["authorization"] for c in data_route.calls} == {"Bearer tok-1"}


async def test_a_token_is_refreshed_in_the_background_then_replaced_before_expiry(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    route = respx_mock.post(TOKEN_URL).mock(side_effect=issuing(["a", "b", "c"], ttl=100))
    clock = Clock()
    oauth = OAuthConfig.model_validate(
        {"token_url": TOKEN_URL, "client_id": "me", "client_secret": "${HOME}"}
    )
    tokens = TokenSource(oauth, clock=clock)

    assert await tokens.token(httpx_client, "s") == "a"
    clock.now += 74  # before three quarters of its life: cached
    assert await tokens.token(httpx_client, "s") == "a"
    assert route.call_count == 1
    clock.now += 2  # past 75 s: this caller still gets "a", a refresh starts behind it
    assert await tokens.token(httpx_client, "s") == "a"
    await asyncio.sleep(0.01)
    assert route.call_count == 2
    assert await tokens.token(httpx_client, "s") == "b"
    clock.now += 91  # past its last usable second (100 s less the leeway): fetched first
    assert await tokens.token(httpx_client, "s") == "c"
    assert tokens.fetches == 3


@pytest.mark.usefixtures("secret_env")
async def test_a_401_refreshes_the_token_once_and_retries_once(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    token_route = respx_mock.post(TOKEN_URL).mock(side_effect=issuing(["old", "new"]))

    def protected(request: httpx.Request) -> httpx.Response:
        if request.headers["authorization"] == "Bearer new":
            return httpx.Response(200, json={"ok": True})
        return httpx.Response(401, json={"error": "invalid_token"})

    respx_mock.post(f"{BASE}/data").mock(side_effect=protected)
    up = oauth_upstream(method="POST", body={"q": "x"})  # a 401 was refused: safe to send again

    result = await fetch(httpx_client, "src", up, {}, max_body=10_000)

    assert result.status == "ok"
    assert token_route.call_count == 2


@pytest.mark.usefixtures("secret_env")
async def test_a_second_401_is_the_sources_error_without_a_loop(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient
) -> None:
    token_route = respx_mock.post(TOKEN_URL).mock(side_effect=issuing(["t1", "t2", "t3"]))
    data_route = respx_mock.get(f"{BASE}/data").respond(401)

    result = await fetch(httpx_client, "src", oauth_upstream(), {}, max_body=10_000)

    assert (result.status, result.upstream_status) == ("http_status", 401)
    assert (token_route.call_count, data_route.call_count) == (2, 2)


@pytest.mark.usefixtures("secret_env")
@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        pytest.param(httpx.Response(500, text=SECRET), "HTTP 500", id="500"),
        pytest.param(httpx.Response(401, json={"error": SECRET}), "HTTP 401", id="refused"),
        pytest.param(httpx.Response(200, text=f"oops {SECRET}"), "not JSON", id="not-json"),
        pytest.param(
            httpx.Response(200, json={"token_type": "bearer"}), "no usable access_token", id="none"
        ),
        pytest.param(
            httpx.Response(200, json={"access_token": SECRET, "token_type": "mac"}),
            "not a bearer token",
            id="mac",
        ),
        pytest.param(httpx.ConnectError("refused"), "cannot reach", id="connect"),
    ],
)
async def test_a_failing_token_endpoint_is_the_sources_auth_error(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    answer: httpx.Response | Exception,
    detail: str,
) -> None:
    respx_mock.post(TOKEN_URL).mock(side_effect=[answer])

    result = await fetch(httpx_client, "src", oauth_upstream(), {}, max_body=10_000)

    assert result.status == "auth"
    assert detail in (result.detail or "")
    assert SECRET not in repr(result) and SECRET not in caplog.text


def test_the_client_secret_must_come_from_the_environment(secret_env: None) -> None:
    text = """
[upstreams.a]
url = "http://x.test/"
oauth = { token_url = "http://x.test/t", client_id = "me", client_secret = "inline-secret" }
[aggregates.g]
path = "/g"
sources = ["a"]
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.toml")
    assert "environment variable" in str(caught.value)
    assert "inline-secret" not in str(caught.value)
    up = oauth_upstream()
    assert up.oauth is not None and up.oauth.client_secret == SECRET
    assert SECRET not in repr(up) and SECRET not in str(up)


async def test_each_client_keeps_its_own_tokens(httpx_client: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient() as other:
        assert tokens_for(httpx_client) is tokens_for(httpx_client)
        assert tokens_for(other) is not tokens_for(httpx_client)


# -- POST bodies ----------------------------------------------------------------------------------

HOSTILE = [
    '", "admin": true, "x": "',
    '"}], "admin": true}',
    "\\u0022}\\n{",
    "null",
    "{user_id}",
    "\x00\r\n\u2028",
]


@pytest.mark.parametrize("value", HOSTILE)
async def test_a_hostile_value_stays_one_string_at_its_place(
    respx_mock: respx.MockRouter, httpx_client: httpx.AsyncClient, value: str
) -> None:
    route = respx_mock.post(f"{BASE}/search").respond(200, json={"hits": []})
    body = {"query": {"text": "{q}", "label": "q={q}", "page": "{page}"}, "fixed": [1, "{q}"]}
    up = UpstreamConfig.model_validate({"url": f"{BASE}/search", "method": "POST", "body": body})

    result = await fetch(httpx_client, "s", up, {"q": value, "page": 2}, max_body=10_000)

    assert result.status == "ok"
    sent = route.calls[0].request
    assert sent.headers["content-type"] == "application/json"
    assert json.loads(sent.content) == {
        "query": {"text": value, "label": f"q={value}", "page": 2},
        "fixed": [1, value],
    }


def test_body_placeholders_are_needs_like_url_placeholders() -> None:
    text = """
[upstreams.profile]
url = "http://x.test/p/{user_id}"
[upstreams.search]
url = "http://x.test/search"
method = "POST"
body = { city = "{profile.city}", limit = "{limit}" }
[aggregates.g]
path = "/g"
sources = ["profile", "search"]
params = { user_id = "int" }
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.toml")
    assert "needs limit but the aggregate has no such parameter" in str(caught.value)
    config = parse_config(
        text.replace('params = { user_id = "int" }', 'params = { user_id = "int", limit = "int" }'),
        "t",
    )
    search = config.upstreams["search"]
    assert search.template.sources == {"profile"}
    assert BodyTemplate.parse(search.body).names == {"limit"}


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        pytest.param({"body": {"a": 1}}, "need method", id="get-with-body"),
        pytest.param({"method": "POST"}, "needs a body", id="post-without-body"),
        pytest.param(
            {"method": "POST", "graphql": True, "body": {"q": "x"}}, "query string", id="graphql"
        ),
    ],
)
def test_body_keys_are_checked_at_load(extra: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        UpstreamConfig.model_validate({"url": f"{BASE}/x", **extra})


@pytest.mark.parametrize(
    ("idempotent", "calls"),
    [pytest.param(None, 1, id="post-not-retried"), pytest.param(True, 3, id="opted-in")],
)
async def test_only_idempotent_posts_are_retried(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    idempotent: bool | None,
    calls: int,
) -> None:
    route = respx_mock.post(f"{BASE}/x").respond(503)
    raw: dict[str, Any] = {"url": f"{BASE}/x", "method": "POST", "body": {"a": 1}}
    if idempotent is not None:
        raw["idempotent"] = idempotent
    up = UpstreamConfig.model_validate({**raw, "retry_backoff": 0.001})

    result = await fetch(httpx_client, "s", up, {}, max_body=1000, guard=UpstreamGuard("s", up))

    assert result.status == "http_status"
    assert route.call_count == calls


def test_source_cache_keys_include_the_body() -> None:
    text = f"""
[upstreams.s]
url = "{BASE}/search"
method = "POST"
body = {{ q = "{{q}}" }}
cache_ttl = 60
[aggregates.g]
path = "/g"
sources = ["s"]
params = {{ q = "str" }}
"""
    cache = SourceCache(None, parse_config(text, "t"))  # type: ignore[arg-type]  # keys only
    assert cache._key("s", {"q": "a"}) != cache._key("s", {"q": "b"})
    assert cache._key("s", {"q": "a"}) == cache._key("s", {"q": "a"})


# -- GraphQL --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "status", "data"),
    [
        pytest.param({"data": {"user": {"id": 7}}}, "ok", {"user": {"id": 7}}, id="data"),
        pytest.param(
            {"data": {"user": None}, "errors": [{"message": "x"}]},
            "ok",
            {"user": None},
            id="partial",
        ),
        pytest.param(
            {"data": None, "errors": [{"message": "internal secret"}]}, "graphql", None, id="errors"
        ),
        pytest.param({"errors": [{"message": "a"}, {"message": "b"}]}, "graphql", None, id="2"),
        pytest.param([1, 2], "graphql", None, id="not-an-object"),
    ],
)
async def test_graphql_answers(
    respx_mock: respx.MockRouter,
    httpx_client: httpx.AsyncClient,
    answer: Any,
    status: str,
    data: Any,
) -> None:
    route = respx_mock.post(f"{BASE}/graphql").respond(200, json=answer)
    query = "query($id: Int!) {user(id: $id) {id}}"  # `{id}` is a selection, not a placeholder
    body = {"query": query, "variables": {"id": "{uid}"}}
    up = UpstreamConfig.model_validate(
        {"url": f"{BASE}/graphql", "method": "POST", "graphql": True, "body": body}
    )

    result = await fetch(httpx_client, "g", up, {"uid": 7}, max_body=10_000)

    assert result.status == status
    assert result.data == data
    assert json.loads(route.calls[0].request.content) == {"query": query, "variables": {"id": 7}}
    assert "internal secret" not in (result.detail or "")


# -- the new kinds everywhere kinds are listed -----------------------------------------------------


@pytest.mark.usefixtures("secret_env")
def test_auth_and_graphql_are_kinds_of_the_metrics_and_the_openapi_document() -> None:
    text = f"""
[upstreams.profile]
url = "{BASE}/p/{{user_id}}"
[upstreams.profile.oauth]
token_url = "{TOKEN_URL}"
client_id = "me"
client_secret = "${{DEMO_CLIENT_SECRET}}"
[upstreams.gql]
url = "{BASE}/graphql"
method = "POST"
graphql = true
[upstreams.gql.body]
query = "query($c: String!) {{w(city: $c) {{t}}}}"
variables = {{ c = "{{profile.city}}", n = "{{n}}" }}
[aggregates.home]
path = "/api/home"
sources = ["profile", "gql"]
params = {{ user_id = "int", n = "int" }}
"""
    document = build_openapi(parse_config(text, "t"))
    validate(document)
    operation = document["paths"]["/api/home"]["get"]
    assert [p["name"] for p in operation["parameters"] if p["in"] == "query"] == ["user_id", "n"]
    assert "gql after profile" in operation["description"]
    assert SECRET not in json.dumps(document)
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**schema, "components": document["components"]})
    validator.validate(
        {
            "data": {},
            "errors": {
                "profile": {"kind": "auth", "detail": "the token endpoint answered HTTP 503"},
                "gql": {"kind": "graphql", "detail": "the GraphQL answer has 1 error and no data"},
            },
            "sources": {
                "profile": {"status": "auth", "ms": 3.0},
                "gql": {"status": "graphql", "ms": 9.0},
            },
            "complete": False,
        }
    )
    assert {"auth", "graphql"} <= set(ERROR_KINDS)
    assert "auth" in REFUSED_KINDS  # the upstream was never called: not in its latency
