"""Shared fixtures: a clean environment, the real demo upstreams, configs, apps and real servers."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner
from flask.testing import FlaskClient

from aggregator import create_app
from aggregator.demo.process import DemoProcess, free_port, start_demo_process
from aggregator.serving import AggregatorFlask
from aggregator.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


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
    """Undo the GC tuning a test's in-process server lifespan applies (runtime.tune_gc)."""
    threshold = gc.get_threshold()
    yield
    if gc.get_threshold() != threshold or gc.get_freeze_count():
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    """One real demo upstream process for the session (tests pass knobs per URL)."""
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    with start_demo_process(latency=0.0, log_path=log) as proc:
        yield proc


def demo_stats(demo: DemoProcess) -> dict[str, Any]:
    """The demo's counters (connections seen, requests per service)."""
    stats: dict[str, Any] = httpx.get(f"{demo.url}/_stats", trust_env=False).json()
    return stats


def reset_demo(demo: DemoProcess) -> None:
    httpx.post(f"{demo.url}/_reset", trust_env=False).raise_for_status()


def five_sources_config(demo_url: str, *, delay: float = 0.2, deadline: float = 5.0) -> str:
    """An aggregate of five demo sources of `delay` seconds each, plus one of each failure."""
    services = {
        "weather": "/weather/{city}",
        "stocks": "/stocks/{user_id}",
        "news": "/news?topic=general",
        "profile": "/profile/{user_id}",
        "recommendations": "/recommendations/{user_id}",
    }
    lines = []
    for name, path in services.items():
        sep = "&" if "?" in path else "?"
        model = name.capitalize()
        lines += [
            f"[upstreams.{name}]",
            f'url = "{demo_url}{path}{sep}delay={delay}"',
            "timeout = 3.0",
            f'schema = "aggregator.demo.models:{model}"',
            "",
        ]
    lines += [
        "[aggregates.five]",
        'path = "/api/five"',
        f"sources = {list(services)!r}".replace("'", '"'),
        'required = ["profile"]',
        f"deadline = {deadline}",
        'params = { city = "str", user_id = "int" }',
        "",
    ]
    return "\n".join(lines)


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


@pytest.fixture
def app(config_path: Path) -> AggregatorFlask:
    return create_app(Settings(config=config_path))


@pytest.fixture
def client(app: AggregatorFlask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@dataclass
class Server:
    """A real Hypercorn process serving `asgi:app` on a free loopback port."""

    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def wait_healthy(url: str, popen: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll /healthz until it answers; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"server exited with {popen.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=0.5, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server not healthy within {timeout} s:\n{log.read_text()}")


def start_hypercorn(
    log_dir: Path,
    config: Path | None = None,
    *,
    workers: int = 1,
    app: str = "asgi:app",
    **settings: str,
) -> Server:
    """Start Hypercorn (`python -m hypercorn --config hypercorn.toml ... asgi:app`) and wait for it.

    `settings` become AGGREGATOR_* variables; `app` names another ASGI app (`tests.module:app`)
    for tests that need routes of their own. The caller stops the server.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    if config is not None:
        env["AGGREGATOR_CONFIG"] = str(config)
    env.update({f"AGGREGATOR_{k.upper()}": v for k, v in settings.items()})
    log = log_dir / f"hypercorn-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "hypercorn",
        "--config",
        "hypercorn.toml",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        app,
    ]
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", popen, log)
    try:
        wait_healthy(server.url, popen, log, timeout=20)
    except RuntimeError:
        server.stop()
        raise
    return server


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


# -- a private redis-server ----------------------------------------------------------------------


class PrivateRedis:
    """A `redis-server` child on a free loopback port, ours to kill, pause and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.popen: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2
        )

    def start(self, timeout: float = 10.0) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed; these tests (and .ci/run) need it")
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--daemonize", "no", "--dir", str(self.workdir)]
        log = self.workdir / f"redis-{self.port}.log"
        with log.open("ab") as out:
            self.popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited {self.popen.returncode}:\n{log.read_text()}"
                )
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server not answering within {timeout} s:\n{log.read_text()}")

    def pause(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.kill()
        self.popen.wait(5)

    def begin_outage(self, outage: str) -> None:
        """killed: connections are refused; paused: accepted but never answered."""
        if outage == "killed":
            self.kill()
        else:
            self.pause()

    def end_outage(self, outage: str) -> None:
        """A new server on the same port, or SIGCONT."""
        if outage == "killed":
            self.start()
        else:
            self.resume()

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        if self.paused:
            self.resume()
        self.popen.terminate()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
