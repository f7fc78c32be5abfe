"""Log lines: the request id in each, text or JSON, one per upstream call (DEBUG), one per request.

The integration tests read a real Hypercorn server's stderr (the `serve` fixture's log file).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from logging.handlers import QueueHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from pydantic import ValidationError

from aggregator import create_asgi_app_or_exit
from aggregator.config import parse_config
from aggregator.context import request_id
from aggregator.demo.process import DemoProcess
from aggregator.log import build_handler, configure_logging
from aggregator.settings import Settings
from aggregator.upstream import client as upstream
from tests.support.configs import traced_config
from tests.support.servers import Server


@pytest.fixture
def aggregator_logger() -> Iterator[logging.Logger]:
    """The `aggregator` logger, restored afterwards (configure_logging changes it globally)."""
    logger = logging.getLogger("aggregator")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers.clear()
    # pytest attaches its capture handlers to loggers that do not propagate when a test phase
    # starts; an earlier configure_logging left this one so.
    logger.propagate = True
    yield logger
    for handler in logger.handlers:
        if isinstance(handler, QueueHandler):
            handler.listener.stop()  # type: ignore[attr-defined]  # ours carry their writer
    logger.handlers[:], logger.level, logger.propagate = saved


def _emit(handler: logging.Handler, rid: str | None, *args: Any, **kwargs: Any) -> str:
    """Log one record through `handler` (as request `rid`) and return what it wrote."""
    stream = io.StringIO()
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logger = logging.getLogger("aggregator.test")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    token = request_id.set(rid)
    try:
        logger.info(*args, **kwargs)
    finally:
        request_id.reset(token)
        logger.removeHandler(handler)
    return stream.getvalue()


# -- formats (unit) -------------------------------------------------------------------------------


def test_text_lines_carry_the_request_id() -> None:
    assert "INFO aggregator.test [abc-1] hello 7\n" in _emit(
        build_handler("text"), "abc-1", "hello %d", 7
    )
    assert "INFO aggregator.test [-] outside\n" in _emit(build_handler("text"), None, "outside")


def test_json_lines_are_one_object_with_the_fields_and_extras() -> None:
    line = _emit(build_handler("json"), "abc-1", "GET %s", "/x", extra={"status": 200, "ms": 1.5})
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record["message"] == "GET /x"
    assert record["level"] == "INFO"
    assert record["logger"] == "aggregator.test"
    assert record["request_id"] == "abc-1"
    assert record["status"] == 200 and record["ms"] == 1.5
    assert datetime.fromisoformat(record["time"]).tzinfo is not None  # ISO 8601, UTC


def test_json_outside_a_request_has_a_null_id_and_keeps_exceptions_on_one_line() -> None:
    handler = build_handler("json")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        line = _emit(handler, None, "failed", exc_info=True)
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record["request_id"] is None
    assert "ValueError: boom" in record["exc_info"]


def test_configure_logging_reads_format_and_level_from_the_environment(
    aggregator_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGGREGATOR_LOG_FORMAT", "JSON")
    monkeypatch.setenv("AGGREGATOR_LOG_LEVEL", "debug")
    configure_logging()
    (front,) = aggregator_logger.handlers
    (writer,) = front.listener.handlers  # type: ignore[attr-defined]
    assert aggregator_logger.level == logging.DEBUG
    assert type(writer.formatter).__name__ == "JsonFormatter"
    assert not aggregator_logger.propagate


class _StuckStream(io.StringIO):
    """A stderr whose reader has stopped reading: every write blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


def test_a_blocked_stderr_never_blocks_the_caller(aggregator_logger: logging.Logger) -> None:
    configure_logging("INFO", "json")
    (front,) = aggregator_logger.handlers
    (writer,) = front.listener.handlers  # type: ignore[attr-defined]
    stuck = _StuckStream()
    writer.setStream(stuck)
    token = request_id.set("rid-queued")
    try:
        began = time.perf_counter()
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("aggregator.test").exception("while %s", "stuck")
        took = time.perf_counter() - began
    finally:
        request_id.reset(token)
    stuck.release.set()
    front.listener.stop()  # type: ignore[attr-defined]  # drains the queue
    aggregator_logger.handlers.clear()
    assert took < 0.5  # the write waited; the caller did not
    line = json.loads(stuck.getvalue())
    # read in the caller's context, merged before queueing, exception kept as its own field
    assert line["request_id"] == "rid-queued" and line["message"] == "while stuck"
    assert "ValueError: boom" in line["exc_info"]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("log_format", "JSON", "json"),
        ("log_format", "text", "text"),
        ("log_level", "debug", "DEBUG"),
    ],
)
def test_settings_accept_log_values_in_any_case(name: str, value: str, expected: str) -> None:
    assert getattr(Settings.model_validate({name: value}), name) == expected


@pytest.mark.parametrize(("name", "value"), [("LOG_FORMAT", "xml"), ("LOG_LEVEL", "loud")])
def test_a_bad_log_setting_stops_start_up_with_its_name(
    aggregator_logger: logging.Logger,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
) -> None:
    monkeypatch.setenv(f"AGGREGATOR_{name}", value)
    configure_logging()  # as asgi.py does first: falls back quietly...
    with pytest.raises(SystemExit):
        create_asgi_app_or_exit()  # ...and the settings refuse it, readably
    err = capsys.readouterr().err
    assert f"AGGREGATOR_{name}={value!r}" in err and "Traceback" not in err  # the variable
    with pytest.raises(ValidationError):
        Settings.model_validate({name.lower(): value})


@pytest.mark.respx(base_url="http://upstream.test")
async def test_upstream_call_lines_cost_nothing_when_debug_is_off(
    respx_mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(upstream, "_log_call", lambda *args: calls.append(args))
    respx_mock.get("/weather/Oslo").respond(json={"city": "Oslo"})
    config = parse_config(
        '[upstreams.w]\nurl = "http://upstream.test/weather/Oslo"\n'
        '[aggregates.a]\npath = "/a"\nsources = ["w"]\n',
        "t.toml",
    )
    logger = logging.getLogger("aggregator.upstream")
    saved = logger.level
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            for level, expected in [(logging.INFO, 0), (logging.DEBUG, 1)]:
                logger.setLevel(level)
                calls.clear()
                up = config.upstreams["w"]
                result = await upstream.fetch(client, "w", up, {}, max_body=10**6)
                assert result.ok
                assert len(calls) == expected
    finally:
        logger.setLevel(saved)


# -- a real server's stderr -----------------------------------------------------------------------


def _records(server: Server, until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The server's JSON log lines, once `until` holds (lines are written after the answer)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in server.log().splitlines() if line.startswith("{")]
        records = [json.loads(line) for line in lines]  # every JSON-looking line must parse
        if until(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def _wait_for(server: Server, text: str) -> str:
    deadline = time.monotonic() + 10
    while text not in (log := server.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return log


@pytest.mark.integration
def test_json_debug_logs_of_a_real_server(
    demo: DemoProcess, write_config: Callable[[str], Path], serve: Callable[..., Server]
) -> None:
    # echo answers after 0.1 s, weather after 0.02 s: the logged call times must cover that.
    config = write_config(traced_config(demo.url, delay=0.1))
    server = serve(config, log_level="DEBUG", log_format="json")
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        for path, rid, status in [
            ("/api/traced?city=Paris", "miss-1", 200),
            ("/api/traced?city=Paris", "hit-2", 200),
            ("/api/flaky", "retry-3", 502),  # its only source failed
            ("/sync-pool/api/traced?city=Paris", "pool-4", 200),
        ]:
            assert client.get(path, headers={"X-Request-ID": rid}).status_code == status

    def access(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {r["request_id"]: r for r in records if r["logger"] == "aggregator.access"}

    records = _records(server, lambda rs: "pool-4" in access(rs))
    lines = access(records)
    miss = lines["miss-1"]
    assert miss["level"] == "INFO"
    assert miss["message"].startswith("GET /api/traced?city=Paris 200 ")
    assert (miss["method"], miss["path"], miss["status"], miss["cache"]) == (
        "GET",
        "/api/traced?city=Paris",
        200,
        "MISS",
    )
    assert miss["ms"] >= 100 and miss["bytes"] > 0 and miss["client"] == "127.0.0.1"
    assert lines["hit-2"]["cache"] == "HIT"  # the fast path before Flask logs too
    assert lines["pool-4"]["cache"] == "-"

    calls = [r for r in records if r["logger"] == "aggregator.upstream" and "source" in r]
    assert all(r["level"] == "DEBUG" and r["request_id"] for r in calls)

    def of(rid: str) -> list[tuple[Any, ...]]:
        return sorted(
            (r["source"], r["attempt"], r["outcome"], r["http_status"], r["error"])
            for r in calls
            if r["request_id"] == rid
        )

    assert of("miss-1") == [("echo", 1, "ok", None, None), ("weather", 1, "ok", None, None)]
    assert of("hit-2") == []  # answered from the cache
    assert of("retry-3") == [("flaky", n, "http_status", 503, "http_status") for n in (1, 2, 3)]
    assert of("pool-4") == of("miss-1")  # calls made in the sync twin's pool threads
    least = {"echo": 100, "weather": 20, "flaky": 0}  # ms: each source's delay at the demo
    took = [(r["source"], r["ms"]) for r in calls]
    assert all(least[source] <= ms < least[source] + 5000 for source, ms in took), took


@pytest.mark.integration
def test_text_info_logs_of_a_real_server(
    demo: DemoProcess, write_config: Callable[[str], Path], serve: Callable[..., Server]
) -> None:
    server = serve(write_config(traced_config(demo.url)), admin_token="s3cret-token")
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        client.get("/api/traced?city=Paris", headers={"X-Request-ID": "text-1"})
        client.post(
            "/admin/purge",
            json={"aggregate": "traced"},
            headers={"X-Request-ID": "adm-2", "Authorization": "Bearer wrong"},
        )
        client.get("/nowhere%0A2026-01-01 INFO forged", headers={"X-Request-ID": "inj-3"})
    log = _wait_for(server, "[inj-3]")
    assert "INFO aggregator.access [text-1] GET /api/traced?city=Paris 200 " in log
    assert "cache=MISS" in log
    # A line logged by a Flask view carries its request's id.
    assert "WARNING aggregator.views.admin [adm-2] admin request refused (wrong token)" in log
    # The path is logged as sent: an encoded line break stays encoded, so no line is forged.
    assert "[inj-3] GET /nowhere%0A2026-01-01%20INFO%20forged 404 " in log
    assert "\nforged" not in log and "\n2026-01-01 INFO forged" not in log
    assert "upstream echo attempt" not in log  # DEBUG is off
    assert '"GET /api/traced' not in log  # Hypercorn's own access log is off: one line each
