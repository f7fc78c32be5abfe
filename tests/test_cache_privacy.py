"""Requests with credentials never share cache entries across users: they bypass the aggregate
cache (before Flask too) unless the aggregate declares `cache_vary`, whose header values then
key the entries. Two users on real Hypercorn, the rule in every serving mode, keys and config."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import request
from pydantic import SecretStr

from aggregator import create_app
from aggregator.cache import purge
from aggregator.cache.entries import aggregate_key
from aggregator.cache.privacy import caller_from_asgi, caller_from_headers, vary_digest
from aggregator.config import parse_config
from aggregator.demo.process import DemoProcess
from aggregator.engine import engine_of
from aggregator.errors import ConfigError
from aggregator.serving import ASGIAdapter
from aggregator.settings import Settings
from tests.support.clients import http_scope
from tests.support.configs import cached_config
from tests.support.demo import demo_stats, reset_demo
from tests.support.servers import Server, serving

QUERY = "city=Paris&user_id=7"
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}
CREDENTIALS = [
    pytest.param(ALICE, BOB, id="authorization"),
    pytest.param({"Cookie": "session=alice"}, {"Cookie": "session=bob"}, id="cookie"),
]


def privacy_config(demo_url: str) -> str:
    """/api/five (cached, no cache_vary) and /api/tenant (cached per X-Tenant)."""
    return (
        cached_config(demo_url, delay=0.02)
        + """
[aggregates.tenant]
path = "/api/tenant"
sources = ["weather", "profile"]
params = { city = "str", user_id = "int" }
cache_ttl = 30
cache_vary = ["X-Tenant"]
"""
    )


@pytest.fixture
def config(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    return write_config(privacy_config(demo.url))


def upstream_calls(demo: DemoProcess) -> int:
    return int(demo_stats(demo)["total_requests"])


def cache_state(r: httpx.Response) -> tuple[int, str, str, str]:
    return (
        r.status_code,
        r.headers.get("x-cache", ""),
        r.headers.get("x-cache-bypass", ""),
        r.headers["cache-control"],
    )


# -- two users on real Hypercorn ---------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(("alice", "bob"), CREDENTIALS)
def test_two_users_with_credentials_never_share_an_entry(serve, demo, config, alice, bob):
    server: Server = serve(config)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        assert client.get(f"/api/five?{QUERY}").headers["x-cache"] == "MISS"
        assert client.get(f"/api/five?{QUERY}").headers["x-cache"] == "HIT"  # fresh, fast path
        reset_demo(demo)
        answers = [client.get(f"/api/five?{QUERY}", headers=h) for h in (alice, bob, alice)]
        calls = upstream_calls(demo)
        # Nothing a credentialed request fetched was stored for anyone else either.
        for headers in (alice, bob):
            client.get("/api/five?city=Oslo&user_id=8", headers=headers)
        anonymous = client.get("/api/five?city=Oslo&user_id=8")

    bypass = (200, "BYPASS", "credentials", "private, no-store")
    assert [cache_state(r) for r in answers] == [bypass] * 3
    assert calls == 3 * 5  # each answer fanned out on its own: none came from an entry
    assert all("private" in r.headers["cache-control"] for r in answers)
    assert "cache;dur=" in answers[0].headers["server-timing"]
    assert anonymous.headers["x-cache"] == "MISS"


@pytest.mark.integration
def test_a_tenant_header_declared_in_cache_vary_keys_the_entries(serve, demo, config):
    server: Server = serve(config)
    acme, globex = {"X-Tenant": "acme"}, {"X-Tenant": "globex"}
    url = f"/api/tenant?{QUERY}"
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        first_alice = client.get(url, headers=ALICE | acme)
        first_bob = client.get(url, headers=BOB | globex)  # a HIT here would be acme's answer
        alice_again = client.get(url, headers=ALICE | acme)
        carol_acme = client.get(url, headers={"Authorization": "Bearer carol"} | acme)
        anonymous_acme = client.get(url, headers=acme)
        underscore_acme = client.get(url, headers={"X_Tenant": "acme"})  # WSGI reads it so
        no_tenant = client.get(url)
        no_tenant_with_credentials = client.get(url, headers=BOB)

    assert cache_state(first_alice) == (200, "MISS", "", "private, max-age=30")
    assert cache_state(first_bob) == (200, "MISS", "", "private, max-age=30")
    assert cache_state(alice_again)[:3] == (200, "HIT", "")
    assert alice_again.headers["cache-control"].startswith("private, max-age=")
    assert carol_acme.headers["x-cache"] == "HIT"  # same tenant: shared, as declared
    assert cache_state(anonymous_acme)[1] == "HIT"
    assert not anonymous_acme.headers["cache-control"].startswith("private")
    assert underscore_acme.headers["x-cache"] == "HIT"
    assert no_tenant.headers["x-cache"] == "MISS"
    assert no_tenant_with_credentials.headers["x-cache"] == "HIT"  # shares the no-tenant entry
    for r in (first_alice, alice_again, anonymous_acme, no_tenant):
        assert r.headers["vary"] == "x-tenant"


# -- the rule in every serving mode, and per request ---------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["loop", "threads", "serial"])
async def test_credentials_bypass_a_fresh_entry_in_every_mode(demo, config, mode):
    async with serving(config, mode=mode) as (_, client):
        await client.get(f"/api/five?{QUERY}")
        hit = await client.get(f"/api/five?{QUERY}")
        private = await client.get(f"/api/five?{QUERY}", headers=ALICE)
        blank = await client.get(f"/api/five?{QUERY}", headers={"Authorization": " "})
    assert hit.headers["x-cache"] == "HIT"
    assert cache_state(private) == (200, "BYPASS", "credentials", "private, no-store")
    assert private.json()["complete"] is True
    assert blank.headers["x-cache"] == "HIT"  # an empty header carries no credential


@pytest.mark.integration
async def test_concurrent_requests_with_credentials_do_not_share_one_fan_out(demo, config):
    async with serving(config) as (_, client):
        reset_demo(demo)
        users = [{"Authorization": f"Bearer user-{i}"} for i in range(4)]
        answers = await asyncio.gather(
            *(client.get(f"/api/five?{QUERY}", headers=h) for h in users)
        )
        private_calls = upstream_calls(demo)
        reset_demo(demo)
        await asyncio.gather(*(client.get("/api/five?city=Lima&user_id=3") for _ in range(4)))
        anonymous_calls = upstream_calls(demo)
    assert {r.headers["x-cache"] for r in answers} == {"BYPASS"}
    assert private_calls == 4 * 5  # one fan-out per user: no single-flight across users
    assert anonymous_calls == 5  # anonymous requests still share one


@pytest.mark.integration
async def test_an_aggregate_that_is_not_cached_answers_credentials_privately(demo, write_config):
    config = write_config(cached_config(demo.url, delay=0.02, ttl=0))
    async with serving(config) as (_, client):
        r = await client.get(f"/api/five?{QUERY}", headers=ALICE)
    assert r.status_code == 200
    assert "x-cache" not in r.headers
    assert r.headers["cache-control"] == "private, no-store"


# -- what the fast path and the view read from the headers ---------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param([], (None, False, ""), id="nothing"),
        pytest.param([(b"authorization", b"Bearer x")], (None, True, ""), id="authorization"),
        pytest.param([(b"cookie", b"a=b")], (None, True, ""), id="cookie"),
        pytest.param([(b"cookie", b"  ")], (None, False, ""), id="blank-cookie"),
        pytest.param([(b"if-none-match", b'"e"')], ('"e"', False, ""), id="etag"),
        pytest.param(
            [(b"if-none-match", b'"a"'), (b"if-none-match", b'"b"')],
            ('"a","b"', False, ""),
            id="etags-joined",
        ),
    ],
)
def test_what_the_fast_path_reads_from_raw_headers(raw, expected):
    caller = caller_from_asgi(raw, ())
    assert (caller.if_none_match, caller.credentials, caller.vary) == expected


@pytest.mark.parametrize(
    ("raw", "vary"),
    [
        pytest.param([(b"x-tenant", b"acme")], ["x-tenant"], id="one"),
        pytest.param([(b"x_tenant", b"acme")], ["x-tenant"], id="underscore"),
        pytest.param([(b"x-tenant", b"ac"), (b"x-tenant", b"me")], ["x-tenant"], id="repeated"),
        pytest.param([], ["x-tenant"], id="absent"),
        pytest.param(
            [(b"x-region", b"eu"), (b"x-tenant", b"acme")], ["x-tenant", "x-region"], id="two"
        ),
        pytest.param([(b"authorization", b"Bearer a")], ["authorization"], id="credential"),
        pytest.param([(b"cookie", b"s=1"), (b"cookie", b"t=2")], ["cookie"], id="cookies"),
    ],
)
def test_the_fast_path_and_the_view_derive_the_same_caller(raw, vary, config_path):
    # The view reads the WSGI environ the adapter builds (asgiref's) from the same raw headers.
    settings = Settings(config=config_path)
    app = create_app(settings)
    scope: Any = http_scope("/", headers=raw)
    environ = ASGIAdapter(app, settings)._environ(scope, b"")

    with app.request_context(environ):
        from_view = caller_from_headers(request.headers.get, vary)
    from_fast_path = caller_from_asgi(raw, tuple(name.encode() for name in vary))

    assert from_fast_path == from_view
    if raw:  # the values count: not the digest of absent headers
        assert from_fast_path.vary != caller_from_headers(lambda name: None, vary).vary


def test_vary_values_are_hashed_into_distinct_keys():
    params: dict[str, Any] = {"city": "Paris"}
    acme, globex = vary_digest(["acme"]), vary_digest(["globex"])

    keys = {aggregate_key("t", params), aggregate_key("t", params, acme)}
    keys.add(aggregate_key("t", params, globex))

    assert len(keys) == 3
    assert not any("acme" in key or "globex" in key for key in keys)  # no tenant in key names
    assert vary_digest(["a", "b"]) != vary_digest(["a,b"]) != vary_digest(["ab"])


# -- config and purge ----------------------------------------------------------------------------


def _tenant_toml(vary: str) -> str:
    return f"""
[upstreams.a]
url = "http://127.0.0.1:1/a"

[aggregates.t]
path = "/t"
sources = ["a"]
cache_ttl = 5
cache_vary = {vary}
"""


def test_cache_vary_names_are_header_names_normalized_to_lower_case():
    config = parse_config(_tenant_toml('["X-Tenant", "X-Region"]'), "t.toml")
    assert config.aggregates["t"].cache_vary == ["x-tenant", "x-region"]


@pytest.mark.parametrize(
    ("vary", "says"),
    [
        pytest.param('["X Tenant"]', "is not a header name", id="space"),
        pytest.param('["X-Tenant:"]', "is not a header name", id="colon"),
        pytest.param('["X-Tenant", "x-tenant"]', "lists a header twice", id="twice"),
        pytest.param('"X-Tenant"', "aggregates.t.cache_vary", id="not-a-list"),
    ],
)
def test_bad_cache_vary_is_a_config_error(vary, says):
    with pytest.raises(ConfigError, match=says):
        parse_config(_tenant_toml(vary), "t.toml")


def test_purging_one_parameter_set_of_a_varying_aggregate_purges_it_whole(tmp_path):
    config_path = tmp_path / "c.toml"
    config_path.write_text(_tenant_toml('["X-Tenant"]') + 'params = { city = "str" }\n')
    app = create_app(Settings(config=config_path, admin_token=SecretStr("t" * 32)))
    service = engine_of(app).cache

    purged = asyncio.run(purge(service, aggregate="t", params={"city": "Paris"}))

    assert purged == ["aggregate t"]  # one entry per tenant: all of them, not none
