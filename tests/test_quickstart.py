"""The Quick start's journeys, driven with exactly the commands README gives, over the wire.

`aggregator serve` on the demo defaults (no config, no AGGREGATOR_CACHE_TYPE), then from "another
shell": the dashboard, `aggregator warm --all`, an X-Cache HIT, `aggregator cache purge
dashboard`, `aggregator status` and `/metrics` with the admin token serve printed. The only
departures from README: a free port for the server and for the demo upstreams, and a private
TMPDIR (where the demo defaults keep their per-user cache), so the test disturbs nothing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from aggregator.demo.process import free_port
from tests.support.paths import ROOT
from tests.support.servers import wait_healthy

pytestmark = pytest.mark.integration

DASHBOARD = "/api/dashboard?city=Paris&user_id=7"


def _shell(tmp_path: Path, demo_port: int, **extra: str) -> dict[str, str]:
    """A newcomer's shell: no AGGREGATOR_* setting, only the test's isolation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["TMPDIR"] = str(tmp_path)
    env["AGGREGATOR_DEMO_URL"] = f"http://127.0.0.1:{demo_port}"
    env.update(extra)
    return env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aggregator", *args],
        env=env,
        cwd=env["TMPDIR"],  # any directory: not the repository
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_quick_start_shows_every_journey(tmp_path: Path) -> None:
    port, demo_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    left = tmp_path / f"aggregator-demo-{os.getuid()}" / "cache" / "left-by-an-earlier-run"
    left.parent.mkdir(parents=True)
    left.write_text("x")
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "serve", "--bind", f"127.0.0.1:{port}"],
            env=_shell(tmp_path, demo_port),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(url, server, log)
        assert not left.exists()  # each run starts cold
        said = log.read_text()
        found = re.search(r"^  export AGGREGATOR_ADMIN_TOKEN=(\S+)$", said, re.MULTILINE)
        assert found, said
        token = found.group(1)
        other = _shell(tmp_path, demo_port)  # another shell, before the export
        exported = _shell(tmp_path, demo_port, AGGREGATOR_ADMIN_TOKEN=token)
        with httpx.Client(base_url=url, trust_env=False, timeout=10) as http:
            # the dashboard
            assert f"live dashboard: open {url}/" in said
            page = http.get("/")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]

            # warming: the README's `aggregator warm --all`, then the entry is a hit
            warmed = _run(other, "warm", "--all")
            assert warmed.returncode == 0, warmed.stdout + warmed.stderr
            assert "1 warmed" in warmed.stdout
            hit = http.get(DASHBOARD)
            assert hit.status_code == 200 and hit.headers["X-Cache"] == "HIT", hit.headers

            # purging: `aggregator cache purge dashboard`, then it is filled again
            purged = _run(other, "cache", "purge", "dashboard")
            assert purged.returncode == 0, purged.stdout + purged.stderr
            time.sleep(1.2)  # the server's near copy lasts AGGREGATOR_CACHE_LOCAL_TTL (1 s)
            assert http.get(DASHBOARD).headers["X-Cache"] == "MISS"
            assert http.get(DASHBOARD).headers["X-Cache"] == "HIT"

            # status and metrics, with the token serve printed (and without it: refused)
            status = _run(exported, "status", "--url", url)
            assert status.returncode == 0, status.stdout + status.stderr
            assert "dashboard" in status.stdout and "weather" in status.stdout
            assert _run(other, "status", "--url", url).returncode == 1  # no token: 401
            metrics = http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert metrics.status_code == 200
            assert 'aggregator_cache_results_total{aggregate="dashboard",result="hit"}' in (
                metrics.text
            )
            assert http.get("/metrics").status_code == 401  # never public by default
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
    assert "Traceback" not in log.read_text()


def test_readme_gives_these_commands() -> None:
    # What the journey above runs is what the Quick start tells a newcomer to type.
    readme = (ROOT / "README.md").read_text()
    for command in (
        ".venv/bin/aggregator serve",
        ".venv/bin/aggregator warm --all && curl -si "
        "'http://127.0.0.1:8000/api/dashboard?city=Paris&user_id=7' | grep -i x-cache",
        ".venv/bin/aggregator cache purge dashboard",
        ".venv/bin/aggregator status --url http://127.0.0.1:8000",
        'curl -H "Authorization: Bearer $AGGREGATOR_ADMIN_TOKEN" http://127.0.0.1:8000/metrics',
        "export AGGREGATOR_ADMIN_TOKEN=",
    ):
        assert command in readme, command


def test_a_config_or_a_cache_type_of_ones_own_changes_nothing(tmp_path: Path) -> None:
    # The demo defaults are for the Quick start only: given a cache type, warm refuses the
    # per-process cache as before, and makes no demo cache directory.
    env = _shell(tmp_path, free_port(), AGGREGATOR_CACHE_TYPE="simple")
    refused = _run(env, "warm", "--all")
    assert refused.returncode == 2 and "not warmable" in refused.stderr
    assert not list(tmp_path.glob("aggregator-demo-*"))
