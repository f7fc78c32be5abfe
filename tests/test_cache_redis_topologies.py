"""Redis Sentinel and Redis Cluster backends against real servers this test starts on loopback."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from aggregator import create_app
from aggregator.cache import AggregateCache, purge
from aggregator.demo.process import free_port
from aggregator.engine import engine_of
from aggregator.settings import Settings
from tests.support.demo import demo_stats, reset_demo
from tests.support.redis import cluster_port, start_redis_server, stop_processes

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[str]:
    """A master and one sentinel watching it; yields the sentinel's host:port."""
    master_port, sentinel_port = free_port(), free_port()
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    master = start_redis_server(
        ["--port", str(master_port), *base], master_port, tmp_path / "master.log"
    )
    conf = tmp_path / "sentinel.conf"  # sentinel rewrites its config file: give it its own
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        "sentinel down-after-milliseconds mymaster 5000\n"
    )
    watcher = start_redis_server(
        [str(conf), "--sentinel"], sentinel_port, tmp_path / "sentinel.log"
    )
    yield f"127.0.0.1:{sentinel_port}"
    stop_processes(watcher, master)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    """A one-node Redis Cluster owning all 16384 slots; yields its host:port."""
    port = cluster_port()
    args = [
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"),
        "--dir", str(tmp_path),
    ]  # fmt: skip
    node = start_redis_server(args, port, tmp_path / "cluster.log")
    client = redis.Redis(port=port)
    client.cluster("ADDSLOTSRANGE", 0, 16383)
    deadline = time.monotonic() + 10
    while client.cluster("INFO").get("cluster_state") != "ok":
        assert time.monotonic() < deadline, "cluster did not become ok"
        time.sleep(0.05)
    client.close()
    yield f"127.0.0.1:{port}"
    stop_processes(node)


def _config(demo_url: str, write_config: Callable[[str], Path]) -> Path:
    return write_config(
        f"""
[upstreams.weather]
url = "{demo_url}/weather/{{city}}"
[upstreams.profile]
url = "{demo_url}/profile/{{user_id}}"

[aggregates.board]
path = "/board"
sources = ["weather", "profile"]
params = {{ city = "str", user_id = "int" }}
cache_ttl = 60
"""
    )


@pytest.mark.parametrize("topology", ["redissentinel", "rediscluster"])
def test_cache_works_on_sentinel_and_cluster(topology, request, demo, write_config):
    nodes = request.getfixturevalue("sentinel" if topology == "redissentinel" else "cluster")
    settings = Settings(
        config=_config(demo.url, write_config),
        cache_type=topology,
        cache_redis_nodes=nodes,
        cache_local_ttl=0,  # every request reads the real backend
    )
    app = create_app(settings)
    service: AggregateCache = engine_of(app).cache
    assert service.store.is_redis  # single-flight locks across processes here too
    client = app.test_client()
    reset_demo(demo)
    url = "/board?city=Paris&user_id=7"
    seen = [client.get(url).headers["X-Cache"] for _ in range(3)]
    assert seen == ["MISS", "HIT", "HIT"]
    assert demo_stats(demo)["requests"]["weather"] == 1
    # purges write markers and delete keys, across hash slots on the cluster
    asyncio.run(purge(service, aggregate="board", params={"city": "Paris", "user_id": 7}))
    assert client.get(url).headers["X-Cache"] == "MISS"
    asyncio.run(purge(service, upstream="profile"))
    assert client.get(url).headers["X-Cache"] == "MISS"
    assert client.get(url).headers["X-Cache"] == "HIT"


@pytest.mark.parametrize("topology", ["redissentinel", "rediscluster"])
async def test_shared_resilience_state_works_on_sentinel_and_cluster(topology, request):
    """The fleet breaker (trip seen by another worker, the probe lease) and the fleet limit,
    on the same topologies the cache speaks: one upstream's keys share a Cluster slot."""
    from aggregator.config import UpstreamConfig
    from aggregator.resilience.shared import SharedState

    nodes = request.getfixturevalue("sentinel" if topology == "redissentinel" else "cluster")
    settings = Settings(
        cache_type=topology,
        cache_redis_nodes=nodes,
        shared_resilience="redis",
        shared_resilience_interval=0.05,
    )
    up = UpstreamConfig.model_validate(
        {"url": "http://upstream.test/x", "breaker_failures": 2, "breaker_cooldown": 0.3}
    )
    a, b = SharedState(settings), SharedState(settings)
    breakers = [a.breaker("up", up), b.breaker("up", up)]
    await a.start()
    await b.start()
    try:
        assert a.healthy and b.healthy
        for _ in range(2):
            permit = breakers[0].acquire()
            assert permit is not None
            breakers[0].record(permit, failed=True)
        deadline = time.monotonic() + 5
        while breakers[1].state != "open":
            assert time.monotonic() < deadline, "the trip never reached the other worker"
            await asyncio.sleep(0.02)
        probe = None
        while probe is None:  # after the cool-down, the lease makes one of them the prober
            assert time.monotonic() < deadline + 5, "no probe lease was ever granted"
            probe = breakers[1].acquire() or breakers[0].acquire()
            await asyncio.sleep(0.02)
        assert probe.probe
        first = await a.lease("up", 1, 10)
        assert first and await b.lease("up", 1, 10) is None
    finally:
        await a.stop()
        await b.stop()
