"""Start each server under test in its own process tree, and watch its CPU and memory.

Every server gets the same generated config, one worker process, a 2048-connection backlog and
5 s keep-alive. Our servers run with the shipped settings (INFO logging with one access line per
request, metrics as shipped) unless the target's flags say otherwise (`+quiet`, `+metrics`,
`+nometrics`: plan); their logs go to the bench's log files, as a deployment writes them
somewhere. The FastAPI targets run uvicorn without its access log, as the best-tuned peers do.
The plain FastAPI peer (`fastapi_plain`) reads its upstreams from `PLAIN_UPSTREAMS` (`peer_env`).
CPU and RSS are read with psutil over the whole process tree (Hypercorn and gunicorn fork a
worker); RSS is sampled every 50 ms during a run and the peak kept.

A developer's own app (`bench --app`) is started as `aggregator serve --app` starts it (that very
command line, the same three server settings in a Hypercorn file of its own) or, for gunicorn,
as its WSGI app itself; their app is told where the demo upstreams are by AGGREGATOR_DEMO_URL
(the variable our demo config reads too), and gets the caller's AGGREGATOR_CONFIG, if any.
Their app need not have a /healthz: any answer there means the server is up.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
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


def hypercorn_toml(target: Target) -> str:
    """The Hypercorn settings `aggregator serve --app` gets: those every Hypercorn target has."""
    return (
        f"backlog = {BACKLOG}\nkeep_alive_timeout = {KEEP_ALIVE}\n"
        f'worker_class = "{target.event_loop or default_worker_class()}"\n'
    )


def server_command(
    target: Target, port: int, threads: int, *, app: str | None = None, toml: Path | None = None
) -> list[str]:
    """The command line that serves `target` on 127.0.0.1:`port`.

    `app`: the developer's app (`--app`) of a `SERVER:app` target; `toml`, the file holding
    `hypercorn_toml(target)` that `aggregator serve --app` reads.
    """
    py = [sys.executable, "-m"]
    if target.view == "app" and target.server != "gunicorn":
        assert app is not None and toml is not None
        return py + [
            "aggregator",
            "serve",
            f"--app={app}",
            f"--bind=127.0.0.1:{port}",
            "--workers=1",
            f"--mode={target.server}",
            f"--hypercorn-config={toml}",
        ]
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
            "aggregator.serving.appref:wsgi_app_from_env()"
            if target.view == "app"
            else "aggregator:create_app()",
        ]
    if target.server in ("fastapi", "fastapi-plain"):
        module = "fastapi_app" if target.server == "fastapi" else "fastapi_plain"
        if target.hypercorn:  # Hypercorn's own access log is off unless configured
            return py + _hypercorn(target, port, f"aggregator.bench.{module}:app")
        return py + [
            "uvicorn",
            f"aggregator.bench.{module}:app",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--backlog={BACKLOG}",
            f"--timeout-keep-alive={KEEP_ALIVE}",
            "--no-access-log",
            "--log-level=warning",
            f"--loop={target.event_loop or 'auto'}",
        ]
    return py + _hypercorn(target, port, "aggregator.ops.serve:worker_app()")


def _hypercorn(target: Target, port: int, app: str) -> list[str]:
    """One Hypercorn worker with the bench's socket settings, ours and the `+hypercorn` peer's."""
    return [
        "hypercorn",
        f"--bind=127.0.0.1:{port}",
        "--workers=1",
        f"--backlog={BACKLOG}",
        f"--keep-alive={KEEP_ALIVE}",
        f"--worker-class={target.event_loop or default_worker_class()}",
        app,
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
        "ADMIN_TOKEN",
        "APP",
        "DEMO_URL",
        "HTTP1_PARSER",
    )
)


#: Of `CONTROLLED`, what a developer's app (`--app`) takes from the caller when set: its cache
#: is part of what their views do (e.g. AGGREGATOR_CACHE_TYPE=null to bench the fills).
APP_PASSED = frozenset({"AGGREGATOR_CACHE_TYPE"})


def passed_settings(*, app: bool = False) -> dict[str, str]:
    """The caller's AGGREGATOR_* settings that every server under test inherits."""
    controlled = CONTROLLED - APP_PASSED if app else CONTROLLED
    return {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith("AGGREGATOR_") and k not in controlled and "TOKEN" not in k
    }


def server_env(
    target: Target,
    config: Path,
    threads: int,
    *,
    app: str | None = None,
    demo_url: str | None = None,
) -> dict[str, str]:
    """The AGGREGATOR_* settings for `target`: the bench's own, then the caller's others.

    For a developer's app (`app`): where the demo upstreams are (AGGREGATOR_DEMO_URL) and the
    reference (AGGREGATOR_APP) instead of our bench config; the caller's AGGREGATOR_CONFIG, if
    any, is theirs to read.
    """
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(
        AGGREGATOR_CONFIG=str(config),
        AGGREGATOR_MODE=target.server if target.server in ("loop", "threads", "serial") else "loop",
        AGGREGATOR_ENGINE=target.engine or "aiohttp",
        AGGREGATOR_CACHE_TYPE=_shipped("cache_type"),
        AGGREGATOR_WORKERS="1",
        AGGREGATOR_THREADS=str(threads),
        # As shipped (INFO: one access line per request) unless the target says +quiet.
        AGGREGATOR_LOG_LEVEL="WARNING" if target.quiet else _shipped("log_level"),
        # As shipped unless the target says; the caller's admin token is not passed (it is a
        # CONTROLLED name), so it cannot turn recording on for some runs and not others.
        AGGREGATOR_METRICS=(
            "public" if target.metrics else "off" if target.nometrics else _shipped("metrics")
        ),
        AGGREGATOR_HTTP1_PARSER="h11-mypyc" if target.mypyc else _shipped("http1_parser"),
    )
    # Each server's own GC default unless the target says (see plan: +gc / +pygc).
    gc = target.gc or ("python" if target.server in ("fastapi", "gunicorn") else "tuned")
    tuned = str(Settings.model_fields["gc_threshold"].default)
    env["AGGREGATOR_GC_THRESHOLD"] = tuned if gc == "tuned" else "0"
    if app is not None:
        del env["AGGREGATOR_CONFIG"]
        if "AGGREGATOR_CONFIG" in os.environ:
            env["AGGREGATOR_CONFIG"] = os.environ["AGGREGATOR_CONFIG"]
        env["AGGREGATOR_APP"] = app
        env.update({k: os.environ[k] for k in APP_PASSED if k in os.environ})
        if demo_url is not None:
            env["AGGREGATOR_DEMO_URL"] = demo_url
    return env


def _shipped(field: str) -> str:
    """A setting's shipped default, as the environment spells it."""
    return str(Settings.model_fields[field].default)


def peer_env(target: Target, upstreams: list[tuple[str, str, str]]) -> dict[str, str]:
    """What the plain FastAPI peer is told: its upstreams (name to URL template) and engine.

    Our servers read the bench config instead; nothing of ours is given to the peer.
    """
    if target.server != "fastapi-plain":
        return {}
    return {
        "PLAIN_UPSTREAMS": json.dumps({name: url for name, _, url in upstreams}),
        "PLAIN_ENGINE": target.engine or "aiohttp",
    }


def check_app(app: str) -> str | None:
    """Why `app` (`--app`) cannot be served, or None; checked in a process of its own.

    The bench speaks to what it measures over HTTP only: it never imports the app itself (nor
    runs a factory's side effects in its own process). The check is `serving.appref`'s, run the
    way a server would run it, from this directory.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator.serving.appref", app],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"checking it exited with {proc.returncode}"


class ServerProcess:
    """A server under test: its process, its port, and its resource readings."""

    def __init__(
        self,
        target: Target,
        config: Path,
        log_dir: Path,
        threads: int,
        env: Mapping[str, str] | None = None,
        *,
        app: str | None = None,
        demo_url: str | None = None,
    ) -> None:
        self.target = target
        self.port = free_port()
        stem = target.server_name.replace(":", "-").replace("+", "-")
        self.log_path = log_dir / f"{stem}.log"
        #: A developer's app may have no /healthz: then any answer there says it is up.
        self._any_answer = target.view == "app"
        toml = None
        if target.view == "app":
            toml = log_dir / f"{stem}.hypercorn.toml"
            toml.write_text(hypercorn_toml(target))
        settings = server_env(target, config, threads, app=app, demo_url=demo_url)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                server_command(target, self.port, threads, app=app, toml=toml),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**settings, **(env or {})},
            )
        self._process = psutil.Process(self.popen.pid)

    @property
    def base_url(self) -> str:
        """Where the server listens."""
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for GET /healthz, failing with the server's log when it exits or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                break
            if self._answers(probe(self.port, "/healthz", 1.0)):
                self._check_parser()
                return
            time.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        state = f"exited with {self.popen.returncode}" if self.popen.poll() is not None else "hung"
        raise RuntimeError(
            f"{self.target.server_name} did not become ready ({state}); log:\n{tail}"
        )

    def _check_parser(self) -> None:
        """A `+mypyc` target whose worker fell back to stock h11 would be mislabelled: refuse
        it (our app says in /status; a developer's app leaves the fallback line in the log)."""
        if not self.target.mypyc:
            return
        if self.target.view == "app":
            used = "h11" if "serving with h11" in self.log_path.read_text(errors="replace") else ""
        else:
            used = str(_get_json(self.port, "/status").get("http1_parser", "h11"))
        if used == "h11":
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{self.target.server_name}: Hypercorn parses with stock h11, not h11-mypyc; "
                f"log:\n{tail}"
            )

    def drain(self, timeout: float) -> bool:
        """Wait until the server answers /healthz promptly again (queued work is done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._answers(probe(self.port, "/healthz", max(0.1, deadline - time.monotonic()))):
                return True
            time.sleep(0.1)
        return False

    def _answers(self, status: int | None) -> bool:
        return status == 200 or (self._any_answer and status is not None)

    def processes(self) -> list[psutil.Process]:
        """The server and its live workers."""
        try:
            return [self._process, *self._process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User plus system CPU of the tree so far."""
        return cpu_seconds(self.processes())

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


def _get_json(port: int, path: str) -> dict[str, object]:
    """GET `path` on 127.0.0.1:`port` as a JSON object ({} when it is not one)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        conn.request("GET", path)
        data = json.loads(conn.getresponse().read())
    except (OSError, http.client.HTTPException, ValueError):
        return {}
    finally:
        conn.close()
    return data if isinstance(data, dict) else {}


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User plus system CPU of `processes` so far (those that have exited count nothing)."""
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total
