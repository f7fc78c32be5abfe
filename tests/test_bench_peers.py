"""The bench measures what we ship: each target's settings, its label, and the FastAPI peers."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import aggregator.bench.fastapi_plain as plain_module
from aggregator.bench import plan
from aggregator.bench.plan import Target, Workload, parse_target
from aggregator.bench.report import runs_as, write_outputs
from aggregator.bench.runner import BenchResult, Options, Run
from aggregator.bench.servers import peer_env, server_command, server_env
from aggregator.bench.summary import goals, summarize
from aggregator.demo import models
from aggregator.demo.process import start_demo_process
from aggregator.settings import Settings

# -- what each target's server is told ----------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["loop:async:aiohttp", "threads:async:httpx", "serial:async", "gunicorn:sync-pool"]
)
def test_project_targets_run_with_the_shipped_settings(monkeypatch, tmp_path, spec):
    # Whatever the caller's environment says about the settings the bench controls.
    monkeypatch.setenv("AGGREGATOR_LOG_LEVEL", "ERROR")
    monkeypatch.setenv("AGGREGATOR_METRICS", "public")
    monkeypatch.setenv("AGGREGATOR_ADMIN_TOKEN", "secret")
    env = server_env(parse_target(spec), tmp_path / "b.toml", 64)
    shipped = Settings.model_fields
    assert env["AGGREGATOR_LOG_LEVEL"] == shipped["log_level"].default == "INFO"
    assert env["AGGREGATOR_METRICS"] == shipped["metrics"].default
    assert env["AGGREGATOR_CACHE_TYPE"] == shipped["cache_type"].default
    assert env["AGGREGATOR_GC_THRESHOLD"] == str(
        shipped["gc_threshold"].default
    ) or spec.startswith("gunicorn")
    assert "AGGREGATOR_ADMIN_TOKEN" not in env  # would turn metrics recording on


@pytest.mark.parametrize(
    ("spec", "log_level", "metrics"),
    [
        ("loop:async+quiet", "WARNING", "token"),
        ("loop:async+nometrics", "INFO", "off"),
        ("loop:async+metrics", "INFO", "public"),
        ("loop:async+cached+quiet+nometrics", "WARNING", "off"),
    ],
)
def test_target_flags_change_only_what_they_say(tmp_path, spec, log_level, metrics):
    env = server_env(parse_target(spec), tmp_path / "b.toml", 64)
    assert (env["AGGREGATOR_LOG_LEVEL"], env["AGGREGATOR_METRICS"]) == (log_level, metrics)


def test_flags_parse_and_name_themselves():
    target = parse_target("loop:async:aiohttp+cached+quiet+nometrics")
    assert target == Target("loop", "async", "aiohttp", cached=True, quiet=True, nometrics=True)
    assert parse_target(target.name) == target
    peer = parse_target("fastapi-plain:cached")
    assert peer == Target("fastapi-plain", "async", "aiohttp", cached=True)
    assert peer.name == "fastapi-plain:cached" and parse_target(peer.name) == peer
    assert peer.path.startswith(plan.CACHED_PATH + "?")
    assert parse_target("fastapi-plain:async:aiohttp+cached") == peer
    assert parse_target("fastapi-plain:async:httpx").name == "fastapi-plain:async:httpx"


def test_the_plain_peer_is_served_by_uvicorn_and_told_its_upstreams_only():
    command = server_command(parse_target("fastapi-plain:async:httpx"), 9000, 8)
    assert "uvicorn" in command and "aggregator.bench.fastapi_plain:app" in command
    assert "--no-access-log" in command  # as the existing reference: uvicorn at its leanest
    ours = server_command(parse_target("fastapi:async"), 9000, 8)
    assert "aggregator.bench.fastapi_app:app" in ours
    upstreams = Workload(sources=6).upstreams("http://127.0.0.1:9")
    env = peer_env(parse_target("fastapi-plain:async:httpx"), upstreams)
    assert env["PLAIN_ENGINE"] == "httpx"
    told = json.loads(env["PLAIN_UPSTREAMS"])
    assert list(told) == ["weather", "stocks", "news", "profile", "recommendations", "weather_5"]
    assert told["stocks"] == "http://127.0.0.1:9/stocks/{user_id}"
    assert peer_env(parse_target("loop:async"), upstreams) == {}


# -- labels in the report -----------------------------------------------------------------------


def test_each_target_is_labelled_as_shipped_or_with_its_flags():
    labels = {
        spec: parse_target(spec).runs_as
        for spec in (
            "loop:async:aiohttp",
            "gunicorn:sync-pool",
            "loop:async:aiohttp+cached",
            "loop:async:aiohttp+quiet",
            "loop:async:aiohttp+pygc+nometrics",
            "loop:async:aiohttp+cached+mypyc",
            "fastapi:async:aiohttp",
            "fastapi-plain:async:aiohttp",
            "fastapi-plain:cached",
            "fastapi-plain:cached+hypercorn",
        )
    }
    assert labels["loop:async:aiohttp"] == "as shipped"
    assert labels["gunicorn:sync-pool"] == "as shipped"
    assert labels["loop:async:aiohttp+cached"] == "as shipped, every request a cache hit (+cached)"
    assert labels["loop:async:aiohttp+quiet"] == "logging WARNING, no access line (+quiet)"
    assert (
        labels["loop:async:aiohttp+pygc+nometrics"]
        == "metrics off (+nometrics), Python's GC (+pygc)"
    )
    assert labels["loop:async:aiohttp+cached+mypyc"] == (
        "every request a cache hit (+cached), HTTP/1.1 parsed by h11-mypyc (+mypyc)"
    )
    assert labels["fastapi:async:aiohttp"] == "FastAPI + uvicorn running our fan-out engine"
    assert labels["fastapi-plain:async:aiohttp"].startswith("FastAPI peer as its users write it")
    assert "as shipped" not in labels["fastapi-plain:cached"]
    assert "stored envelope bytes" in labels["fastapi-plain:cached"]
    assert labels["fastapi-plain:cached+hypercorn"].endswith(
        "served by Hypercorn, not uvicorn (+hypercorn)"
    )


def _run(target: str, c: int, rps: float) -> Run:
    return Run(target, c, 1, "wrk", rps, 100.0, 120.0, 150.0, int(rps * 10), 0, 0, 0, 5.0, 1.0,
               False, 100.0, int(rps * 50), True)  # fmt: skip


def test_the_report_labels_targets_in_the_table_json_and_console(tmp_path):
    names = ("loop:async:aiohttp", "loop:async:aiohttp+quiet", "fastapi-plain:async:aiohttp")
    options = Options(
        targets=tuple(parse_target(n) for n in names),
        workload=Workload(payload_kb=2),
        levels=(64,),
    )
    machine = {"cores": 2, "cpu": "x", "os": "y", "python": "3.11", "versions": {}}
    result = BenchResult(options, machine, [_run(n, 64, 100.0) for n in names])
    rows = summarize(result)
    write_outputs(result, rows, tmp_path, "aggregator bench")
    report = (tmp_path / "report.md").read_text()
    assert "| runs as |" in report and "~2 KB of JSON per source" in report
    assert "| as shipped |" in report and "(+quiet) |" in report
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["runs_as"] == runs_as(result) and data["runs_as"][names[0]] == "as shipped"
    assert {r["target"]: r["runs_as"] for r in data["summary"]}[names[1]].endswith("(+quiet)")
    assert data["options"]["workload"]["payload_kb"] == 2
    lines = goals(result, rows)
    assert any(ln.startswith(f"{names[0]} vs {names[2]} at c=64: 1.00x") for ln in lines)


def test_a_run_that_completed_nothing_still_writes_its_results(tmp_path):
    """A collapsed peer (0 requests in a run) has no CPU per request: null, not a crash."""
    name = "fastapi-plain:async:httpx"
    options = Options(targets=(parse_target(name),), workload=Workload(), levels=(256,))
    machine = {"cores": 2, "cpu": "x", "os": "y", "python": "3.11", "versions": {}}
    result = BenchResult(options, machine, [_run(name, 256, 0.0)])
    write_outputs(result, summarize(result), tmp_path, "aggregator bench")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["runs"][0]["requests"] == 0 and data["runs"][0]["cpu_ms_per_request"] is None


def test_cache_hits_are_compared_with_the_peer_serving_stored_bytes():
    names = ("loop:async:aiohttp+cached", "fastapi-plain:cached", "fastapi-plain:async:aiohttp")
    options = Options(
        targets=tuple(parse_target(n) for n in names), workload=Workload(), levels=(64,)
    )
    runs = [_run(names[0], 64, 1200.0), _run(names[1], 64, 1000.0), _run(names[2], 64, 90.0)]
    lines = goals(BenchResult(options, {}, runs), summarize(BenchResult(options, {}, runs)))
    assert f"{names[0]} vs {names[1]} at c=64: 1.20x" in lines[0]
    assert not any(f"{names[0]} vs {names[2]}" in ln for ln in lines)  # hits vs fan-outs: no


# -- the plain peer: no code of ours -------------------------------------------------------------


def test_the_plain_peer_imports_nothing_of_ours():
    tree = ast.parse(Path(plain_module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            imported.add(node.module or "")
    assert imported, "found no imports at all"
    assert not {m for m in imported if m.split(".")[0] == "aggregator"}, imported
    assert {"fastapi", "httpx", "httpx_aiohttp", "pydantic", "asyncio"} <= imported


@pytest.mark.integration
async def test_the_cached_peer_serves_the_same_envelope_from_a_dict(monkeypatch, tmp_path):
    """The peer's envelope has our shape and the demo's 2 KB payloads; hits call nothing."""
    app = plain_module.app
    params: dict[str, str | int] = {"city": "Paris", "user_id": 7}
    with start_demo_process(latency=0.0, payload_kb=2, log_path=tmp_path / "demo.log") as demo:
        upstreams = Workload(sources=5).upstreams(demo.url)
        monkeypatch.setattr(plain_module, "UPSTREAMS", {n: u for n, _, u in upstreams})
        transport = httpx.ASGITransport(app=app)
        async with (
            plain_module.lifespan(app),
            httpx.AsyncClient(transport=transport, base_url="http://peer") as client,
            httpx.AsyncClient(base_url=demo.url) as upstream,
        ):
            fresh = await client.get("/bench", params=params)
            assert fresh.status_code == 200
            envelope = fresh.json()
            assert set(envelope) == {"data", "errors", "sources", "complete"}
            assert envelope["complete"] is True and envelope["errors"] == {}
            for name, _, _ in upstreams:
                model = getattr(models, name.capitalize())
                part = model.model_validate(envelope["data"][name])
                assert 1536 <= len(part.model_dump_json()) <= 2560, name
            assert 5 * 1536 <= len(fresh.content) <= 5 * 2560 + 1024
            await upstream.post("/_reset")
            first = await client.get("/bench-cached", params=params)
            calls = (await upstream.get("/_stats")).json()["total_requests"]
            again = await client.get("/bench-cached", params=params)
            assert again.content == first.content
            assert abs(len(again.content) - len(fresh.content)) <= 16  # only the ms differ
            assert (await upstream.get("/_stats")).json()["total_requests"] == calls == 5


# -- one short real bench with the new targets ---------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_short_bench_runs_the_peers_beside_what_we_ship(tmp_path):
    targets = (
        "loop:async:aiohttp,fastapi-plain:async:aiohttp,fastapi-plain:async:httpx,"
        "loop:async:aiohttp+cached,fastapi-plain:cached,"
        "loop:async:aiohttp+cached+mypyc,fastapi-plain:cached+hypercorn"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator", "bench", "-t", targets, "-c", "2", "-d", "0.5"]
        + ["-r", "1", "--warmup", "0.5", "-k", "3", "--latency", "0.05", "--payload-kb", "2"]
        + ["--tool", "builtin", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=90,  # half the test's timeout: seven servers, 27 s in a quiet CI run
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "results.json").read_text())
    rows = {r["target"]: r for r in data["summary"]}
    assert set(rows) == set(targets.split(","))
    assert all(r["errors"] == 0 for r in rows.values()), rows
    assert rows["fastapi-plain:cached"]["upstream_calls_per_request"] == 0, rows
    assert rows["fastapi-plain:cached+hypercorn"]["upstream_calls_per_request"] == 0, rows
    # The bench refuses a +mypyc server whose worker fell back to stock h11 (it asks /status).
    assert rows["loop:async:aiohttp+cached+mypyc"]["runs_as"].endswith("h11-mypyc (+mypyc)")
    assert 2.5 < rows["fastapi-plain:async:httpx"]["upstream_calls_per_request"] < 3.5, rows
    assert rows["loop:async:aiohttp"]["runs_as"] == "as shipped"
    assert "~2 KB of JSON per source" in (out / "report.md").read_text()
    assert "loop:async:aiohttp+cached vs fastapi-plain:cached at c=2" in proc.stdout
    assert "as shipped" in proc.stdout
