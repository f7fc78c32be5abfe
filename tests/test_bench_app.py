"""`aggregator bench --app`: a developer's own views as targets, how their servers start, what is
refused, and one short real run that writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.bench.plan import (
    PlanError,
    Target,
    Workload,
    default_app_targets,
    on_paths,
    parse_target,
)
from aggregator.bench.report import OUTPUT_FILES
from aggregator.bench.servers import check_app, passed_settings, server_command, server_env
from aggregator.ops import cli
from tests.support.paths import ROOT

APP = "tests.support.own_app:app"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("loop", Target("loop", "app")),
        ("loop:app", Target("loop", "app")),
        ("threads:app:httpx+asyncio", Target("threads", "app", "httpx", event_loop="asyncio")),
        ("serial+pygc", Target("serial", "app", gc="python")),
        ("gunicorn:app", Target("gunicorn", "app")),
        ("loop:app+metrics", Target("loop", "app", metrics=True)),
    ],
)
def test_app_targets_parse_and_name_their_server(spec: str, expected: Target) -> None:
    target = parse_target(spec, app=True)
    assert target == expected
    assert parse_target(target.server_name, app=True) == target


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("loop:sync", "with --app the views are yours; write SERVER:app"),
        ("loop:async", "('async' is one of ours)"),
        ("fastapi:app", "the FastAPI reference runs our fan-out, not your app"),
        ("loop+cached", "+cached caches our bench aggregate"),
        ("gunicorn+asyncio", "gunicorn's threads have no event loop to choose"),
        ("gunicorn:app:httpx", "gunicorn takes no engine"),
        ("loop:app:curl", "engine must be one of"),
    ],
)
def test_targets_that_measure_our_code_are_refused_for_an_app(spec: str, reason: str) -> None:
    with pytest.raises(PlanError, match="target") as caught:
        parse_target(spec, app=True)
    assert str(caught.value).startswith(f"target {spec!r}: ") and reason in str(caught.value)


def test_app_targets_need_an_app() -> None:
    with pytest.raises(PlanError, match="add --app"):
        parse_target("loop:app")


def test_each_path_is_a_series_of_its_own_on_one_server() -> None:
    targets = on_paths(
        tuple(parse_target(s, app=True) for s in default_app_targets()), ("/a?x=1", "/b")
    )
    names = [t.name for t in targets]
    assert names[:2] == ["loop:app /a?x=1", "loop:app /b"] and names[-1] == "gunicorn:app /b"
    assert {t.server_name for t in targets[:2]} == {"loop:app"}
    assert [t.path for t in targets[:2]] == ["/a?x=1", "/b"]
    assert "gunicorn:app" in default_app_targets()
    assert Workload().ideal_rps(16, targets[0]) is None  # what their views wait is theirs


def test_app_servers_start_the_way_serve_app_does(tmp_path: Path) -> None:
    toml = tmp_path / "h.toml"
    threads = parse_target("threads+asyncio", app=True)
    command = server_command(threads, 8123, 16, app=APP, toml=toml)
    assert command[1:] == [
        "-m",
        "aggregator",
        "serve",
        f"--app={APP}",
        "--bind=127.0.0.1:8123",
        "--workers=1",
        "--mode=threads",
        f"--hypercorn-config={toml}",
    ]
    gunicorn = server_command(parse_target("gunicorn", app=True), 8123, 16, app=APP)
    assert gunicorn[-1] == "aggregator.serving.appref:wsgi_app_from_env()"
    assert "--threads=16" in gunicorn


def test_app_servers_are_told_where_the_demo_is_and_keep_the_callers_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AGGREGATOR_CONFIG", "/theirs/sources.toml")
    monkeypatch.setenv("AGGREGATOR_DEMO_URL", "http://elsewhere:1")
    ours = tmp_path / "bench.toml"
    env = server_env(
        parse_target("loop", app=True), ours, 8, app=APP, demo_url="http://127.0.0.1:9"
    )
    assert env["AGGREGATOR_DEMO_URL"] == "http://127.0.0.1:9"
    assert env["AGGREGATOR_APP"] == APP
    assert env["AGGREGATOR_CONFIG"] == "/theirs/sources.toml"  # not the bench's own config
    assert env["AGGREGATOR_MODE"] == "loop"
    builtin = server_env(parse_target("loop:async"), ours, 8)
    assert builtin["AGGREGATOR_CONFIG"] == str(ours) and "AGGREGATOR_APP" not in builtin


def test_an_app_is_checked_in_a_process_of_its_own() -> None:
    assert check_app(APP) is None
    assert check_app("tests.support.own_app:nope") == (
        "module 'tests.support.own_app' has no attribute 'nope'"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--path", "/a"], "--path is a path of your own app: add --app"),
        (["--app", APP], "give the paths to load with --path"),
        (["--app", APP, "--path", "a b"], "expected /path?query, no spaces"),
        (["--app", APP, "--path", "/a", "-t", "loop:sync"], "with --app the views are yours"),
        (["--app", APP, "--path", "/a", "-t", "fastapi:async"], "FastAPI reference"),
        (["--app", APP, "--path", "/a", "-t", "loop+cached"], "+cached caches our bench"),
        (["-t", "loop:app"], "add --app"),
        (["--app", "tests.support.own_app:NOT_AN_APP", "--path", "/a"], "not a Flask app"),
    ],
)
def test_bad_app_flags_exit_2_before_anything_starts(runner, monkeypatch, args, message):
    def fail(*_: object, **__: object) -> None:
        raise AssertionError("nothing may start on bad flags")

    monkeypatch.setattr("aggregator.bench.runner.run_bench", fail)
    result = runner.invoke(cli.main, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.integration
def test_a_short_bench_of_an_apps_own_views_writes_its_report(tmp_path: Path) -> None:
    # Two servers (our loop mode, gunicorn on their WSGI app) x three paths at c=2, one rep of
    # 0.5 s each: about 10 s. /calls makes one call to the demo, found at AGGREGATOR_DEMO_URL.
    out = tmp_path / "out"
    paths = ("/async?delay=0.05", "/sync?delay=0.05", "/calls")
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator", "bench", "--app", APP]
        + [arg for path in paths for arg in ("--path", path)]
        + ["-t", "loop:app", "-t", "gunicorn:app", "-c", "2", "-d", "0.5", "-r", "1"]
        + ["--warmup", "0", "-k", "1", "--latency", "0.02", "--tool", "builtin"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,  # where `tests.support.own_app` imports from, as for `serve --app`
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    expected = [f"{server}:app {path}" for server in ("loop", "gunicorn") for path in paths]
    assert data["options"]["targets"] == expected and data["options"]["app"] == APP
    rows = {r["target"]: r for r in data["summary"]}
    assert set(rows) == set(expected)
    assert all(r["errors"] == 0 and r["ideal_rps"] is None for r in rows.values()), rows
    for server in ("loop", "gunicorn"):
        assert 40 < rows[f"{server}:app /async?delay=0.05"]["p50_ms"] < 200, rows
        calls = rows[f"{server}:app /calls"]["upstream_calls_per_request"]
        assert 0.5 < calls < 1.5, rows  # their view reached the bench's demo
    report = (out / "report.md").read_text()
    assert all(f"| {name} | 2 |" in report for name in expected)
    assert "Theoretical ideal: none" in report
    assert "/sync?delay=0.05 at c=2: loop:app" in proc.stdout


def test_an_apps_cache_type_is_its_own_and_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGGREGATOR_CACHE_TYPE", "null")
    target = parse_target("loop:app", app=True)

    ours = server_env(target, Path("bench.toml"), 8)
    theirs = server_env(target, Path("bench.toml"), 8, app="myapp:app")

    assert ours["AGGREGATOR_CACHE_TYPE"] == "simple"  # our targets: the bench decides
    assert theirs["AGGREGATOR_CACHE_TYPE"] == "null"  # their app: what they set
    assert passed_settings(app=True)["AGGREGATOR_CACHE_TYPE"] == "null"
    assert "AGGREGATOR_CACHE_TYPE" not in passed_settings()
