"""Real servers for the tests: Hypercorn subprocesses on free loopback ports, the ASGI app
in-process under its lifespan, and which Hypercorn worker served a connection (Linux /proc)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from aggregator import create_asgi_app
from aggregator.demo.process import free_port
from aggregator.serving import ASGIAdapter
from aggregator.settings import Settings
from tests.support.configs import QUERY
from tests.support.paths import ROOT


@dataclass
class Server:
    """A real Hypercorn process serving `asgi:app` on a free loopback port."""

    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

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


#: Seconds a server may take to answer /healthz after it is started. Generous: it is only reached
#: when a start fails, and several workers importing the stack on a busy 2-core machine took >20 s.
START_TIMEOUT = 60.0


def wait_healthy(
    url: str,
    popen: subprocess.Popen[bytes],
    log: Path,
    timeout: float = START_TIMEOUT,
    *,
    any_answer: bool = False,
) -> None:
    """Poll /healthz until it answers; fail with the server's log if it dies or times out.

    `any_answer`: a developer's app may have no /healthz: any status there means it is up.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"server exited with {popen.returncode}:\n{log.read_text()}")
        try:
            status = httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code
            if status == 200 or any_answer:
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

    `settings` become AGGREGATOR_* variables; `app` names another ASGI app
    (`tests.support.module:app`) for tests that need routes of their own. The caller stops it.
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
        wait_healthy(server.url, popen, log)
    except RuntimeError:
        server.stop()
        raise
    return server


def start_own_app(log_dir: Path, *argv: str, **settings: str) -> Server:
    """Serve `tests.support.own_app` with `argv` (`aggregator serve --app ...` or `hypercorn
    ...`, given without the bind, which is added) on a free port; wait until it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    env.update({f"AGGREGATOR_{k.upper()}": v for k, v in settings.items()})
    log = log_dir / f"own-app-{port}.log"
    cmd = [sys.executable, "-m", *argv, "--bind", f"127.0.0.1:{port}"]
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", popen, log)
    try:
        wait_healthy(server.url, popen, log, any_answer=True)
    except RuntimeError:
        server.stop()
        raise
    return server


# -- the ASGI app in-process --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    config: Path, **settings: Any
) -> AsyncIterator[tuple[ASGIAdapter, httpx.AsyncClient]]:
    """The real ASGI app in-process, started by its lifespan, and a client for it."""
    adapter = create_asgi_app(Settings(config=config, **settings))
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's ASGI types
    limits = httpx.Limits(max_connections=None)
    async with (
        adapter.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30, limits=limits) as c,
    ):
        yield adapter, c


async def burst(client: httpx.AsyncClient, url: str, n: int) -> list[httpx.Response]:
    """`n` concurrent GETs of `url`."""
    return list(await asyncio.gather(*[client.get(url) for _ in range(n)]))


# -- which worker process served a connection (Linux /proc) ------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after "(comm)" and state
            found.append(int(entry))
    return found


def serving_pids(server: Server, client_ports: Iterable[int]) -> dict[int, int]:
    """Client port -> pid of the Hypercorn worker holding the server side of that connection."""
    port = server.address[1]
    inodes: dict[str, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.rsplit(":", 1)[1], 16) == port and inode != "0":
            inodes[f"socket:[{inode}]"] = int(remote.rsplit(":", 1)[1], 16)
    owners: dict[int, int] = {}
    for pid in _children(server.popen.pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target in inodes:
                        owners[inodes[target]] = pid
    wanted = set(client_ports)
    return {p: pid for p, pid in owners.items() if p in wanted}


def client_port(response: httpx.Response) -> int:
    """The local port of the (still open) connection that carried `response`."""
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


def get_fresh(server: Server, path: str) -> tuple[httpx.Response, int]:
    """GET on a new connection; the response and the pid of the worker that served it."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        response = client.get(server.url + path)
        port = client_port(response)
        return response, serving_pids(server, [port])[port]


def wait_for_workers(server: Server, n: int, timeout: float = 20.0) -> set[int]:
    """Fresh connections to /healthz until `n` different workers have answered."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < n and time.monotonic() < deadline:
        response, pid = get_fresh(server, "/healthz")
        if response.status_code == 200:
            seen.add(pid)
    assert len(seen) == n, f"only workers {seen} answered within {timeout} s:\n{server.log()}"
    return seen


async def cold_burst_over_the_wire(
    server: Server, n: int
) -> tuple[list[httpx.Response], dict[int, int]]:
    """`n` concurrent requests of /api/five on `n` connections; the responses and requests per
    worker."""
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:
        responses = await burst(client, f"{server.url}/api/five?{QUERY}", n)
        ports = [client_port(r) for r in responses]
        owners = serving_pids(server, ports)
    per_worker: dict[int, int] = {}
    for port in ports:
        per_worker[owners[port]] = per_worker.get(owners[port], 0) + 1
    return responses, per_worker


def hits_from_every_worker(server: Server, workers: set[int]) -> dict[int, list[str]]:
    """Sequential requests on fresh connections until each worker answered 3; their X-Cache."""
    seen: dict[int, list[str]] = {pid: [] for pid in workers}
    for _ in range(80):
        response, pid = get_fresh(server, f"/api/five?{QUERY}")
        assert response.status_code == 200
        seen[pid].append(response.headers["x-cache"])
        if sum(map(len, seen.values())) >= 10 and all(len(v) >= 3 for v in seen.values()):
            break
    return seen
