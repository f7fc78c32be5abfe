"""Run the demo upstreams in a child process, so tests and benchmarks get a real separate server."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a currently unused TCP port, so parallel runs do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class DemoProcess:
    """A running demo server child process; stop it, or use it as a context manager."""

    def __init__(
        self, popen: subprocess.Popen[bytes], host: str, port: int, log_path: Path, owns_log: bool
    ) -> None:
        self.popen = popen
        self.host = host
        self.port = port
        self.log_path = log_path
        self._owns_log = owns_log

    @property
    def url(self) -> str:
        """Base URL of the demo server, without a trailing slash."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def log_tail(self, limit: int = 4000) -> str:
        """Return the end of the child's output, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        """Terminate the child, escalating to kill, and reap it so no zombie or warning remains."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._owns_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> DemoProcess:
        """Return self, so `with start_demo_process() as demo:` reads naturally."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the child when the block ends."""
        self.stop()


def _healthy(host: str, port: int) -> bool:
    """Probe /healthz directly (no proxies from the environment), returning whether it is ready."""
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        body = response.read()
        return response.status == 200 and json.loads(body) == {"status": "ok"}
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()


def start_demo_process(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    latency: float = 0.1,
    jitter: float = 0.0,
    failure_rate: float = 0.0,
    stall_rate: float = 0.0,
    payload_kb: float = 0.0,
    log_path: Path | None = None,
    timeout: float = 10.0,
) -> DemoProcess:
    """Launch `python -m aggregator.demo` and wait for /healthz, failing loudly with its log."""
    if port == 0:
        port = free_port(host)
    owns_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="aggregator-demo-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-u",
        "-m",
        "aggregator.demo",
        f"--host={host}",
        f"--port={port}",
        f"--latency={latency!r}",
        f"--jitter={jitter!r}",
        f"--failure-rate={failure_rate!r}",
        f"--stall-rate={stall_rate!r}",
        f"--payload-kb={payload_kb!r}",
    ]
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    demo = DemoProcess(popen, host, port, log_path, owns_log)
    deadline = time.monotonic() + timeout
    while True:
        if popen.poll() is not None:
            problem = f"exited with code {popen.returncode}"
        elif _healthy(host, port):
            return demo
        elif time.monotonic() > deadline:
            problem = f"did not answer GET /healthz within {timeout:g}s"
        else:
            time.sleep(0.05)
            continue
        tail = demo.log_tail()
        demo.stop()
        raise RuntimeError(f"demo upstreams on {demo.url} {problem}; log tail:\n{tail}")
