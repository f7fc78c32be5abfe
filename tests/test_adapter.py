"""The ASGI adapter in-process: greenlet bridge semantics, pools, lifespan, limits, disconnects."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import abort, g, request

from aggregator import create_app
from aggregator.engine import current_engine, engine_of
from aggregator.serving import AggregatorFlask, ASGIAdapter
from aggregator.settings import Mode, Settings

MODES: list[Mode] = ["loop", "threads"]


def _probe_app(config_path: Path, mode: Mode, **settings: Any) -> ASGIAdapter:
    """The real app plus a few probe routes that report what they saw."""
    app = create_app(Settings(config=config_path, mode=mode, **settings))

    @app.before_request
    async def remember() -> None:
        g.seen_by_hook = request.args.get("tag", "")

    @app.get("/probe/async")
    async def probe_async() -> dict[str, Any]:
        before = request.args.get("tag")
        await asyncio.sleep(0.01)
        return {
            "before": before,
            "after": request.args.get("tag"),
            "hook": g.seen_by_hook,
            "loop": id(asyncio.get_running_loop()),
            "shared_client": current_engine().clients.shared() is not None,
        }

    @app.get("/probe/sync")
    def probe_sync() -> dict[str, Any]:
        time.sleep(float(request.args.get("sleep", "0")))
        return {"thread": threading.current_thread().name, "tag": request.args.get("tag")}

    @app.get("/probe/sync-calls-async")
    def probe_sync_calls_async() -> dict[str, Any]:
        async def inner() -> int:
            await asyncio.sleep(0)
            assert request.args.get("tag") == "ctx"  # request context crossed over
            return id(asyncio.get_running_loop())

        return {"loop": app.ensure_sync(inner)()}

    @app.get("/probe/loop")
    async def probe_loop() -> dict[str, int]:
        return {"loop": id(asyncio.get_running_loop())}

    @app.get("/probe/abort")
    async def probe_abort() -> str:
        await asyncio.sleep(0)
        abort(418)

    @app.get("/probe/boom")
    async def probe_boom() -> str:
        await asyncio.sleep(0)
        raise ValueError("secret internals")

    return ASGIAdapter(app, Settings(config=config_path, mode=mode, **settings))


def _client(adapter: ASGIAdapter) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's ASGI types
    return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
async def test_async_view_keeps_request_context_and_shared_client(config_path, mode):
    adapter = _probe_app(config_path, mode)
    async with adapter.lifespan(), _client(adapter) as client:
        r = await client.get("/probe/async", params={"tag": "t1"})
        loop = (await client.get("/probe/loop")).json()["loop"]
    assert r.status_code == 200
    body = r.json()
    assert body["before"] == body["after"] == body["hook"] == "t1"
    # the view ran on the server loop, where the lifespan opened the shared client
    assert body["loop"] == loop == id(asyncio.get_running_loop())
    assert body["shared_client"] is True


@pytest.mark.integration
async def test_loop_mode_runs_def_views_in_the_pool_without_blocking_the_loop(config_path):
    adapter = _probe_app(config_path, "loop")
    async with adapter.lifespan(), _client(adapter) as client:
        started = time.perf_counter()
        responses = await asyncio.gather(
            *[client.get("/probe/sync", params={"sleep": "0.5", "tag": str(i)}) for i in range(4)]
        )
        elapsed = time.perf_counter() - started
    assert [r.json()["tag"] for r in responses] == ["0", "1", "2", "3"]
    assert all(r.json()["thread"].startswith("aggregator-view") for r in responses)
    assert elapsed < 1.5, elapsed  # together ~0.5 s; serial on the loop would take 2 s


@pytest.mark.integration
async def test_def_view_calling_async_code_uses_the_server_loop(config_path):
    adapter = _probe_app(config_path, "loop")
    async with adapter.lifespan(), _client(adapter) as client:
        r = await client.get("/probe/sync-calls-async", params={"tag": "ctx"})
    assert r.status_code == 200
    assert r.json()["loop"] == id(asyncio.get_running_loop())


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
async def test_errors_in_async_views_reach_flask_handlers_as_json(config_path, mode):
    adapter = _probe_app(config_path, mode)
    async with adapter.lifespan(), _client(adapter) as client:
        teapot = await client.get("/probe/abort")
        boom = await client.get("/probe/boom")
    assert teapot.status_code == 418
    assert teapot.json()["error"] == "I'm a teapot"
    assert boom.status_code == 500
    assert boom.headers["content-type"] == "application/json"
    assert "secret internals" not in boom.text
    assert "Traceback" not in boom.text


@pytest.mark.integration
@pytest.mark.parametrize("mode", MODES)
async def test_aggregate_through_asgi(config_path, mode):
    adapter = _probe_app(config_path, mode)
    async with adapter.lifespan(), _client(adapter) as client:
        r = await client.get("/api/five", params={"city": "Paris", "user_id": "7"})
    assert r.status_code == 200
    assert r.headers["x-aggregate-complete"] == "true"
    assert set(r.json()["data"]) == {"weather", "stocks", "news", "profile", "recommendations"}
    timing = r.headers["server-timing"]
    assert timing.count("dur=") == 7  # five sources, cache and total
    assert "cache;" in timing and "total;dur=" in timing


async def _asgi_call(
    adapter: ASGIAdapter, scope: dict[str, Any], messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Drive one raw ASGI call; `messages` are what receive() returns, in order, then it blocks."""
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            item = queue.pop(0)
            if "sleep" in item:
                await asyncio.sleep(item["sleep"])
                return item["then"]  # type: ignore[no-any-return]
            return item
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await adapter(scope, receive, send)  # type: ignore[arg-type]
    return sent


def _http_scope(path: str, query: bytes = b"", headers: list[Any] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST" if headers else "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers or [],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def test_lifespan_protocol_opens_and_closes_the_shared_client(config_path):
    adapter = create_app_adapter(config_path)
    sent = await _asgi_call(
        adapter,
        {"type": "lifespan", "asgi": {"version": "3.0"}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert engine_of(adapter.app).clients.shared() is None  # closed and forgotten at shutdown


@pytest.mark.parametrize(("threshold", "tuned"), [(12_345, True), (0, False)])
async def test_a_servers_lifespan_tunes_the_collector(config_path, threshold, tuned):
    before = gc.get_threshold()
    adapter = create_app_adapter(config_path, gc_threshold=threshold)
    sent = await _asgi_call(
        adapter,
        {"type": "lifespan", "asgi": {"version": "3.0"}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert sent[0]["type"] == "lifespan.startup.complete"
    if tuned:
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > 0  # start-up objects no longer walked by collections
    else:
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0


async def test_in_process_lifespans_leave_the_collector_alone(config_path):
    before = gc.get_threshold()
    async with create_app_adapter(config_path, gc_threshold=12_345).lifespan():
        assert gc.get_threshold() == before  # only a server's lifespan protocol tunes it


def create_app_adapter(config_path: Path, **settings: Any) -> ASGIAdapter:
    return ASGIAdapter(
        create_app(Settings(config=config_path, **settings)),
        Settings(config=config_path, **settings),
    )


@pytest.mark.parametrize(
    ("headers", "chunks"),
    [
        pytest.param([(b"content-length", b"2048")], [b"x" * 2048], id="declared-length"),
        pytest.param([(b"transfer-encoding", b"chunked")], [b"x" * 600] * 4, id="streamed"),
    ],
)
async def test_request_body_over_the_limit_is_413_before_buffering(config_path, headers, chunks):
    adapter = create_app_adapter(config_path, max_request_body=1024)
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent = await _asgi_call(adapter, _http_scope("/healthz", headers=headers), messages)
    assert sent[0]["status"] == 413
    assert b"larger than 1024 bytes" in sent[1]["body"]


@pytest.mark.parametrize("mode", ["loop", "threads", "serial"])
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b"x-a", b"1")] * 101, id="count"),
        pytest.param([(b"x-big", b"a" * 16 * 1024)], id="bytes"),
    ],
)
async def test_too_many_or_too_large_headers_are_431_in_every_mode(config_path, mode, headers):
    adapter = create_app_adapter(config_path, mode=mode)
    scope = _http_scope("/healthz") | {"headers": headers}
    sent = await _asgi_call(adapter, scope, [{"type": "http.request", "body": b""}])
    assert sent[0]["status"] == 431
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"] == "Request Header Fields Too Large"


@pytest.mark.parametrize("mode", ["loop", "threads"])
@pytest.mark.parametrize(
    ("headers", "messages"),
    [
        pytest.param([(b"content-length", b"10")], [], id="declared-never-sent"),
        pytest.param(
            [(b"transfer-encoding", b"chunked")],
            [{"type": "http.request", "body": b"{", "more_body": True}],
            id="streamed-then-stalled",
        ),
    ],
)
async def test_a_stalled_body_is_408_after_the_body_timeout(config_path, mode, headers, messages):
    adapter = create_app_adapter(config_path, mode=mode, request_body_timeout=0.2)
    sent = await _asgi_call(adapter, _http_scope("/admin/purge", headers=headers), messages)
    assert sent[0]["status"] == 408
    assert b"within 0.2 s" in sent[1]["body"]


async def test_websocket_is_refused(config_path):
    adapter = create_app_adapter(config_path)
    sent = await _asgi_call(adapter, {"type": "websocket", "path": "/"}, [])
    assert sent == [{"type": "websocket.close", "code": 1003, "reason": None}]


@pytest.mark.integration
async def test_client_disconnect_cancels_the_fan_out(demo, write_config):
    slow = write_config(
        f"""
[upstreams.slow]
url = "{demo.url}/weather/{{city}}?delay=3"
timeout = 5

[aggregates.slow]
path = "/slow"
sources = ["slow"]
params = {{ city = "str" }}
"""
    )
    adapter = create_app_adapter(slow)
    async with adapter.lifespan():
        started = time.perf_counter()
        sent = await _asgi_call(
            adapter,
            _http_scope("/slow", b"city=Paris"),
            [
                {"type": "http.request", "body": b"", "more_body": False},
                {"sleep": 0.3, "then": {"type": "http.disconnect"}},
            ],
        )
        elapsed = time.perf_counter() - started
        client = engine_of(adapter.app).clients.shared()
        assert client is not None
        # the upstream call was cancelled, not left running: the pool is empty again
        connector = client._transport.client.connector  # type: ignore[attr-defined]
        assert len(connector._acquired) == 0
    assert sent == []  # nobody to answer
    assert elapsed < 2.0  # did not wait for the 3 s upstream


def test_flask_app_type_is_the_bridge(app):
    assert isinstance(app, AggregatorFlask)


async def test_a_def_view_routed_from_two_rules_is_one_endpoint_run_in_the_pool(config_path):
    # Swagger UI's blueprint routes "/" and "/<path>" to one `def` view; wrapping it twice
    # made Flask refuse the second rule ("overwriting an existing endpoint function").
    flask_app = create_app(Settings(config=config_path))

    def where(path: str = "") -> dict[str, str]:
        return {"path": path, "thread": threading.current_thread().name}

    flask_app.add_url_rule("/two", "two", where)
    flask_app.add_url_rule("/two/<path:path>", "two", where)
    adapter = ASGIAdapter(flask_app, Settings(config=config_path))
    async with adapter.lifespan(), _client(adapter) as client:
        root, sub = await client.get("/two"), await client.get("/two/x")
    assert (root.json()["path"], sub.json()["path"]) == ("", "x")
    assert sub.json()["thread"].startswith("aggregator-view")
