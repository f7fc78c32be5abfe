"""`aggregator warm`: targets validated up front, warmed through a deployment or directly.

Subprocess runs (`python -m aggregator warm ...`) against real Hypercorn servers and the real
demo upstreams prove the two modes end to end; the library's runner (pace, retries, timeouts,
interruption) is tested in-process with fake warmers, and target parsing through the library
functions and `runner.invoke`.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from rich.console import Console

from aggregator import create_app
from aggregator.cache.results import WarmResult
from aggregator.config import parse_config
from aggregator.demo.process import DemoProcess, free_port
from aggregator.errors import NotWarmableError, TargetError
from aggregator.ops import cli
from aggregator.ops.warm.report import Outcome, RichReporter, RunReport, TargetReport
from aggregator.ops.warm.run import WarmRequest
from aggregator.ops.warm.targets import Target, collect_targets, make_target
from aggregator.ops.warm.warmers import HttpWarmer, RunOptions, warm_targets
from aggregator.settings import Settings
from tests.support.demo import demo_stats, reset_demo
from tests.support.paths import ROOT
from tests.support.redis import SHARED_REDIS_URL
from tests.support.servers import get_fresh, start_own_app, wait_for_workers

# The CLI's logging set-up would outlive CliRunner's stderr (conftest.no_log_handlers).
pytestmark = pytest.mark.usefixtures("no_log_handlers")

TOKEN = "warm-admin-token-0123456789abcdef"
CITIES = ["Paris", "Oslo", "Lima", "Tokyo"]


def warm_config(base_url: str, *, delay: float = 0.0, cities: list[str] = CITIES) -> str:
    """`board` (weather + profile) cached 60 s, its warm list one target per city; `broken`
    (its required source answers 503) and `patchy` (an optional one does), both cached."""
    warm = ", ".join(f'{{city = "{c}", user_id = {i + 1}}}' for i, c in enumerate(cities))
    return f"""
[upstreams.weather]
url = "{base_url}/weather/{{city}}?delay={delay}"
timeout = 3.0

[upstreams.profile]
url = "{base_url}/profile/{{user_id}}?delay={delay}"
timeout = 3.0

[upstreams.weather_down]
url = "{base_url}/weather/{{city}}?status=503"
timeout = 3.0

[upstreams.profile_down]
url = "{base_url}/profile/{{user_id}}?status=503"
timeout = 3.0

[aggregates.board]
path = "/api/board"
sources = ["weather", "profile"]
required = ["profile"]
cache_ttl = 60
params = {{ city = "str", user_id = "int", topic = {{ type = "str", default = "general" }} }}
warm = [{warm}]

[aggregates.broken]
path = "/api/broken"
sources = ["weather", "profile_down"]
required = ["profile_down"]
cache_ttl = 60
params = {{ city = "str", user_id = "int" }}

[aggregates.patchy]
path = "/api/patchy"
sources = ["weather_down", "profile"]
required = ["profile"]
cache_ttl = 60
params = {{ city = "str", user_id = "int" }}

[aggregates.live]
path = "/api/live"
sources = ["weather"]
params = {{ city = "str" }}
"""


def query(i: int) -> str:
    return f"city={CITIES[i]}&user_id={i + 1}"


def calls(demo: DemoProcess) -> dict[str, int]:
    requests: dict[str, int] = demo_stats(demo)["requests"]
    return {name: requests[name] for name in ("weather", "profile")}


def run_warm(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m aggregator warm ARGS` with only the AGGREGATOR_* settings given."""
    return subprocess.run(
        [sys.executable, "-m", "aggregator", "warm", *args],
        cwd=ROOT,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    env.update({f"AGGREGATOR_{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.fixture
def demo_config(demo: DemoProcess, write_config: Callable[[str], Path]) -> Path:
    return write_config(warm_config(demo.url))


@pytest.fixture
def offline_config(write_config: Callable[[str], Path]) -> Path:
    """Upstreams nobody calls: for tests that must stop before any of them is contacted."""
    return write_config(warm_config("http://127.0.0.1:9"))


@pytest.fixture
def shared_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A filesystem cache for in-process runs (the servers' settings, as the CLI reads them)."""
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("AGGREGATOR_CACHE_TYPE", "filesystem")
    monkeypatch.setenv("AGGREGATOR_CACHE_DIR", str(cache_dir))
    return cache_dir


def x_cache(config: Path, cache_dir: Path, path: str) -> str:
    """X-Cache of one request to an in-process app on the shared filesystem cache."""
    settings = Settings(config=config, cache_type="filesystem", cache_dir=cache_dir)
    response = create_app(settings).test_client().get(path)
    return response.headers.get("X-Cache", "")


# -- end to end: the two modes against real servers ---------------------------------------------


@pytest.mark.integration
def test_http_mode_warms_a_redis_deployment_for_every_worker(
    serve, demo, demo_config, shared_redis_prefix, tmp_path
):
    server = serve(
        demo_config,
        workers=2,
        cache_type="redis",
        cache_redis_url=SHARED_REDIS_URL,
        cache_key_prefix=shared_redis_prefix,
        admin_token=TOKEN,
    )
    workers = wait_for_workers(server, 2)
    reset_demo(demo)
    report_path = tmp_path / "report.json"

    wrong = run_warm("--url", server.url, "--all", "--config", str(demo_config), admin_token="no")
    result = run_warm(
        "--url",
        server.url,
        "--all",
        "--config",
        str(demo_config),
        "--json",
        str(report_path),
        admin_token=TOKEN,
    )

    assert wrong.returncode == 2, wrong.stderr
    assert "set AGGREGATOR_ADMIN_TOKEN" in wrong.stderr
    assert TOKEN not in wrong.stderr + wrong.stdout
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(report_path.read_text())
    assert [(t["params"]["city"], t["outcome"]) for t in report["targets"]] == [
        (city, "warmed") for city in CITIES
    ]
    assert report["totals"]["warmed"] == len(CITIES)
    assert report["interrupted"] is False
    assert all(t["attempts"] == 1 and t["status"] == 200 for t in report["targets"])
    assert calls(demo) == {"weather": len(CITIES), "profile": len(CITIES)}  # one fan-out each
    seen: dict[int, list[str]] = {pid: [] for pid in workers}
    for i in range(40):
        response, pid = get_fresh(server, f"/api/board?{query(i % len(CITIES))}")
        seen[pid].append(response.headers["X-Cache"])
        if i >= 9 and all(len(states) >= 2 for states in seen.values()):
            break
    assert all(states and set(states) == {"HIT"} for states in seen.values()), seen
    assert calls(demo) == {"weather": len(CITIES), "profile": len(CITIES)}


@pytest.mark.integration
def test_direct_mode_fills_the_filesystem_cache_a_server_reads(serve, demo, demo_config, tmp_path):
    cache_dir = str(tmp_path / "cache")
    server = serve(demo_config, workers=2, cache_type="filesystem", cache_dir=cache_dir)
    reset_demo(demo)

    result = run_warm(
        "board", "--config", str(demo_config), cache_type="filesystem", cache_dir=cache_dir
    )

    assert result.returncode == 0, result.stderr + result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "warming 4 targets directly in the filesystem cache"
    finished = lines[1:5]  # plain lines as targets finish (a pipe: no TTY)
    for line in finished:
        assert re.fullmatch(r"warmed board city=\w+&user_id=\d \d+ ms", line), line
    assert {line.split()[2] for line in finished} == {query(i) for i in range(4)}
    assert "target" in lines[6] and "outcome" in lines[6] and "sources failed" in lines[6]
    assert re.fullmatch(r"4 targets in \d+\.\d s: 4 warmed, 0 failed", lines[-1])
    assert "\x1b[" not in result.stdout  # no terminal codes in a pipe
    for i in range(len(CITIES)):
        with httpx.Client(trust_env=False, timeout=10) as client:
            response = client.get(f"{server.url}/api/board?{query(i)}")
        assert response.headers["X-Cache"] == "HIT"
    assert calls(demo) == {"weather": 4, "profile": 4}


@pytest.mark.integration
def test_failing_sources_make_targets_failed_or_partial_and_exit_1(demo, demo_config, tmp_path):
    targets = tmp_path / "targets.jsonl"
    targets.write_text(
        '{"aggregate": "board", "params": {"city": "Paris", "user_id": 1}}\n'
        '{"aggregate": "broken", "params": {"city": "Paris", "user_id": 1}}\n'
        '{"aggregate": "patchy", "params": {"city": "Paris", "user_id": 1}}\n'
    )
    report_path = tmp_path / "report.json"

    result = run_warm(
        "--targets",
        str(targets),
        "--config",
        str(demo_config),
        "--retries",
        "1",
        "--json",
        str(report_path),
        cache_type="filesystem",
        cache_dir=str(tmp_path / "cache"),
    )

    assert result.returncode == 1, result.stderr + result.stdout
    report = {t["aggregate"]: t for t in json.loads(report_path.read_text())["targets"]}
    assert report["board"]["outcome"] == "warmed"
    assert report["broken"]["outcome"] == "failed"
    assert report["broken"]["status"] == 502
    assert report["broken"]["sources_failed"] == ["profile_down"]
    assert report["broken"]["attempts"] == 2  # retried once
    assert report["patchy"]["outcome"] == "partial"
    assert report["patchy"]["sources_failed"] == ["weather_down"]
    assert report["patchy"]["attempts"] == 1  # partial is not retried
    assert "failed broken city=Paris&user_id=1" in result.stdout
    assert "sources failed: profile_down" in result.stdout
    assert "1 warmed, 1 partial, 1 failed" in result.stdout


@pytest.mark.integration
def test_a_per_process_deployment_is_not_warmable(serve, demo, demo_config):
    server = serve(demo_config, cache_type="simple", admin_token=TOKEN)
    reset_demo(demo)

    result = run_warm("--url", server.url, "--all", "--config", str(demo_config), admin_token=TOKEN)

    assert result.returncode == 2, result.stderr + result.stdout
    assert "not warmable" in result.stderr
    assert "(simple) lives inside each worker process" in result.stderr  # the server's reason
    assert calls(demo) == {"weather": 0, "profile": 0}


@pytest.mark.integration
def test_ctrl_c_stops_cleanly_with_a_summary(demo, write_config, tmp_path):
    cities = [f"City{i}" for i in range(12)]
    config = write_config(warm_config(demo.url, delay=0.3, cities=cities))
    report_path = tmp_path / "report.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator", "warm", "board", "--concurrency", "1"]
        + ["--config", str(config), "--json", str(report_path)],
        cwd=ROOT,
        env=_env({"cache_type": "filesystem", "cache_dir": str(tmp_path / "cache")}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        header = proc.stdout.readline()
        first = proc.stdout.readline()  # one target done: well inside the run
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert header.startswith("warming 12 targets")
    assert first.startswith("warmed board city=City0&user_id=1 ")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert re.search(r"board city=City0&user_id=1 +warmed", stdout)
    assert re.search(r"board city=City11&user_id=12 +not run", stdout)
    assert "interrupted by SIGINT" in stdout.splitlines()[-1]
    report = json.loads(report_path.read_text())
    assert report["interrupted"] is True
    outcomes = [t["outcome"] for t in report["targets"]]
    assert outcomes[0] == "warmed" and outcomes[-1] == "not_run"
    assert set(outcomes) <= {"warmed", "not_run"}
    assert report["totals"]["not_run"] >= 8


# -- targets: parsed and validated before anything is warmed -------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(["nope"], "AGGREGATE: unknown aggregate 'nope'", id="unknown-aggregate"),
        pytest.param(
            ["nope", "--param", "city=Paris"],
            "AGGREGATE: unknown aggregate",
            id="unknown-with-param",
        ),
        pytest.param(
            ["board", "--param", "city=Paris", "--param", "user_id=seven"],
            "--param user_id: must be an integer",
            id="mistyped-param",
        ),
        pytest.param(
            ["board", "--param", "city=Paris", "--param", "user_id=7", "--param", "colour=red"],
            "--param colour: unknown parameter (known: city, user_id, topic)",
            id="unknown-param",
        ),
        pytest.param(
            ["board", "--param", "user_id=7"],
            "--param city: required str parameter is missing",
            id="missing-param",
        ),
        pytest.param(["board", "--param", "city"], "expected NAME=VALUE", id="param-without-value"),
        pytest.param(["live"], "'live' is not cached", id="aggregate-not-cached"),
        pytest.param(["broken"], "'broken' has no warm targets", id="no-warm-list"),
        pytest.param([], "give AGGREGATE", id="nothing-to-warm"),
        pytest.param(["board", "--all"], "not both", id="aggregate-and-all"),
        pytest.param(["--param", "city=Paris", "--all"], "--param needs an AGGREGATE", id="orphan"),
        pytest.param(["--all", "--url", "ftp://x"], "--url must look like", id="bad-url"),
        pytest.param(["--all", "--json", "/nonexistent/r.json"], "does not exist", id="json-dir"),
        pytest.param(["--all", "--concurrency", "0"], "--concurrency", id="concurrency-0"),
    ],
)
def test_bad_command_lines_exit_2_naming_the_field(
    runner, demo, demo_config, shared_cache, args, says
):
    reset_demo(demo)

    result = runner.invoke(cli.main, ["warm", *args, "--config", str(demo_config)])

    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output
    assert not shared_cache.exists()  # refused before the cache was even opened
    assert calls(demo) == {"weather": 0, "profile": 0}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        pytest.param(
            "t.jsonl",
            '{"aggregate": "board", "params": {"city": "Paris", "user_id": 1}}\n\n'
            '{"aggregate": "board", "params": {"city": "Oslo", "user_id": "two"}}\n',
            ["t.jsonl: line 3: params.user_id: must be an integer"],
            id="jsonl-mistyped",
        ),
        pytest.param(
            "t.json",
            '{"aggregate": "board", "params": {"city": "Paris", "user_id": 1}}\n'
            '{"aggregate": "board", "params": {"city": "Oslo", "user_id": 2, "colour": 1}}\n'
            '{"aggregate": "nope"}\n'
            '{"aggregate": "board", "params": {"city": "Lima", "user_id": 3}\n'
            '["board"]\n'
            '{"aggregate": "board", "param": {}}\n',
            [
                "t.json: line 2: params.colour: unknown parameter",
                "t.json: line 3: aggregate: unknown aggregate 'nope'",
                "t.json: line 4: not JSON",
                "t.json: line 5: (entry): must be an object",
                "t.json: line 6: param: unknown key (expected aggregate, params)",
            ],
            id="jsonl-every-problem",
        ),
        pytest.param(
            "t.toml",
            '[[targets]]\naggregate = "board"\nparams = { city = "Paris", user_id = 1 }\n'
            '[[targets]]\naggregate = "board"\nparams = { city = "Oslo", user_id = 2.5 }\n',
            ["t.toml: targets[1]: params.user_id: must be an integer"],
            id="toml-mistyped",
        ),
        pytest.param(
            "t.toml",
            'target = 1\n[[targets]]\naggregate = "board"\nparams = { city = "Paris" }\n',
            ["t.toml: target: unknown key", "t.toml: targets[0]: params.user_id: required"],
            id="toml-unknown-key-and-missing-param",
        ),
        pytest.param("t.toml", "[[targets]\n", ["t.toml: (file): not valid TOML"], id="bad-toml"),
        pytest.param("t.csv", "board,Paris,1\n", ["t.csv: unknown kind"], id="unknown-suffix"),
        pytest.param("t.jsonl", "\n", ["t.jsonl: no targets in the file"], id="empty"),
        pytest.param(
            "t.jsonl", b"\xff\xfe", ["t.jsonl: cannot read the targets file"], id="binary"
        ),
        pytest.param(None, "", ["missing.jsonl: cannot read the targets file"], id="missing"),
    ],
)
def test_a_bad_targets_file_exits_2_naming_file_line_and_field(
    runner, demo, demo_config, shared_cache, tmp_path, monkeypatch, name, text, says
):
    monkeypatch.chdir(tmp_path)
    path = Path(name or "missing.jsonl")
    if name is not None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    reset_demo(demo)

    result = runner.invoke(cli.main, ["warm", "--targets", str(path), "--config", str(demo_config)])

    assert result.exit_code == 2, result.output
    for problem in says:
        assert problem in result.output
    assert "nothing was warmed" in result.output
    assert calls(demo) == {"weather": 0, "profile": 0}
    # its valid first line was not warmed either: the cache still misses it
    assert x_cache(demo_config, shared_cache, f"/api/board?{query(0)}") == "MISS"


def test_a_bad_config_warm_list_exits_2_naming_the_entry(runner, write_config, shared_cache):
    text = warm_config("http://127.0.0.1:9").replace("user_id = 2}", 'user_id = "two"}')
    config = write_config(text)

    result = runner.invoke(cli.main, ["warm", "--all", "--config", str(config)])

    assert result.exit_code == 2, result.output
    assert "aggregates.board.warm[1].user_id: must be an integer" in result.output
    assert not shared_cache.exists()


def test_targets_are_typed_deduplicated_and_labelled(offline_config, tmp_path):
    config = parse_config(offline_config.read_text(), "test")
    file = tmp_path / "t.jsonl"
    file.write_text(
        '{"aggregate": "board", "params": {"city": "Paris", "user_id": "01"}}\n'
        '{"aggregate": "board", "params": {"city": "New York", "user_id": 9, "topic": "tech"}}\n'
        '{"aggregate": "board", "params": {"city": "Paris", "user_id": 1, "topic": "general"}}\n'
    )

    targets, dropped = collect_targets(config, all_targets=True, targets_file=file)

    assert dropped == 2  # Paris/1 is in the config's warm list, and twice in the file
    assert [t.label for t in targets] == [
        "board city=Paris&user_id=1",
        "board city=Oslo&user_id=2",
        "board city=Lima&user_id=3",
        "board city=Tokyo&user_id=4",
        "board city=New%20York&user_id=9&topic=tech",
    ]
    assert targets[0].params == {"city": "Paris", "user_id": 1, "topic": "general"}


def test_collect_targets_reports_every_problem_at_once(offline_config, tmp_path):
    config = parse_config(offline_config.read_text(), "test")
    file = tmp_path / "t.toml"
    file.write_text('[[targets]]\naggregate = "nope"\n')

    with pytest.raises(TargetError) as caught:
        collect_targets(config, aggregate="board", params={"city": "Paris"}, targets_file=file)

    assert caught.value.problems == [
        "--param user_id: required int parameter is missing",
        f"{file}: targets[0]: aggregate: unknown aggregate 'nope' (known: board, broken, live, "
        "patchy)",
    ]
    assert str(caught.value).startswith("2 problems with the targets (nothing was warmed):")


# -- modes that cannot work, and the dry run ----------------------------------------------------


@pytest.mark.parametrize("cache_type", ["simple", "null"])
def test_direct_mode_refuses_a_per_process_cache(runner, offline_config, monkeypatch, cache_type):
    monkeypatch.setenv("AGGREGATOR_CACHE_TYPE", cache_type)

    result = runner.invoke(cli.main, ["warm", "--all", "--config", str(offline_config)])

    assert result.exit_code == 2, result.output
    assert f"cache_type={cache_type!r}" in result.output
    assert "not warmable" in result.output


def test_http_mode_needs_a_reachable_url_and_a_token(runner, offline_config, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"

    no_token = runner.invoke(
        cli.main, ["warm", "--all", "--url", url, "--config", str(offline_config)]
    )
    monkeypatch.setenv("AGGREGATOR_ADMIN_TOKEN", TOKEN)
    refused = runner.invoke(
        cli.main, ["warm", "--all", "--url", url, "--config", str(offline_config)]
    )

    assert no_token.exit_code == 2
    assert "pass --token (or set AGGREGATOR_ADMIN_TOKEN)" in no_token.output
    assert refused.exit_code == 2
    assert f"cannot reach {url}" in refused.output


@pytest.mark.parametrize("cache_type", ["simple", "null"])
def test_a_dry_run_shows_its_targets_with_any_cache_and_says_a_real_run_is_refused(
    runner, offline_config, monkeypatch, cache_type
):
    monkeypatch.setenv("AGGREGATOR_CACHE_TYPE", cache_type)

    result = runner.invoke(
        cli.main, ["warm", "--all", "--dry-run", "--config", str(offline_config)]
    )

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("would warm ")
    assert lines[-2].startswith("dry run: ") and lines[-2].endswith("; nothing contacted")
    assert lines[-1].startswith(f"a real run would be refused: cache_type={cache_type!r}")
    assert "not warmable" in lines[-1]


def test_the_token_for_url_can_be_given_as_an_option_and_is_never_shown(
    runner, offline_config, monkeypatch
):
    monkeypatch.delenv("AGGREGATOR_ADMIN_TOKEN", raising=False)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    secret = "s3cret-token-for-this-test"

    given = runner.invoke(
        cli.main,
        ["warm", "--all", "--url", url, "--token", secret, "--config", str(offline_config)],
    )
    dry = runner.invoke(
        cli.main, ["warm", "--all", "--url", url, "--dry-run", "--config", str(offline_config)]
    )

    assert given.exit_code == 2
    assert f"cannot reach {url}" in given.output  # past the token check: it was taken
    assert secret not in given.output
    assert dry.exit_code == 0, dry.output
    assert "a real run would be refused: no admin token (pass --token" in dry.output


@pytest.mark.integration
def test_dry_run_contacts_nothing(runner, demo, demo_config, shared_cache, tmp_path):
    reset_demo(demo)
    report = tmp_path / "r.json"

    direct = runner.invoke(
        cli.main,
        ["warm", "--all", "--dry-run", "--json", str(report), "--config", str(demo_config)],
    )
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: it would fail if contacted
    through = runner.invoke(
        cli.main, ["warm", "board", "--dry-run", "--url", url, "--config", str(demo_config)]
    )

    assert direct.exit_code == 0, direct.output
    assert direct.output.splitlines() == [
        *(f"would warm board {query(i)}" for i in range(4)),
        "dry run: 4 targets would be warmed directly in the filesystem cache; nothing contacted",
    ]
    assert through.exit_code == 0, through.output
    assert f"would be warmed through {url}" in through.output
    assert calls(demo) == {"weather": 0, "profile": 0}
    assert not shared_cache.exists()
    written = json.loads(report.read_text())
    assert written["dry_run"] is True
    assert {t["outcome"] for t in written["targets"]} == {"not_run"}


@pytest.mark.integration
def test_only_missing_skips_fresh_entries(runner, demo, demo_config, shared_cache):
    reset_demo(demo)
    args = ["warm", "board", "--config", str(demo_config)]

    first = runner.invoke(cli.main, args)
    after_first = calls(demo)
    again = runner.invoke(cli.main, [*args, "--only-missing", "--json", "-"])
    after_again = calls(demo)
    forced = runner.invoke(cli.main, args)

    assert first.exit_code == 0, first.output
    assert after_first == {"weather": 4, "profile": 4}
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)  # `--json -`: stdout holds the report alone
    assert {t["outcome"] for t in report["targets"]} == {"skipped"}
    assert "skipped board city=Paris&user_id=1" in again.stderr
    assert after_again == after_first
    assert forced.exit_code == 0, forced.output
    assert calls(demo) == {"weather": 8, "profile": 8}  # without it, fresh entries are refreshed


def test_the_command_passes_its_options_to_the_library(runner, monkeypatch, tmp_path):
    seen: list[WarmRequest] = []

    def fake_run(request: WarmRequest) -> int:
        seen.append(request)
        return 0

    monkeypatch.setattr("aggregator.ops.warm.run.run", fake_run)
    monkeypatch.setenv("AGGREGATOR_ADMIN_TOKEN", TOKEN)
    args = ["warm", "board", "--param", "city=Paris", "--param", "user_id=7", "--url", "http://h:1"]
    args += ["--concurrency", "8", "--rate", "2.5", "--timeout", "3", "--retries", "0"]
    args += ["--only-missing", "--json", "-", "--targets", str(tmp_path / "t.toml")]

    result = runner.invoke(cli.main, args)

    assert result.exit_code == 0, result.output
    assert seen == [
        WarmRequest(
            aggregate="board",
            params={"city": "Paris", "user_id": "7"},
            targets_file=tmp_path / "t.toml",
            url="http://h:1",
            token=TOKEN,
            options=RunOptions(concurrency=8, rate=2.5, timeout=3.0, retries=0, only_missing=True),
            json_path="-",
        )
    ]


# -- the HTTP warmer: what each answer of POST /admin/warm means ---------------------------------

BASE = "http://aggregator.test"
SHARED = {"type": "redis", "shared": True}


@pytest.mark.respx(base_url=BASE)
@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        pytest.param(
            200,
            {
                "outcome": "warmed",
                "status": 200,
                "sources_failed": [],
                "detail": "",
                "cache": SHARED,
            },
            WarmResult("warmed", 200),
            id="warmed",
        ),
        pytest.param(
            200,
            {
                "outcome": "partial",
                "status": 200,
                "sources_failed": ["news"],
                "detail": "partial answer",
                "cache": SHARED,
            },
            WarmResult("partial", 200, ("news",), "partial answer"),
            id="partial",
        ),
        pytest.param(
            502,
            {"error": "Bad Gateway", "message": "proxy says no"},
            WarmResult("failed", detail=f"{BASE} answered 502: proxy says no"),
            id="server-error-is-a-failed-attempt",
        ),
        pytest.param(
            200,
            {"outcome": "exploded"},
            WarmResult("failed", detail=f"{BASE} answered 200: OK"),
            id="unknown-outcome",
        ),
    ],
)
async def test_http_warmer_maps_the_answer(
    respx_mock: respx.MockRouter,
    ten_targets: list[Target],
    status: int,
    body: dict[str, Any],
    expected: WarmResult,
) -> None:
    route = respx_mock.post("/admin/warm").respond(status, json=body)

    async with httpx.AsyncClient(base_url=BASE + "/") as client:
        result = await HttpWarmer(client, BASE).warm(ten_targets[0], only_missing=True)

    assert result == expected
    sent = json.loads(route.calls.last.request.content)
    assert sent == {
        "aggregate": "board",
        "params": {"city": "C0", "user_id": 0, "topic": "general"},
        "only_missing": True,
    }


@pytest.mark.respx(base_url=BASE)
@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        pytest.param(
            401, {"message": "the admin token is wrong"}, "AGGREGATOR_ADMIN_TOKEN", id="401"
        ),
        pytest.param(
            404,
            {"message": "the admin endpoints are disabled on this server"},
            "has its admin endpoints disabled",
            id="404-disabled",
        ),
        pytest.param(
            409,
            {"message": "lives inside each worker", "cache": {"type": "simple", "shared": False}},
            "is not warmable: lives inside each worker",
            id="409",
        ),
    ],
)
async def test_http_warmer_stops_the_run_when_the_deployment_refuses(
    respx_mock, ten_targets, status, body, says
):
    respx_mock.post("/admin/warm").respond(status, json=body)

    async with httpx.AsyncClient(base_url=BASE + "/") as client:
        with pytest.raises(NotWarmableError, match=says):
            await HttpWarmer(client, BASE).warm(ten_targets[0], only_missing=False)


@pytest.mark.respx(base_url=BASE)
async def test_a_target_the_server_refuses_is_failed_without_retries(
    respx_mock: respx.MockRouter, ten_targets: list[Target]
) -> None:
    route = respx_mock.post("/admin/warm").respond(
        404,
        json={"error": "Not Found", "message": "unknown aggregate 'board'", "field": "aggregate"},
    )

    async with httpx.AsyncClient(base_url=BASE + "/") as client:
        report = await warm_targets(
            ten_targets[:1], HttpWarmer(client, BASE), RunOptions(retries=2, backoff=0.01)
        )

    assert route.call_count == 1
    target = report.targets[0]
    assert (target.outcome, target.status, target.attempts) == ("failed", 404, 1)
    assert "unknown aggregate 'board'" in target.detail


# -- the runner: pace, retries, timeouts, interruption (fake warmers) ----------------------------


class FakeWarmer:
    """Answers from a script per target label: a list of outcomes, one per attempt."""

    def __init__(self, script: dict[str, list[str]] | None = None, delay: float = 0.0) -> None:
        self.script = script or {}
        self.delay = delay
        self.calls: list[tuple[str, float]] = []

    async def warm(self, target: Target, only_missing: bool) -> WarmResult:
        self.calls.append((target.label, time.monotonic()))
        await asyncio.sleep(self.delay)
        outcomes = self.script.get(target.label, ["warmed"])
        outcome = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
        if outcome == "not warmable":
            raise NotWarmableError("nope")
        return WarmResult(outcome, 200, ("x",) if outcome == "partial" else ())  # type: ignore[arg-type]


@pytest.fixture
def ten_targets(offline_config: Path) -> list[Target]:
    config = parse_config(offline_config.read_text(), "test")
    return [make_target(config, "board", {"city": f"C{i}", "user_id": i}) for i in range(10)]


async def test_rate_spaces_the_targets_evenly(ten_targets):
    warmer = FakeWarmer()
    started = time.monotonic()

    report = await warm_targets(ten_targets, warmer, RunOptions(concurrency=10, rate=5))

    elapsed = time.monotonic() - started
    assert report.totals()["warmed"] == 10
    assert elapsed >= 1.6  # nine gaps of 0.2 s: no initial burst
    gaps = [b - a for (_, a), (_, b) in zip(warmer.calls, warmer.calls[1:], strict=False)]
    assert min(gaps) >= 0.15


async def test_concurrency_bounds_targets_in_flight(ten_targets):
    warmer = FakeWarmer(delay=0.2)
    started = time.monotonic()

    await warm_targets(ten_targets, warmer, RunOptions(concurrency=5))

    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.2, elapsed  # two rounds of five (0.4 s), not ten (0.2) or one (2)


async def test_failed_targets_are_retried_partial_and_skipped_never(ten_targets):
    flaky, always, partial, skipped = (t.label for t in ten_targets[:4])
    warmer = FakeWarmer(
        {
            flaky: ["failed", "warmed"],
            always: ["failed"],
            partial: ["partial"],
            skipped: ["skipped"],
        }
    )

    report = await warm_targets(ten_targets[:4], warmer, RunOptions(retries=2, backoff=0.01))

    by_label = {r.target.label: r for r in report.targets}
    assert (by_label[flaky].outcome, by_label[flaky].attempts) == ("warmed", 2)
    assert (by_label[always].outcome, by_label[always].attempts) == ("failed", 3)
    assert (by_label[partial].outcome, by_label[partial].attempts) == ("partial", 1)
    assert (by_label[skipped].outcome, by_label[skipped].attempts) == ("skipped", 1)
    assert report.exit_code() == 1


async def test_a_target_out_of_time_has_failed(ten_targets):
    warmer = FakeWarmer(delay=5)

    report = await warm_targets(
        ten_targets[:2], warmer, RunOptions(timeout=0.05, retries=1, backoff=0.01)
    )

    assert [(r.outcome, r.attempts) for r in report.targets] == [("failed", 2), ("failed", 2)]
    assert report.targets[0].detail == "timed out after 0.05 s"


async def test_a_deployment_refusing_everything_ends_the_run(ten_targets):
    warmer = FakeWarmer({t.label: ["not warmable"] for t in ten_targets})

    with pytest.raises(NotWarmableError):
        await warm_targets(ten_targets, warmer, RunOptions(concurrency=2))

    assert len(warmer.calls) == 2  # the other targets never started


async def test_stop_cancels_what_has_not_finished(ten_targets):
    warmer = FakeWarmer(delay=0.1)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.25, stop.set)

    report = await warm_targets(ten_targets, warmer, RunOptions(concurrency=1), stop=stop)

    outcomes = [r.outcome for r in report.targets]
    assert outcomes[:2] == ["warmed", "warmed"]
    assert outcomes[3:] == ["not_run"] * 7
    assert report.targets[2].detail == "interrupted"  # it was in flight


def test_a_terminal_gets_a_progress_bar_and_a_table(ten_targets):
    out = io.StringIO()
    reporter = RichReporter(Console(file=out, force_terminal=True, width=100))
    run = RunReport([])
    reporter.start(2, "warming 2 targets")
    outcomes: tuple[Outcome, ...] = ("warmed", "failed")
    for target, outcome in zip(ten_targets[:2], outcomes, strict=True):
        done = TargetReport(target, outcome, ms=12.0, attempts=1, detail="boom")
        run.targets.append(done)
        reporter.done(done)
    reporter.finish(run)

    text = out.getvalue()
    assert "failed board city=C1&user_id=1 12 ms (boom)" in text  # printed above the bar
    assert "warm summary" in text
    assert "2 targets in 0.0 s: 1 warmed, 1 failed" in text


def test_exit_codes(ten_targets):
    def exit_code(*outcomes: Outcome, signum: int | None = None) -> int:
        reports = [TargetReport(t, o) for t, o in zip(ten_targets, outcomes, strict=False)]
        return RunReport(reports, interrupted_by=signum).exit_code()

    assert exit_code("warmed", "skipped") == 0
    assert exit_code("warmed", "partial") == 1
    assert exit_code("failed") == 1
    assert exit_code("warmed", "not_run", signum=signal.SIGINT) == 130


@pytest.mark.integration
def test_warm_app_fills_a_views_warm_list_that_its_server_then_hits(demo, tmp_path):
    # A developer's app: its aggregates are views, declared in code, not in any config file.
    settings = {
        "cache_type": "filesystem",
        "cache_dir": str(tmp_path / "cache"),
        "demo_url": demo.url,
    }
    app = "tests.support.views_app:app"

    warmed = run_warm("--all", "--app", app, **settings)

    assert warmed.returncode == 0, warmed.stderr + warmed.stdout
    assert re.search(r"^warmed home user_id=1 ", warmed.stdout, re.M), warmed.stdout
    server = start_own_app(tmp_path, "aggregator", "serve", "--app", app, **settings)
    try:
        response = httpx.get(f"{server.url}/home?user_id=1", trust_env=False, timeout=10)
        # Its cache_ttl is 1 s: by the time the server is up the warmed entry may be stale.
        assert response.headers["X-Cache"] in ("HIT", "STALE")
    finally:
        server.stop()


def test_warm_app_refuses_a_config_too_and_an_app_without_engine(tmp_path):
    both = run_warm("--all", "--app", "tests.support.views_app:app", "--config", "x.toml")
    plain = run_warm("--all", "--app", "tests.support.own_app:app")

    assert both.returncode == 2 and "give --app or --config, not both" in both.stderr
    assert plain.returncode == 2
    assert plain.stderr.strip().endswith("has no aggregator engine (use Aggregator(app))")
    assert "Traceback" not in both.stderr + plain.stderr
