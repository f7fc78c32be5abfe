"""Fan-out against the real demo upstream: concurrency, isolation, deadlines, pool hygiene."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import httpx
import pytest
from httpx_aiohttp import AiohttpTransport

from aggregator.config import AppConfig, parse_config
from aggregator.demo.process import DemoProcess
from aggregator.fanout import Calls, fan_out
from aggregator.params import ParamValue
from aggregator.settings import Engine, Settings
from aggregator.upstream.engines import PoolUsage, build_client, pool_usage
from tests.support.configs import five_sources_config
from tests.support.demo import demo_stats, reset_demo

pytestmark = pytest.mark.integration

PARAMS: dict[str, ParamValue] = {"city": "Paris", "user_id": 7}
MAX_BODY = 1_000_000


def mixed_config(demo_url: str, *, deadline: float = 5.0) -> AppConfig:
    """Sources that each end differently, plus fast and never-answering ones."""
    return parse_config(
        f"""
[upstreams.fast]
url = "{demo_url}/profile/{{user_id}}?delay=0.05"
schema = "aggregator.demo.models:Profile"

[upstreams.broken]
url = "{demo_url}/weather/{{city}}?status=503"

[upstreams.garbled]
url = "{demo_url}/weather/{{city}}?invalid=1"

[upstreams.dripping]
url = "{demo_url}/weather/{{city}}?drip=5"
timeout = 0.4

[upstreams.hanging]
url = "{demo_url}/stocks/{{user_id}}?delay=5"
timeout = 60

[upstreams.dripping_long]
url = "{demo_url}/news?topic=x&drip=5"
timeout = 60

[aggregates.isolation]
path = "/isolation"
sources = ["fast", "broken", "garbled", "dripping"]
params = {{ city = "str", user_id = "int" }}
deadline = {deadline}

[aggregates.cut]
path = "/cut"
sources = ["fast", "hanging", "dripping_long"]
params = {{ city = "str", user_id = "int" }}
deadline = 0.5

[aggregates.only_fast]
path = "/only-fast"
sources = ["fast"]
params = {{ user_id = "int" }}
""",
        "test",
    )


def assert_pool_clean(client: httpx.AsyncClient) -> None:
    """No connection is held by a request, and nobody waits for one."""
    transport = client._transport
    if isinstance(transport, httpx.AsyncHTTPTransport):
        pool = transport._pool
        assert pool._requests == []
        for conn in pool.connections:
            assert conn.is_idle() or conn.is_closed(), conn
    else:
        assert isinstance(transport, AiohttpTransport)
        session = transport.client
        assert isinstance(session, aiohttp.ClientSession)
        connector = session.connector
        assert connector is not None
        assert connector._acquired == set()
        assert not any(connector._waiters.values())


async def test_sources_run_concurrently(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    config = parse_config(five_sources_config(demo.url, delay=0.3), "five")
    reset_demo(demo)
    started = time.monotonic()

    results = await fan_out(
        engine_client, config, config.aggregates["five"], PARAMS, max_body=MAX_BODY
    )

    elapsed = time.monotonic() - started
    assert list(results) == ["weather", "stocks", "news", "profile", "recommendations"]
    assert all(r.ok for r in results.values()), results
    assert elapsed < 1.0  # one after another would take 5 x 0.3 = 1.5 s
    # Exactly one call per source (in-flight counts would include earlier tests' leftovers).
    stats = demo_stats(demo)
    assert stats["total_requests"] == 5
    assert stats["requests"] == {
        "weather": 1,
        "stocks": 1,
        "news": 1,
        "profile": 1,
        "recommendations": 1,
        "echo": 0,
    }


async def test_results_keep_config_order_and_names(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    config = mixed_config(demo.url)

    results = await fan_out(
        engine_client, config, config.aggregates["isolation"], PARAMS, max_body=MAX_BODY
    )

    assert list(results) == ["fast", "broken", "garbled", "dripping"]
    assert {name: r.name for name, r in results.items()} == {n: n for n in results}


async def test_a_failing_source_does_not_affect_its_siblings(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    config = mixed_config(demo.url)
    started = time.monotonic()

    results = await fan_out(
        engine_client, config, config.aggregates["isolation"], PARAMS, max_body=MAX_BODY
    )

    assert {name: r.status for name, r in results.items()} == {
        "fast": "ok",
        "broken": "http_status",
        "garbled": "invalid_json",
        "dripping": "timeout",
    }
    assert results["fast"].data["user_id"] == 7
    assert results["broken"].upstream_status == 503
    assert time.monotonic() - started < 3.0  # the dripping source is cut at its own 0.4 s


async def test_deadline_keeps_what_arrived_and_marks_the_rest(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    config = mixed_config(demo.url)
    started = time.monotonic()

    results = await fan_out(
        engine_client, config, config.aggregates["cut"], PARAMS, max_body=MAX_BODY
    )

    elapsed = time.monotonic() - started
    assert results["fast"].ok
    assert results["fast"].data["user_id"] == 7
    for name in ("hanging", "dripping_long"):
        assert results[name].status == "deadline"
        assert results[name].detail == "no answer within the aggregate deadline of 0.5 s"
        assert results[name].data is None
        assert 400 <= results[name].ms < 3000
    assert 0.4 <= elapsed < 3.0


async def test_no_connection_leaks_after_deadlines(demo: DemoProcess, engine: Engine) -> None:
    config = mixed_config(demo.url)
    # Two connections, and each round cuts two sources off mid-call: a single leaked
    # connection per round would exhaust the pool by the second round.
    async with build_client(Settings(engine=engine, pool_max_connections=2)) as client:
        for _ in range(3):
            results = await fan_out(
                client, config, config.aggregates["cut"], PARAMS, max_body=MAX_BODY
            )
            assert results["hanging"].status == "deadline"
            assert results["dripping_long"].status == "deadline"
            assert_pool_clean(client)

        started = time.monotonic()
        results = await fan_out(
            client, config, config.aggregates["only_fast"], PARAMS, max_body=MAX_BODY
        )

        assert results["fast"].ok, results
        assert time.monotonic() - started < 2.0
        assert_pool_clean(client)


async def test_cancelling_the_fan_out_cancels_every_source(
    demo: DemoProcess, engine_client: httpx.AsyncClient
) -> None:
    config = mixed_config(demo.url)
    task = asyncio.create_task(
        fan_out(engine_client, config, config.aggregates["cut"], PARAMS, max_body=MAX_BODY)
    )
    await asyncio.sleep(0.2)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("upstream:")]
    assert leftovers == []
    assert_pool_clean(engine_client)
    results = await fan_out(
        engine_client, config, config.aggregates["only_fast"], PARAMS, max_body=MAX_BODY
    )
    assert results["fast"].ok


async def test_requests_cancelled_right_after_scheduling_do_not_poison_the_pool(
    demo: DemoProcess, engine: Engine
) -> None:
    # With stock httpcore this leaves a never-connected connection in the only slot and the
    # next request waits for it forever (PoolTimeout); see _OrphanSafePool.
    url = f"{demo.url}/profile/7?delay=0"
    async with build_client(Settings(engine=engine, pool_max_connections=1)) as client:
        tasks = [asyncio.create_task(client.get(url)) for _ in range(2)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes

        async with asyncio.timeout(2):
            response = await client.get(url)

        assert response.status_code == 200
        assert response.json()["user_id"] == 7
        assert_pool_clean(client)


async def test_repeated_early_cancellations_do_not_poison_the_pool(
    demo: DemoProcess, engine: Engine
) -> None:
    url = f"{demo.url}/profile/7?delay=0"
    async with build_client(Settings(engine=engine, pool_max_connections=2)) as client:
        for ticks in range(6):
            tasks = [asyncio.create_task(client.get(url)) for _ in range(4)]
            for _ in range(ticks):
                await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        async with asyncio.timeout(2):
            responses = await asyncio.gather(*(client.get(url) for _ in range(4)))

        assert [r.status_code for r in responses] == [200] * 4
        assert_pool_clean(client)


@pytest.mark.parametrize("gap", [0, 1, 2, 3], ids=lambda n: f"second-cancel-after-{n}-steps")
async def test_a_call_cancelled_twice_still_releases_its_connection(
    demo: DemoProcess, engine_client: httpx.AsyncClient, gap: int
) -> None:
    # A client leaving cancels the call once, and the fan-out (or a deadline) may cancel it
    # again while the HTTP stack is still closing the connection after the first.
    config = mixed_config(demo.url)
    calls = Calls(engine_client, config, deadline=30, max_body=MAX_BODY)
    task = asyncio.create_task(calls.call("hanging", PARAMS))
    await asyncio.sleep(0.3)  # connected, the request sent, waiting for the answer
    task.cancel()
    for _ in range(gap):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    for _ in range(100):  # the clean-up goes on without us; give it a moment
        if pool_usage(engine_client) == PoolUsage(in_use=0, idle=0, waiting=0):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    assert_pool_clean(engine_client)
    assert calls.outstanding() == {"hanging": "hanging"}
