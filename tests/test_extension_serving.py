"""Views written on the `Aggregator` extension, over the wire: `aggregator serve --app` on real
Hypercorn, real demo upstreams. A dependent pair costs A + B while the others overlap; the
aggregate cache, single-flight, stale serving, 304, purge and warm, metrics and the OpenAPI entry
work for them as for a configured aggregate; and the bundled example serves and benches."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aggregator.demo.process import DemoProcess
from tests.support.demo import demo_stats, reset_demo
from tests.support.paths import ROOT
from tests.support.servers import Server, start_own_app
from tests.support.views_app import DELAY

pytestmark = pytest.mark.integration

TOKEN = "views-admin-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo: DemoProcess) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("views")
    server = start_own_app(
        tmp,
        "aggregator",
        "serve",
        "--app",
        "tests.support.views_app:app",
        demo_url=demo.url,
        metrics="public",
        admin_token=TOKEN,
        dashboard="false",
        cache_type="filesystem",  # shared by workers: warmable
        cache_dir=str(tmp / "cache"),
    )
    yield server
    server.stop()


def get(server: Server, path: str, **headers: str) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    r = httpx.get(f"{server.url}{path}", headers=headers, trust_env=False, timeout=20)
    return time.monotonic() - started, r


def test_a_dependent_pair_costs_a_plus_b_while_the_others_overlap(
    served: Server, demo: DemoProcess
) -> None:
    reset_demo(demo)

    elapsed, r = get(served, "/home?user_id=11")

    assert r.status_code == 200, r.text
    body = r.json()
    assert body["complete"] is True
    assert body["data"]["weather"]["city"] == body["data"]["profile"]["city"]
    # profile then weather: 2 delays; news and stocks alongside; the sum would be 4 delays.
    assert 2 * DELAY - 0.02 < elapsed < 3 * DELAY, elapsed
    assert r.headers["X-Cache"] == "MISS" and r.headers["X-Request-ID"]
    assert "weather;dur=" in r.headers["Server-Timing"]
    assert demo_stats(demo)["requests"]["weather"] == 1

    sync_elapsed, twin = get(served, "/home-sync?user_id=11")
    assert twin.status_code == 200
    assert twin.json()["data"] == body["data"]
    assert sync_elapsed > 4 * DELAY - 0.02, sync_elapsed  # its twin waits for each in turn


def test_concurrent_cold_requests_make_one_call_per_source(
    served: Server, demo: DemoProcess
) -> None:
    reset_demo(demo)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(trust_env=False, timeout=20) as client:
            return list(
                await asyncio.gather(
                    *(client.get(f"{served.url}/home?user_id=12") for _ in range(20))
                )
            )

    answers = asyncio.run(burst())

    assert {r.status_code for r in answers} == {200}
    assert len({r.content for r in answers}) == 1
    requests = demo_stats(demo)["requests"]
    assert [requests[s] for s in ("profile", "weather", "news", "stocks")] == [1, 1, 1, 1]


def test_hits_304s_and_stale_answers_refreshed_in_the_background(
    served: Server, demo: DemoProcess
) -> None:
    _, first = get(served, "/home?user_id=13")
    _, hit = get(served, "/home?user_id=13")
    _, not_modified = get(served, "/home?user_id=13", **{"If-None-Match": first.headers["ETag"]})
    assert (first.headers["X-Cache"], hit.headers["X-Cache"]) == ("MISS", "HIT")
    assert not_modified.status_code == 304

    time.sleep(1.2)  # past cache_ttl = 1, within stale_ttl
    reset_demo(demo)
    elapsed, stale = get(served, "/home?user_id=13")
    assert stale.headers["X-Cache"] == "STALE" and elapsed < DELAY
    deadline = time.monotonic() + 10
    while demo_stats(demo)["requests"]["weather"] < 1:  # the refresh runs without us
        assert time.monotonic() < deadline, "no background refresh"
        time.sleep(0.05)


def test_purge_and_warm_through_the_admin_api(served: Server, demo: DemoProcess) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    _, first = get(served, "/home?user_id=14")
    assert first.headers["X-Cache"] == "MISS"

    purged = httpx.post(
        f"{served.url}/admin/purge",
        json={"aggregate": "home", "params": {"user_id": 14}},
        headers=auth,
        trust_env=False,
    )
    assert purged.status_code == 200, purged.text
    _, after = get(served, "/home?user_id=14")
    assert after.headers["X-Cache"] == "MISS"

    warmed = httpx.post(
        f"{served.url}/admin/warm",
        json={"aggregate": "home", "params": {"user_id": 15}},
        headers=auth,
        trust_env=False,
        timeout=20,
    )
    assert warmed.status_code == 200, warmed.text
    elapsed, hit = get(served, "/home?user_id=15")
    assert hit.headers["X-Cache"] == "HIT" and elapsed < DELAY
    assert hit.json()["data"]["profile"]["user_id"] == 15


def test_metrics_and_the_openapi_entry_of_a_view(served: Server) -> None:
    get(served, "/home?user_id=16")
    get(served, "/home?user_id=seventeen")

    text = httpx.get(f"{served.url}/metrics", trust_env=False).text
    assert 'aggregator_requests_total{aggregate="home",status="200"}' in text
    assert 'aggregator_requests_total{aggregate="home",status="400"} 1.0' in text
    assert 'aggregator_source_duration_seconds_count{source="weather"}' in text

    document = httpx.get(f"{served.url}/openapi.json", trust_env=False).json()
    operation = document["paths"]["/home"]["get"]
    names = [p["name"] for p in operation["parameters"] if p["in"] == "query"]
    assert names == ["user_id", "topic"]
    assert set(operation["responses"]) >= {"200", "304", "400", "502", "504"}
    assert "/plain" not in document["paths"]  # the app's own views are its own business
    _, plain = get(served, "/plain")
    assert plain.json() == {"plain": "yes"}


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, demo: DemoProcess) -> Iterator[Server]:
    server = start_own_app(
        tmp_path_factory.mktemp("example"),
        "aggregator",
        "serve",
        "--app",
        "examples.home.app:app",
        demo_url=demo.url,
    )
    yield server
    server.stop()


def test_the_example_serves_its_view_and_its_sync_twin_alike(example: Server) -> None:
    _, r = get(example, "/api/home?user_id=7")
    _, twin = get(example, "/api/home-sync?user_id=7")

    assert r.status_code == twin.status_code == 200, r.text + twin.text
    data = r.json()["data"]
    assert data == twin.json()["data"]
    assert data["city"] == data["weather"]["city"] and len(data["headlines"]) == 3
    assert r.json()["sources"].keys() == {"profile", "weather", "news"}


def test_the_example_serves_under_plain_hypercorn(tmp_path: Path, demo: DemoProcess) -> None:
    server = start_own_app(tmp_path, "hypercorn", "examples.home.app:asgi_app", demo_url=demo.url)
    try:
        _, r = get(server, "/api/home?user_id=3")
        assert r.status_code == 200 and r.json()["data"]["name"] == "Ada"
    finally:
        server.stop()


def test_the_example_benches_its_async_view_against_its_sync_twin(
    tmp_path: Path, demo: DemoProcess
) -> None:
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "aggregator",
            "bench",
            "--app",
            "examples.home.app:app",
            "--path",
            "/api/home?user_id=7",
            "--path",
            "/api/home-sync?user_id=7",
            "-t",
            "loop:app",
            "-c",
            "4",
            "-d",
            "1",
            "-r",
            "1",
            "--warmup",
            "0.3",
            "--tool",
            "builtin",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "AGGREGATOR_CACHE_TYPE": "null", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.md").exists()
    text = json.dumps(results)
    assert "/api/home?user_id=7" in text and "/api/home-sync?user_id=7" in text
