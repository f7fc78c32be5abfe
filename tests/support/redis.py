"""Redis for the tests: a private `redis-server` to kill and pause, Sentinel and Cluster nodes,
and key prefixes of a test's own on the shared Redis (127.0.0.1:6379, which `.ci/run` makes sure
answers)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aggregator.demo.process import free_port

SHARED_REDIS = ("127.0.0.1", 6379)
SHARED_REDIS_URL = f"redis://{SHARED_REDIS[0]}:{SHARED_REDIS[1]}/0"


def new_prefix() -> str:
    """A key prefix no other test uses."""
    return f"test-{uuid.uuid4().hex}:"


@contextlib.contextmanager
def shared_prefix() -> Iterator[str]:
    """A key prefix of the caller's own on the shared Redis; its keys are deleted afterwards."""
    prefix = new_prefix()
    host, port = SHARED_REDIS
    client = redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        pytest.fail(f"no Redis answers on {host}:{port} ({exc!r}); .ci/run starts one")
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


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


def redis_settings(server: PrivateRedis, **settings: Any) -> dict[str, Any]:
    """Settings for a Redis cache on `server`, under a prefix of the test's own."""
    base = {"cache_type": "redis", "cache_redis_url": server.url, "cache_key_prefix": new_prefix()}
    return base | settings


# -- Sentinel and Cluster nodes ------------------------------------------------------------------


def start_redis_server(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """`redis-server ARGS` (a node or a sentinel), once it answers PING on `port`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(["redis-server", *args], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port, socket_timeout=0.5).ping():
                return proc
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server on {port} did not start:\n{log.read_text()}")


def stop_processes(*procs: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill what does not exit within 5 s."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, so at most 55535."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")
