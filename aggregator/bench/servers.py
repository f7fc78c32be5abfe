"""Start each server under test in its own process tree, and watch its CPU and memory.

Every server gets the same generated config, one worker process, a 2048-connection backlog,
5 s keep-alive and no access log, so the differences measured are the serving stacks'.
CPU and RSS are read with psutil over the whole process tree (Hypercorn and gunicorn fork a
worker); RSS is sampled every 50 ms during a run and the peak kept.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import psutil

from aggregator.bench.plan import Target
from aggregator.demo.process import free_port
from aggregator.settings import Settings

BACKLOG = "2048"
KEEP_ALIVE = "5"


def default_worker_class() -> str:
    """What `aggregator serve` runs on when hypercorn.toml does not say: uvloop if installed."""
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def server_command(target: Target, port: int, threads: int) -> list[str]:
    """The command line that serves `target` on 127.0.0.1:`port`."""
    py = [sys.executable, "-m"]
    if target.server == "gunicorn":
        return py + [
            "gunicorn",
            "--worker-class=gthread",
            "--workers=1",
            f"--threads={threads}",
            f"--bind=127.0.0.1:{port}",
            f"--backlog={BACKLOG}",
            f"--keep-alive={KEEP_ALIVE}",
            "--log-level=warning",
            "aggregator:create_app()",
        ]
    if target.server == "fastapi":
        return py + [
            "uvicorn",
            "aggregator.bench.fastapi_app:app",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--backlog={BACKLOG}",
            f"--timeout-keep-alive={KEEP_ALIVE}",
            "--no-access-log",
            "--log-level=warning",
            f"--loop={target.event_loop or 'auto'}",
        ]
    return py + [
        "hypercorn",
        f"--bind=127.0.0.1:{port}",
        "--workers=1",
        f"--backlog={BACKLOG}",
        f"--keep-alive={KEEP_ALIVE}",
        f"--worker-class={target.event_loop or default_worker_class()}",
        "aggregator.ops.serve:worker_app()",
    ]


#: Settings the bench decides for every target; other AGGREGATOR_* variables in the caller's
#: environment (pool sizes, timeouts, ...) reach every server alike and go into the report.
CONTROLLED = frozenset(
    "AGGREGATOR_" + name
    for name in (
        "CONFIG",
        "MODE",
        "ENGINE",
        "CACHE_TYPE",
        "WORKERS",
        "THREADS",
        "LOG_LEVEL",
        "GC_THRESHOLD",
        "METRICS",
    )
)


def passed_settings() -> dict[str, str]:
    """The caller's AGGREGATOR_* settings that every server under test inherits."""
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith("AGGREGATOR_") and k not in CONTROLLED and "TOKEN" not in k
    }


def server_env(target: Target, config: Path, threads: int) -> dict[str, str]:
    """The AGGREGATOR_* settings for `target`: the bench's own, then the caller's others."""
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(
        AGGREGATOR_CONFIG=str(config),
        AGGREGATOR_MODE=target.server if target.server in ("loop", "threads", "serial") else "loop",
        AGGREGATOR_ENGINE=target.engine or "aiohttp",
        AGGREGATOR_CACHE_TYPE="simple",
        AGGREGATOR_WORKERS="1",
        AGGREGATOR_THREADS=str(threads),
        AGGREGATOR_LOG_LEVEL="WARNING",
        # Off unless the target asks: an admin token in the caller's environment must not turn
        # recording on for some runs and not others.
        AGGREGATOR_METRICS="public" if target.metrics else "off",
    )
    # Each server's own GC default unless the target says (see plan: +gc / +pygc).
    gc = target.gc or ("python" if target.server in ("fastapi", "gunicorn") else "tuned")
    tuned = str(Settings.model_fields["gc_threshold"].default)
    env["AGGREGATOR_GC_THRESHOLD"] = tuned if gc == "tuned" else "0"
    return env


class ServerProcess:
    """A server under test: its process, its port, and its resource readings."""

    def __init__(
        self,
        target: Target,
        config: Path,
        log_dir: Path,
        threads: int,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.target = target
        self.port = free_port()
        self.log_path = log_dir / f"{target.name.replace(':', '-').replace('+', '-')}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                server_command(target, self.port, threads),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**server_env(target, config, threads), **(env or {})},
            )
        self._process = psutil.Process(self.popen.pid)

    @property
    def base_url(self) -> str:
        """Where the server listens."""
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for GET /healthz, failing with the server's log when it exits or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                break
            if probe(self.port, "/healthz", 1.0) == 200:
                return
            time.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        state = f"exited with {self.popen.returncode}" if self.popen.poll() is not None else "hung"
        raise RuntimeError(f"{self.target.name} did not become ready ({state}); log:\n{tail}")

    def drain(self, timeout: float) -> bool:
        """Wait until the server answers /healthz promptly again (queued work is done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if probe(self.port, "/healthz", max(0.1, deadline - time.monotonic())) == 200:
                return True
            time.sleep(0.1)
        return False

    def processes(self) -> list[psutil.Process]:
        """The server and its live workers."""
        try:
            return [self._process, *self._process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User plus system CPU of the tree so far."""
        total = 0.0
        for proc in self.processes():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        """Resident memory of the tree now."""
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; only this server's own tree."""
        tree = self.processes()
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for proc in tree[1:]:
            try:
                proc.wait(5)
            except psutil.TimeoutExpired:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


class PeakRss:
    """Samples a server's RSS in a thread for the length of a `with` block."""

    def __init__(self, server: ServerProcess, interval: float = 0.05) -> None:
        self._server = server
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._server.rss_bytes())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRss:
        """Start sampling."""
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop sampling and take one last reading."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._server.rss_bytes())


def probe(port: int, path: str, timeout: float) -> int | None:
    """GET `path` on 127.0.0.1:`port`; the status, or None when nothing answered in time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
