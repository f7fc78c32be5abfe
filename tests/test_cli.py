"""The click commands parse options and call one library function each."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from aggregator.demo.knobs import Knobs
from aggregator.ops import cli
from aggregator.ops import serve as ops_serve


def test_demo_command_passes_its_knobs(runner, monkeypatch):
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr("aggregator.demo.server.run_demo", lambda *a: calls.append(a))
    result = runner.invoke(cli.main, ["demo", "--port", "9123", "--latency", "0.3"])
    assert result.exit_code == 0, result.output
    assert calls == [("127.0.0.1", 9123, Knobs(latency=0.3, jitter=0.0, failure_rate=0.0))]


@pytest.fixture
def free_binds(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` tries its binds before starting; these tests start nothing (whatever holds 8000)."""
    monkeypatch.setattr("aggregator.ops.serve.busy_binds", lambda binds: [])


@pytest.mark.usefixtures("free_binds")
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param([], {"bind": None, "workers": None}, id="no-flags-keep-the-file"),
        pytest.param(
            ["--bind", "127.0.0.1:9001", "-w", "3"],
            {"bind": ["127.0.0.1:9001"], "workers": 3},
            id="flags-override",
        ),
    ],
)
def test_serve_overrides_only_the_flags_given(runner, monkeypatch, config_path, args, expected):
    seen: dict[str, Any] = {}

    def fake_run_server(hypercorn_config: Path, overrides: dict[str, Any], **_: Any) -> int:
        seen.update(overrides)
        return 0

    monkeypatch.setattr("aggregator.ops.serve.run_server", fake_run_server)
    result = runner.invoke(cli.main, ["serve", "--config", str(config_path), *args])
    assert result.exit_code == 0, result.output
    assert seen == expected


@pytest.mark.usefixtures("free_binds")
def test_serve_exports_settings_for_the_worker_processes(runner, monkeypatch, config_path):
    monkeypatch.setattr("aggregator.ops.serve.run_server", lambda *_, **__: 0)
    result = runner.invoke(
        cli.main, ["serve", "--config", str(config_path), "--mode", "threads", "--engine", "httpx"]
    )
    assert result.exit_code == 0, result.output
    assert os.environ["AGGREGATOR_CONFIG"] == str(config_path)
    assert os.environ["AGGREGATOR_MODE"] == "threads"
    assert os.environ["AGGREGATOR_ENGINE"] == "httpx"


def test_run_server_applies_overrides_to_the_hypercorn_file(monkeypatch, tmp_path):
    monkeypatch.setenv("AGGREGATOR_CACHE_TYPE", "filesystem")
    toml = tmp_path / "h.toml"
    toml.write_text('bind = ["127.0.0.1:7000"]\nworkers = 2\naccesslog = "-"\n')
    seen: list[Any] = []

    def fake_run(config: Any) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr("hypercorn.run.run", fake_run)
    assert ops_serve.run_server(toml, {"bind": None, "workers": 4}) == 0
    (config,) = seen
    assert config.bind == ["127.0.0.1:7000"]  # not given: the file's value
    assert config.workers == 4  # given: the flag wins
    assert config.application_path == "aggregator.ops.serve:worker_app()"
    assert os.environ["AGGREGATOR_WORKERS"] == "4"  # the workers' settings see the count


@pytest.mark.parametrize(
    ("bind", "dashboard", "line"),
    [
        ("127.0.0.1:7000", "on", "live dashboard: open http://127.0.0.1:7000/"),
        ("0.0.0.0:8000", "on", "live dashboard: open http://127.0.0.1:8000/"),
        ("127.0.0.1:7000", "off", None),
    ],
    ids=["loopback", "wildcard-host", "dashboard-off"],
)
def test_run_server_says_where_the_dashboard_is(
    monkeypatch, tmp_path, capsys, bind, dashboard, line
):
    monkeypatch.setenv("AGGREGATOR_DASHBOARD", dashboard)
    monkeypatch.setattr("hypercorn.run.run", lambda config: 0)
    toml = tmp_path / "h.toml"
    toml.write_text(f'bind = ["{bind}"]\n')
    assert ops_serve.run_server(toml, {"bind": None, "workers": None}) == 0
    dashboard_lines = [x for x in capsys.readouterr().out.splitlines() if "dashboard" in x]
    assert dashboard_lines == ([line] if line else [])


def test_run_server_refuses_a_per_process_cache_with_several_workers(monkeypatch, tmp_path):
    monkeypatch.setattr("hypercorn.run.run", lambda config: pytest.fail("must not start"))
    toml = tmp_path / "h.toml"
    toml.write_text("workers = 2\n")
    assert ops_serve.run_server(toml, {"bind": None, "workers": None}) == 1


def _options(
    command: click.Command, path: tuple[str, ...] = ("aggregator",)
) -> Iterator[tuple[str, click.Option]]:
    for param in command.params:
        if isinstance(param, click.Option):
            yield " ".join(path), param
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, (*path, name))


def test_every_option_of_every_command_has_help_text():
    missing = [
        f"{where} {'/'.join(option.opts)}"
        for where, option in _options(cli.main)
        if not option.hidden and not (option.help or "").strip()
    ]
    assert missing == []


def test_version_prints_the_package_version(runner):
    result = runner.invoke(cli.main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"aggregator {importlib.metadata.version('aggregator')}\n"
