"""The `aggregator` command's refusals, as an operator meets them: one line and an exit code.

Unusable AGGREGATOR_* variables (named with their value and what is allowed, exit 2) for every
command that reads the settings, a port another process holds (before anything is printed or
started), and the Hypercorn settings that do not depend on the working directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.demo.process import free_port
from aggregator.ops import serve as ops_serve
from tests.support.paths import ROOT


def _aggregator(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    return subprocess.run(
        [sys.executable, "-m", "aggregator", *args],
        env={**clean, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_DEMO_CONFIG = str(ROOT / "aggregator" / "demo" / "config.toml")


@pytest.mark.parametrize(
    ("args", "variable", "value", "allowed"),
    [
        (["serve"], "CACHE_TYPE", "memcached", "expected one of simple, filesystem, redis"),
        (["serve"], "MODE", "fast", "expected one of loop, threads, serial"),
        (["serve"], "THREADS", "lots", "expected an integer >= 1"),
        (["check-config", _DEMO_CONFIG], "CACHE_TIMEOUT", "-1", "expected a number > 0"),
        (["warm", "--all"], "THREADS", "0", "expected an integer >= 1"),
        (["warm", "--all", "--dry-run"], "DASHBOARD", "maybe", "expected true or false"),
        (["cache", "purge", "dashboard"], "CACHE_TYPE", "memcached", "expected one of simple"),
        (["bench", "-t", "loop:async", "-d", "1"], "MODE", "fast", "expected one of loop"),
        (["serve"], "METRICS_BIND", "9100", "is not host:port"),
        (["soak", "-d", "5"], "CACHE_TYPE", "memcached", "expected one of simple"),
        (["serve", "--app", "tests.support.own_app:app"], "MODE", "fast", "expected one of"),
    ],
)
def test_an_unusable_variable_is_one_line_naming_it_its_value_and_what_is_allowed(
    args: list[str], variable: str, value: str, allowed: str
) -> None:
    proc = _aggregator(*args, env={f"AGGREGATOR_{variable}": value})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""  # nothing started, nothing announced
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"aggregator: AGGREGATOR_{variable}={value!r}: ")
    assert allowed in lines[0]
    assert "pydantic" not in lines[0]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another process (this one) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_serve_on_a_busy_port_says_so_in_one_line_before_serving(held_port: int) -> None:
    env = {"AGGREGATOR_DEMO_URL": f"http://127.0.0.1:{free_port()}"}  # no demo reused
    proc = _aggregator("serve", "--bind", f"127.0.0.1:{held_port}", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""  # no "serving on", no dashboard line, no demo started
    assert proc.stderr.splitlines() == [
        f"aggregator serve: cannot listen on 127.0.0.1:{held_port}: Address already in use"
    ]


def test_serve_says_so_in_one_line_when_something_else_holds_the_demo_port(
    held_port: int,
) -> None:
    env = {"AGGREGATOR_DEMO_URL": f"http://127.0.0.1:{held_port}"}  # answers no /healthz
    proc = _aggregator("serve", "--bind", f"127.0.0.1:{free_port()}", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"aggregator serve: cannot start the demo services on 127.0.0.1:{held_port}: Address "
        "already in use (set AGGREGATOR_DEMO_URL to another port, or give a --config)"
    ]


def test_demo_on_a_busy_port_says_so_in_one_line(held_port: int) -> None:
    proc = _aggregator("demo", "--port", str(held_port))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"aggregator demo: cannot listen on 127.0.0.1:{held_port}: Address already in use"
    ]


def test_check_config_says_the_same_from_any_directory(tmp_path: Path) -> None:
    config = tmp_path / "slow.toml"
    config.write_text(
        '[upstreams.u]\nurl = "http://127.0.0.1:9/u"\n'
        '[aggregates.slow]\npath = "/api/slow"\nsources = ["u"]\ndeadline = 12\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    from_repo = _aggregator("check-config", str(config), cwd=ROOT)
    from_tmp = _aggregator("check-config", str(config), cwd=elsewhere)
    assert from_repo.returncode == from_tmp.returncode == 0, from_tmp.stderr
    assert (from_repo.stdout, from_repo.stderr) == (from_tmp.stdout, from_tmp.stderr)
    assert "graceful_timeout of 10 s" in from_tmp.stderr  # the packaged settings', not 3 s


def test_serve_applies_the_packaged_hypercorn_settings_from_any_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no hypercorn.toml here
    (tmp_path / "hypercorn.toml").write_text("graceful_timeout = 1.0\n")  # and not read
    served = ops_serve.server_config(None, {"bind": None, "workers": None})
    monkeypatch.chdir(ROOT)
    from_repo = ops_serve.server_config(None, {"bind": None, "workers": None})
    for attribute in ("bind", "workers", "graceful_timeout", "keep_alive_timeout", "backlog"):
        assert getattr(served, attribute) == getattr(from_repo, attribute), attribute
    assert served.graceful_timeout == 10.0 and served.bind == ["127.0.0.1:8000"]
