"""Views on the public API call the real-world upstreams over the wire: an `async def` view of
a developer's own app (tests/support/upstreams_views_app.py) fetches a POST source, a GraphQL
source and an OAuth2-protected source (the demo's token server), and a hedged one; real
Hypercorn (`aggregator serve --app`), the real demo."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from aggregator.demo.auth import CLIENT_SECRET
from aggregator.demo.process import DemoProcess
from tests.support.demo import demo_stats, reset_demo
from tests.support.servers import Server, start_own_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

COLD = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo: DemoProcess) -> Iterator[Server]:
    httpx.post(f"{demo.url}/_oauth/reset", trust_env=False).raise_for_status()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DEMO_CLIENT_SECRET", CLIENT_SECRET)
        server = start_own_app(
            tmp_path_factory.mktemp("upstreams-views"),
            "aggregator",
            "serve",
            "--app",
            "tests.support.upstreams_views_app:app",
            demo_url=demo.url,
            dashboard="false",
            cache_type="null",  # every request fills: each one really calls its sources
            log_level="DEBUG",
        )
    yield server
    server.stop()


async def test_a_view_fetches_post_graphql_and_oauth2_sources_with_one_token(
    served: Server, demo: DemoProcess
) -> None:
    hostile = '", "admin": true, "x": {"'
    async with httpx.AsyncClient(base_url=served.url, trust_env=False, timeout=20) as http:
        answers = await asyncio.gather(
            *(
                http.get("/search", params={"q": f"{hostile}{i}", "n": str(i), "city": "Oslo"})
                for i in range(COLD)
            )
        )

    for i, answer in enumerate(answers):
        body = answer.json()
        assert answer.status_code == 200 and body["complete"], body
        assert body["data"]["search"]["json"] == {
            "query": {"text": f"{hostile}{i}", "city": "Oslo"},
            "limit": i,
        }
        assert body["data"]["gql"]["echo"]["variables"] == {"city": "Oslo"}
        assert body["data"]["locked"] == {"ok": True, "path": "Oslo"}
    counts = httpx.get(f"{demo.url}/_oauth", trust_env=False).json()
    # N concurrent cold requests (the token endpoint answers after 0.2 s): one token fetch.
    assert (counts["token_requests"], counts["protected_calls"], counts["rejected"]) == (
        1,
        COLD,
        0,
    )
    for secret in [CLIENT_SECRET, *counts["issued"]]:
        assert secret not in served.log()
    assert "upstream locked" in served.log()  # DEBUG was on: the lines were written


def test_a_views_hedged_source_cuts_a_stall(served: Server, demo: DemoProcess) -> None:
    reset_demo(demo)
    took = []
    for i in range(2):
        began = time.monotonic()
        answer = httpx.get(
            f"{served.url}/hedged", params={"topic": f"t{i}"}, trust_env=False, timeout=10
        )
        took.append(time.monotonic() - began)
        body = answer.json()
        assert answer.status_code == 200 and body["complete"], body
        assert body["sources"]["stalling"]["hedged"] is True, body
    assert max(took) < 1.0, took  # each first attempt stalls 2 s at the demo
    assert demo_stats(demo)["requests"]["news"] == 4
