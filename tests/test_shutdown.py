"""Graceful shutdown: SIGTERM lets fan-outs in flight finish, refuses new connections, exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypercorn.config import Config

from aggregator.config import AggregateConfig, load_config
from aggregator.demo.process import DemoProcess, free_port
from aggregator.ops import cli
from aggregator.ops import serve as ops_serve
from tests.support.demo import demo_stats, reset_demo
from tests.support.paths import ROOT
from tests.support.servers import wait_healthy

SHIPPED = Config.from_toml(ROOT / "hypercorn.toml")


def _fan_out_config(demo_url: str, *, delay: float, deadline: float) -> str:
    """Three required sources of `delay` seconds each, under `deadline`."""
    services = {"weather": "/weather/{city}", "stocks": "/stocks/7", "profile": "/profile/7"}
    lines = []
    for name, path in services.items():
        lines += [
            f"[upstreams.{name}]",
            f'url = "{demo_url}{path}?delay={delay}"',
            f"timeout = {deadline}",
            "",
        ]
    lines += [
        "[aggregates.slow]",
        'path = "/api/slow"',
        f"sources = {list(services)!r}".replace("'", '"'),
        f"required = {list(services)!r}".replace("'", '"'),
        f"deadline = {deadline}",
        'params = { city = "str" }',
    ]
    return "\n".join(lines) + "\n"


# -- configuration checks -------------------------------------------------------------------


def test_shipped_graceful_timeout_covers_the_default_and_bundled_deadlines():
    bundled = load_config(None)
    longest = max(agg.deadline for agg in bundled.aggregates.values())
    default = AggregateConfig.model_fields["deadline"].default
    assert SHIPPED.graceful_timeout >= max(longest, default)
    assert SHIPPED.workers == 0  # one worker in Hypercorn's own process: see hypercorn.toml


def test_run_server_warns_when_a_deadline_outlasts_graceful_timeout(monkeypatch, tmp_path, capsys):
    config = tmp_path / "agg.toml"
    config.write_text(_fan_out_config("http://127.0.0.1:9", delay=0, deadline=4))
    toml = tmp_path / "h.toml"
    toml.write_text("graceful_timeout = 1.5\n")
    monkeypatch.setenv("AGGREGATOR_CONFIG", str(config))
    monkeypatch.setattr("hypercorn.run.run", lambda config: 0)
    assert ops_serve.run_server(toml, {"bind": None, "workers": None}) == 0
    err = capsys.readouterr().err
    assert "warning: aggregate 'slow' has a deadline of 4 s, longer than Hypercorn's " in err
    assert "graceful_timeout of 1.5 s" in err


def test_run_server_is_quiet_when_graceful_timeout_covers_every_deadline(
    monkeypatch, tmp_path, capsys
):
    config = tmp_path / "agg.toml"
    config.write_text(_fan_out_config("http://127.0.0.1:9", delay=0, deadline=4))
    monkeypatch.setenv("AGGREGATOR_CONFIG", str(config))
    monkeypatch.setattr("hypercorn.run.run", lambda config: 0)
    assert ops_serve.run_server(ROOT / "hypercorn.toml", {"bind": None, "workers": None}) == 0
    assert "warning" not in capsys.readouterr().err


def test_check_config_warns_but_passes(runner, tmp_path):
    config = tmp_path / "agg.toml"
    config.write_text(_fan_out_config("http://127.0.0.1:9", delay=0, deadline=4))
    toml = tmp_path / "h.toml"
    toml.write_text("graceful_timeout = 2.0\n")
    result = runner.invoke(cli.main, ["check-config", str(config), "--hypercorn-config", str(toml)])
    assert result.exit_code == 0, result.output
    assert "deadline of 4 s, longer than Hypercorn's graceful_timeout of 2 s" in result.stderr
    assert "ok (3 upstreams, 1 aggregates" in result.stdout


@pytest.mark.parametrize(
    ("toml", "flag", "hypercorn_workers", "env_workers"),
    [
        pytest.param("workers = 0\n", None, 0, "1", id="file-0-in-process"),
        pytest.param("workers = 1\n", None, 0, "1", id="file-1-in-process"),
        pytest.param("workers = 0\n", 1, 0, "1", id="flag-1-in-process"),
        pytest.param("workers = 1\n", 3, 3, "3", id="flag-3-supervised"),
    ],
)
def test_one_worker_is_served_in_process(
    monkeypatch, tmp_path, toml, flag, hypercorn_workers, env_workers
):
    monkeypatch.setenv("AGGREGATOR_CACHE_TYPE", "filesystem")
    path = tmp_path / "h.toml"
    path.write_text(toml)
    seen: list[Any] = []

    def fake_run(config: Any) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr("hypercorn.run.run", fake_run)
    assert ops_serve.run_server(path, {"bind": None, "workers": flag}) == 0
    assert seen[0].workers == hypercorn_workers
    assert os.environ["AGGREGATOR_WORKERS"] == env_workers


# -- real SIGTERM ---------------------------------------------------------------------------


def _start(
    command: str, config: Path, tmp_path: Path, hypercorn_toml: Path | None = None
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start the server the way an operator would; wait until it answers."""
    port = free_port()
    bind = f"127.0.0.1:{port}"
    toml = str(hypercorn_toml or ROOT / "hypercorn.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    env["AGGREGATOR_CONFIG"] = str(config)
    py = [sys.executable, "-m"]
    argv = {
        "serve": py + ["aggregator", "serve", "--bind", bind, "--hypercorn-config", toml],
        "hypercorn": py + ["hypercorn", "-c", toml, "-b", bind, "asgi:app"],
        "hypercorn-supervised": py + ["hypercorn", "-c", toml, "-b", bind, "-w", "1", "asgi:app"],
    }[command]
    log = tmp_path / f"{command}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{bind}"
    try:
        wait_healthy(url, popen, log)
    except RuntimeError:
        popen.kill()
        popen.wait(5)
        raise
    return popen, url, log


async def _in_flight(demo: DemoProcess, calls: int, timeout: float = 10.0) -> None:
    """Wait until `calls` upstream calls reached the demo since its reset: fan-outs under way."""
    deadline = time.monotonic() + timeout
    while demo_stats(demo)["total_requests"] < calls:
        assert time.monotonic() < deadline, "the fan-outs never reached the upstream"
        await asyncio.sleep(0.05)


def _exit_within(popen: subprocess.Popen[bytes], since: float, limit: float) -> float:
    try:
        popen.wait(limit + 5)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait(5)
    return time.perf_counter() - since


@pytest.mark.integration
@pytest.mark.parametrize("command", ["serve", "hypercorn", "hypercorn-supervised"])
async def test_sigterm_lets_in_flight_fan_outs_finish(command, demo, write_config, tmp_path):
    config = write_config(_fan_out_config(demo.url, delay=2.0, deadline=4.0))
    popen, url, log = _start(command, config, tmp_path)
    reset_demo(demo)
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        requests = [
            asyncio.create_task(client.get(f"{url}/api/slow", params={"city": f"c{i}"}))
            for i in range(4)
        ]
        await _in_flight(demo, calls=12)  # 4 requests x 3 sources
        popen.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        await asyncio.sleep(0.3)
        late: BaseException | int
        try:
            probe = await client.get(f"{url}/healthz", timeout=3)  # a new connection: all busy
            late = probe.status_code
        except httpx.TransportError as exc:
            late = exc
        answers = await asyncio.gather(*requests)
    exited = await asyncio.to_thread(_exit_within, popen, signalled, SHIPPED.graceful_timeout + 1)
    seen = f"{command}: exited {exited:.2f} s after SIGTERM; a new connection got {late!r}"
    assert [r.status_code for r in answers] == [200] * 4, seen
    assert all(r.json()["complete"] for r in answers), seen
    assert popen.returncode == 0, seen
    assert exited < SHIPPED.graceful_timeout + 1, seen
    if command == "hypercorn-supervised":
        # The supervisor keeps the listening socket open until its worker exits: the kernel
        # accepts the connection, nobody answers it, and it is reset when the server exits.
        assert isinstance(late, httpx.TransportError)
        assert not isinstance(late, httpx.ConnectError)
    else:
        assert isinstance(late, httpx.ConnectError)  # refused at once
    text = log.read_text()
    assert "upstream client closed" in text  # the lifespan shutdown ran, after the requests
    assert "Traceback" not in text


@pytest.mark.integration
async def test_requests_outlasting_graceful_timeout_are_cut_and_exit_is_bounded(
    demo, write_config, tmp_path
):
    graceful = 1.0
    config = write_config(_fan_out_config(demo.url, delay=4.0, deadline=6.0))
    toml = tmp_path / "h.toml"
    toml.write_text(f'worker_class = "uvloop"\ngraceful_timeout = {graceful}\n')
    popen, url, log = _start("serve", config, tmp_path, hypercorn_toml=toml)
    reset_demo(demo)
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        request = asyncio.create_task(client.get(f"{url}/api/slow", params={"city": "x"}))
        await _in_flight(demo, calls=3)
        popen.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        exited = await asyncio.to_thread(_exit_within, popen, signalled, graceful + 1)
        cut = await request
    seen = f"graceful_timeout {graceful:g} s, a 4 s fan-out in flight: exited {exited:.2f} s"
    assert popen.returncode == 0, seen
    assert exited < graceful + 1, seen
    # Cut, but told so in the one error shape, retryable (not Hypercorn's empty 500).
    assert (cut.status_code, cut.headers["retry-after"]) == (503, "1")
    assert cut.json()["error"] == "Service Unavailable"
    assert "shutting down" in cut.json()["message"]
    text = log.read_text()
    assert "deadline of 6 s, longer than Hypercorn's graceful_timeout of 1 s" in text
    # (Python 3.11's asyncio logs "Exception in callback ... CancelledError" for each connection
    # task Hypercorn cancels at its graceful_timeout: fixed in 3.12, not ours to silence.)
    assert "Error in ASGI" not in text
    assert "/aggregator/" not in text  # no frame of ours in any traceback
