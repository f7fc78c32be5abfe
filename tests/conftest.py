"""Fixtures only (helpers live in tests/support): a clean environment, the real demo upstream,
configs, apps, upstream clients, real servers and Redis.

Modules vary a fixture by overriding the small one it is built from (`server_config`,
`server_settings`), never by defining `server`, `client` or a Redis prefix of their own.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient

from aggregator import create_app
from aggregator.demo.process import DemoProcess, start_demo_process
from aggregator.serving import AggregatorFlask
from aggregator.settings import Engine, Settings
from aggregator.upstream.engines import build_client
from deploy.local_cluster import LocalCluster, missing_prerequisites
from tests.support.clients import ENGINES
from tests.support.configs import five_sources_config
from tests.support.redis import PrivateRedis, shared_prefix
from tests.support.servers import Server, start_hypercorn


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """No AGGREGATOR_* variable leaks into a test, nor out of one (the CLI sets some)."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("AGGREGATOR_"):
            del os.environ[name]
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def untouched_collector() -> Iterator[None]:
    """Undo the GC tuning a test's in-process server lifespan applies (gc_tuning.tune_gc)."""
    threshold = gc.get_threshold()
    yield
    if gc.get_threshold() != threshold or gc.get_freeze_count():
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.fixture
def no_log_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI configures logging once per process; in a test that would outlive CliRunner's
    stderr. Modules that invoke logging commands use it (`pytest.mark.usefixtures`)."""
    for module in ("aggregator.ops.purge", "aggregator.ops.warm.command"):
        monkeypatch.setattr(f"{module}.configure_logging", lambda *_: None)


# -- the demo upstream and configs ---------------------------------------------------------------


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    """One real demo upstream process for the session (tests pass knobs per URL)."""
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with start_demo_process(latency=0.0, log_path=log) as proc:
        yield proc


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Write TOML text to a file in the test's tmp dir and return its path."""
    counter = iter(range(1000))

    def write(text: str) -> Path:
        path = tmp_path / f"config-{next(counter)}.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def config_path(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    return write_config(five_sources_config(demo.url, delay=0.05))


# -- the app in-process ------------------------------------------------------------------------


@pytest.fixture
def app(config_path: Path) -> AggregatorFlask:
    return create_app(Settings(config=config_path))


@pytest.fixture
def client(app: AggregatorFlask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# -- upstream clients ----------------------------------------------------------------------------


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Engine:
    """Each upstream client engine in turn."""
    value: Engine = request.param
    return value


@pytest.fixture
async def engine_client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """A real upstream client on each engine (real upstreams: respx is not involved)."""
    async with build_client(Settings(engine=engine)) as own:
        yield own


@pytest.fixture
async def httpx_client() -> AsyncIterator[httpx.AsyncClient]:
    """An upstream client on the httpx engine, the one respx can intercept."""
    async with build_client(Settings(engine="httpx")) as own:
        yield own


# -- real Hypercorn --------------------------------------------------------------------------------


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory: `start_hypercorn` with this test's tmp dir; every server is stopped afterwards."""
    servers: list[Server] = []

    def start(config: Path | None = None, **kwargs: Any) -> Server:
        server = start_hypercorn(tmp_path, config, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server_config(config_path: Path) -> Path:
    """The config `server` serves; a module overrides this to serve its own."""
    return config_path


@pytest.fixture
def server_settings() -> dict[str, str]:
    """AGGREGATOR_* settings of `server`; a module overrides (or parametrizes) this."""
    return {}


@pytest.fixture
def server(
    serve: Callable[..., Server], server_config: Path, server_settings: dict[str, str]
) -> Server:
    """One real Hypercorn serving `server_config` with `server_settings`."""
    return serve(server_config, **server_settings)


# -- Redis -----------------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own, to kill, pause and restart."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shared_redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    with shared_prefix() as prefix:
        yield prefix


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A fresh multi-host topology (deploy/local_cluster.py): cold cache, every host up."""
    problem = missing_prerequisites()
    if problem is not None:
        pytest.skip(f"the local cluster cannot be built here: {problem}")
    with LocalCluster(tmp_path / "cluster") as built:
        yield built
