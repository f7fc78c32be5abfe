"""/metrics: exact counts from real Hypercorn + demo upstreams, exposure rules, the recorder.

Integration tests scrape a fresh server (its own process: counts start at zero) and parse the
answer with prometheus_client's parser; unit tests read the test process's registry as deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from aggregator import create_app, metrics
from aggregator.config import parse_config
from aggregator.demo.process import DemoProcess, free_port
from aggregator.engine import engine_of
from aggregator.errors import ConfigError
from aggregator.models import SourceResult
from aggregator.ops import purge as ops_purge
from aggregator.ops.warm import run as warm_run
from aggregator.ops.warm.report import PlainReporter
from aggregator.ops.warm.warmers import RunOptions
from aggregator.resilience import BreakerState, CircuitBreaker
from aggregator.serving import ASGIAdapter
from aggregator.settings import Settings, SettingsError
from tests.support.configs import METRICS_TOKEN as TOKEN
from tests.support.configs import shop_config
from tests.support.paths import ROOT
from tests.support.servers import Server, wait_healthy

AUTH = {"Authorization": f"Bearer {TOKEN}"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, token: str | None = TOKEN) -> Samples:
    """Every sample at `url`/metrics, keyed by name and sorted labels."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{url}/metrics", headers=headers, trust_env=False, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.integration
def test_counts_are_exact_for_misses_hits_failures_and_a_bad_request(
    serve: Callable[..., Server], demo: DemoProcess, write_config: Callable[[str], Path]
) -> None:
    server = serve(write_config(shop_config(demo.url)), admin_token=TOKEN)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as http:
        first = http.get("/api/shop", params={"city": "Paris", "user_id": 1})
        hit = http.get("/api/shop", params={"city": "Paris", "user_id": 1})
        trips = http.get("/api/shop", params={"city": "Oslo", "user_id": 2})  # 2nd failure: open
        refused = http.get("/api/shop", params={"city": "Rome", "user_id": 3})
        bad = http.get("/api/shop", params={"city": "Rome", "user_id": "x"})
        etag = {"If-None-Match": first.headers["ETag"]}
        not_modified = http.get("/api/shop", params={"city": "Paris", "user_id": 1}, headers=etag)
    assert [r.headers.get("X-Cache") for r in (first, hit, trips, refused)] == [
        "MISS",
        "HIT",
        "MISS",
        "MISS",
    ]
    assert refused.json()["errors"]["broken"]["kind"] == "circuit_open"
    assert (bad.status_code, not_modified.status_code) == (400, 304)

    s = scrape(server.url)
    shop = {"aggregate": "shop"}
    assert value(s, "aggregator_requests_total", **shop, status="200") == 4
    assert value(s, "aggregator_requests_total", **shop, status="304") == 1
    assert value(s, "aggregator_requests_total", **shop, status="400") == 1
    assert value(s, "aggregator_request_duration_seconds_count", **shop) == 6
    assert value(s, "aggregator_requests_in_flight") == 0
    # The hit and the 304 were answered by the adapter's fast path, before Flask.
    for result, count in (("hit", 2), ("miss", 3), ("stale", 0), ("bypass", 0)):
        assert value(s, "aggregator_cache_results_total", **shop, result=result) == count
    assert value(s, "aggregator_coalesced_waiters_total", **shop, scope="worker") == 0
    # Refused calls are errors but not calls: the histogram counts what reached the upstream.
    assert value(s, "aggregator_source_duration_seconds_count", source="good") == 3
    assert value(s, "aggregator_source_duration_seconds_count", source="broken") == 2
    broken = {"source": "broken"}
    assert value(s, "aggregator_source_errors_total", **broken, kind="http_status") == 2
    assert value(s, "aggregator_source_errors_total", **broken, kind="circuit_open") == 1
    assert value(s, "aggregator_source_errors_total", **broken, kind="timeout") == 0
    assert value(s, "aggregator_source_errors_total", source="good", kind="http_status") == 0
    for state, broken_is, good_is in (("closed", 0, 1), ("half_open", 0, 0), ("open", 1, 0)):
        assert value(s, "aggregator_circuit_state", source="broken", state=state) == broken_is
        assert value(s, "aggregator_circuit_state", source="good", state=state) == good_is


@pytest.mark.integration
async def test_concurrent_misses_of_one_key_are_counted_as_coalesced(
    serve: Callable[..., Server], demo: DemoProcess, write_config: Callable[[str], Path]
) -> None:
    server = serve(write_config(shop_config(demo.url, delay=1.0)), admin_token=TOKEN)
    params: dict[str, str | int] = {"city": "Paris", "user_id": 9}
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=20) as http:
        answers = await asyncio.gather(*(http.get("/api/shop", params=params) for _ in range(4)))
    assert all(r.status_code == 200 for r in answers)
    s = scrape(server.url)
    shop = {"aggregate": "shop"}
    misses = value(s, "aggregator_cache_results_total", **shop, result="miss")
    hits = value(s, "aggregator_cache_results_total", **shop, result="hit")
    joined = value(s, "aggregator_coalesced_waiters_total", **shop, scope="worker")
    assert misses + hits == 4
    assert joined == misses - 1 >= 1  # one fill; every other miss waited for it
    assert value(s, "aggregator_source_duration_seconds_count", source="good") == 1


# -- several workers ------------------------------------------------------------------------


def uncached_config(demo_url: str) -> str:
    return f"""
[upstreams.good]
url = "{demo_url}/profile/{{user_id}}?delay=0.2"
timeout = 5.0
cache_ttl = 0

[aggregates.plain]
path = "/api/plain"
sources = ["good"]
params = {{ user_id = "int" }}
"""


def requests_per_worker(shared: Path) -> dict[str, float]:
    """aggregator_requests_total of each worker's own counter file (pid -> count)."""
    counts: dict[str, float] = {}
    for path in shared.glob("counter_*.db"):
        merged = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
        counts[path.stem.removeprefix("counter_")] = sum(
            s.value for m in merged for s in m.samples if s.name == "aggregator_requests_total"
        )
    return counts


async def _burst(url: str, n: int, first_id: int) -> None:
    """`n` concurrent requests, each on its own connection (so both workers may accept)."""

    async def one(user_id: int) -> None:
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=20) as http:
            r = await http.get("/api/plain", params={"user_id": user_id})
            assert r.status_code == 200, r.text

    await asyncio.gather(*(one(first_id + i) for i in range(n)))


async def drive_both_workers(url: str, shared: Path) -> int:
    """Send bursts until each of the two workers has answered some; how many were sent."""
    sent = 0
    for _ in range(10):
        await _burst(url, 12, sent)
        sent += 12
        if sum(1 for n in requests_per_worker(shared).values() if n) >= 2:
            return sent
    pytest.fail(f"one worker answered all {sent} requests: {requests_per_worker(shared)}")


@pytest.mark.integration
async def test_two_workers_sharing_a_multiprocess_dir_report_summed_counts(
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))  # the workers inherit it
    server = serve(write_config(uncached_config(demo.url)), workers=2, admin_token=TOKEN)
    sent = await drive_both_workers(server.url, shared)
    for _ in range(3):  # whichever worker answers the scrape, it reports both
        s = scrape(server.url)
        assert value(s, "aggregator_requests_total", aggregate="plain", status="200") == sent
        assert value(s, "aggregator_source_duration_seconds_count", source="good") == sent
        assert value(s, "aggregator_requests_in_flight") == 0


@contextlib.contextmanager
def aggregator_serve(
    tmp_path: Path, config: Path, *args: str, env: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`aggregator serve` in a subprocess (its own parent process, as in production)."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    full_env.update(env)
    log = tmp_path / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "aggregator", "serve", "--config", str(config)]
    cmd += ["--bind", f"127.0.0.1:{port}", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, proc, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.integration
async def test_serve_gives_several_workers_a_private_dir_and_a_metrics_listener(
    demo: DemoProcess, write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    listen = f"127.0.0.1:{free_port()}"
    env = {
        "TMPDIR": str(scratch),  # where the private directory is made
        "AGGREGATOR_METRICS_BIND": listen,
        "AGGREGATOR_ADMIN_TOKEN": TOKEN,
        "AGGREGATOR_CACHE_TYPE": "filesystem",
        "AGGREGATOR_CACHE_DIR": str(tmp_path / "cache"),
    }
    config = write_config(uncached_config(demo.url))
    with aggregator_serve(tmp_path, config, "--workers", "2", env=env) as (url, _, log):
        (shared,) = scratch.glob("aggregator-metrics-*")
        sent = await drive_both_workers(url, shared)
        listener = httpx.get(f"http://{listen}/metrics", trust_env=False, timeout=10)
        assert listener.status_code == 200  # no token: a private bind is the protection
        by_listener = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(listener.text)
            for s in family.samples
        }
        plain = {"aggregate": "plain", "status": "200"}
        for samples in (by_listener, scrape(url)):  # the parent's listener and a worker agree
            assert value(samples, "aggregator_requests_total", **plain) == sent
            # merged over the workers (livemax): one 0/1 series per breaker state
            for state, is_in in (("closed", 1), ("half_open", 0), ("open", 0)):
                assert (
                    value(samples, "aggregator_circuit_state", source="good", state=state) == is_in
                )
        assert f"metrics: http://{listen}/metrics" in log.read_text()
    assert not list(scratch.glob("aggregator-metrics-*"))  # removed at exit
    assert "Traceback" not in log.read_text()


@pytest.mark.integration
def test_serve_empties_the_operators_dir_and_workers_mark_themselves_dead(
    demo: DemoProcess, write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    shared = tmp_path / "prometheus"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"left by an earlier run")
    (shared / "README").write_text("not ours: kept")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared), "AGGREGATOR_ADMIN_TOKEN": TOKEN}
    config = write_config(uncached_config(demo.url))
    with aggregator_serve(tmp_path, config, env=env) as (url, _, _):
        assert not (shared / "counter_999999.db").exists()
        r = httpx.get(f"{url}/api/plain", params={"user_id": 1}, trust_env=False, timeout=10)
        assert r.status_code == 200
        samples = scrape(url)
        assert value(samples, "aggregator_requests_total", aggregate="plain", status="200") == 1
        assert list(shared.glob("gauge_livesum_*.db"))  # the worker's in-flight gauge
    assert (shared / "README").exists()
    assert list(shared.glob("counter_*.db"))  # counters outlive their worker (they are totals)
    assert not list(shared.glob("gauge_live*_*.db"))  # the stopped worker left the live sums


# -- exposure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "headers", "status"),
    [
        pytest.param({"admin_token": TOKEN}, AUTH, 200, id="token"),
        pytest.param({"admin_token": TOKEN}, {}, 401, id="token-missing"),
        pytest.param(
            {"admin_token": TOKEN}, {"Authorization": "Bearer wrong"}, 401, id="token-wrong"
        ),
        pytest.param({}, AUTH, 404, id="no-token-configured"),
        pytest.param({"admin_token": ""}, {"Authorization": "Bearer "}, 404, id="empty-token"),
        pytest.param({"metrics": "public"}, {}, 200, id="public"),
        pytest.param({"metrics": "off", "admin_token": TOKEN}, AUTH, 404, id="off"),
    ],
)
def test_who_may_read_the_metrics(config_path, settings, headers, status):
    app = create_app(Settings(config=config_path, **settings))
    r = app.test_client().get("/metrics", headers=headers)
    assert r.status_code == status, r.get_data(as_text=True)
    if status == 200:
        assert r.mimetype == "text/plain"
        assert "aggregator_requests_total" in r.get_data(as_text=True)
    else:
        assert r.get_json()["error"]  # the one JSON error shape
    if status == 401:
        assert r.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="nobody-can-read-them"),
        pytest.param({"metrics": "off", "admin_token": TOKEN}, id="off"),
    ],
)
def test_metrics_nobody_can_read_are_not_recorded(config_path, settings):
    settings = Settings(config=config_path, **settings)
    app = create_app(settings)
    assert engine_of(app).metrics is metrics.OFF
    assert engine_of(app).cache.metrics is metrics.OFF
    assert ASGIAdapter(app, settings)._timed == {}  # the adapter skips even the timer


def test_readable_metrics_are_recorded(config_path):
    settings = Settings(config=config_path, metrics_bind="127.0.0.1:9100")
    app = create_app(settings)
    assert isinstance(engine_of(app).metrics, metrics.PrometheusRecorder)
    assert set(ASGIAdapter(app, settings)._timed) == {"/api/five"}


def test_several_workers_without_a_multiprocess_dir_are_refused(config_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    settings = Settings(config=config_path, workers=2, admin_token=TOKEN, cache_type="filesystem")
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR"):
        create_app(settings)
    create_app(settings.model_copy(update={"metrics": "off"}))  # nothing recorded: fine


def test_a_multiprocess_dir_that_is_not_a_directory_is_refused(config_path, monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a writable directory"):
        create_app(Settings(config=config_path, admin_token=TOKEN))


@pytest.mark.parametrize("bind", ["9100", "localhost", ":9100", "host:99999", "host:x"])
def test_a_bad_metrics_bind_is_a_settings_error(bind):
    with pytest.raises(SettingsError, match="is not host:port"):
        Settings(metrics_bind=bind)


def test_command_line_tools_build_apps_that_record_nothing(config_path, tmp_path, monkeypatch):
    """warm (direct) and cache purge build the app in their own process: not a server, so no
    metrics (with the servers' settings, several workers, it would refuse to start)."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    settings = Settings(
        config=config_path,
        workers=4,
        admin_token=TOKEN,
        cache_type="filesystem",
        cache_dir=tmp_path / "cache",
    )
    config = parse_config(config_path.read_text(), str(config_path))
    assert ops_purge.purge_cache(settings, config, aggregate="five", params=None, upstream=None)
    report = warm_run._run_direct(settings, config, (), RunOptions(), PlainReporter(io.StringIO()))
    assert report is not None


# -- the recorder -------------------------------------------------------------------------------


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_source_results_count_calls_errors_and_refusals_apart():
    config = parse_config(
        '[upstreams.u]\nurl = "http://127.0.0.1:9/u"\n'
        '[aggregates.a]\npath = "/a"\nsources = ["u"]\n',
        "t",
    )
    recorder = metrics.PrometheusRecorder(config)
    watched = [
        ("aggregator_source_duration_seconds_count", {"source": "u"}),
        ("aggregator_source_errors_total", {"source": "u", "kind": "timeout"}),
        ("aggregator_source_errors_total", {"source": "u", "kind": "circuit_open"}),
        ("aggregator_source_errors_total", {"source": "u", "kind": "dependency"}),
    ]
    before = [_sample(name, **labels) for name, labels in watched]
    recorder.sources(
        [
            SourceResult("u", "ok", 12.0),
            SourceResult("u", "ok", 0.1, cache="hit"),  # from the source cache: no call
            SourceResult("u", "timeout", 800.0),
            SourceResult("u", "circuit_open", 0.0),  # refused: an error, not a call
            SourceResult("u", "dependency", 0.0),  # what it needed was missing: not called
        ]
    )
    after = [_sample(name, **labels) for name, labels in watched]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1, 1]


def test_the_breaker_reports_each_state_change_once():
    now = [0.0]
    seen: list[BreakerState] = []
    breaker = CircuitBreaker(2, 5.0, clock=lambda: now[0], on_change=seen.append)
    for _ in range(3):  # the third failure finds it open already: no new report
        permit = breaker.acquire()
        if permit is not None:
            breaker.record(permit, failed=True)
    now[0] = 6.0
    probe = breaker.acquire()
    assert probe is not None and probe.probe
    breaker.record(probe, failed=False)
    permit = breaker.acquire()
    assert permit is not None
    breaker.record(permit, failed=False)  # closed stays closed: no report
    assert seen == ["open", "half_open", "closed"]


def test_the_circuit_gauge_follows_the_breaker():
    config = parse_config(
        '[upstreams.g]\nurl = "http://127.0.0.1:9/g"\n'
        '[aggregates.a]\npath = "/a"\nsources = ["g"]\n',
        "t",
    )
    listener = metrics.PrometheusRecorder(config).circuit_listener("g")
    assert listener is not None

    def states() -> dict[str, float]:
        return {
            state: _sample("aggregator_circuit_state", source="g", state=state)
            for state in ("closed", "half_open", "open")
        }

    assert states() == {"closed": 1, "half_open": 0, "open": 0}  # one 0/1 series per state
    listener("open")
    assert states() == {"closed": 0, "half_open": 0, "open": 1}
    listener("half_open")
    assert states() == {"closed": 0, "half_open": 1, "open": 0}
    assert metrics.OFF.circuit_listener("g") is None


@pytest.mark.integration
def test_the_metrics_listener_answers_with_one_worker(
    demo: DemoProcess, write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    # One worker (the default) is served in `aggregator serve`'s own process: the listener
    # there must read that process's numbers (it answered 200 with an empty body).
    listen = f"127.0.0.1:{free_port()}"
    env = {"AGGREGATOR_METRICS_BIND": listen}  # no token: the listener alone turns metrics on
    config = write_config(uncached_config(demo.url))
    with aggregator_serve(tmp_path, config, env=env) as (url, _, log):
        for user in range(3):
            r = httpx.get(f"{url}/api/plain", params={"user_id": user}, trust_env=False)
            assert r.status_code == 200
        listener = httpx.get(f"http://{listen}/metrics", trust_env=False, timeout=10)
        assert listener.status_code == 200 and listener.text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(listener.text)
            for s in family.samples
        }
        assert value(samples, "aggregator_requests_total", aggregate="plain", status="200") == 3
        assert f"metrics: http://{listen}/metrics" in log.read_text()
    assert "Traceback" not in log.read_text()
