"""Any Flask app served by our adapter: `to_asgi` in each mode (the bridge given in place, limits,
overload, ids, drain, with an engine or none), `--app` references, and over the wire `serve
--app`, `hypercorn module:asgi_app`, SIGTERM and bad references."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from flask import Flask, g, request

import aggregator
from aggregator import create_app, to_asgi
from aggregator.demo.process import free_port
from aggregator.engine import engine_of, find_engine
from aggregator.errors import AppRefError
from aggregator.ops import serve as serve_module
from aggregator.serving import AggregatorFlask, ASGIAdapter, FlaskBridge, appref
from aggregator.serving.bridge import bridge
from aggregator.settings import Mode, Settings
from tests.support import own_app
from tests.support.paths import ROOT
from tests.support.servers import Server, get_fresh, start_own_app

SHIPPED = tomllib.loads((ROOT / "hypercorn.toml").read_text())


def _plain_app() -> Flask:
    """A plain Flask app, no engine: an async hook, an async view, a `def` view, one that fails."""
    app = Flask("plain")

    @app.before_request
    async def tag() -> None:  # Flask runs it through ensure_sync: the bridge must reach it
        await asyncio.sleep(0)
        g.tag = request.args.get("tag", "")

    @app.get("/async")
    async def slow_async() -> dict[str, Any]:
        await asyncio.sleep(float(request.args.get("delay", "0")))
        return {"tag": g.tag, "loop": id(asyncio.get_running_loop())}

    @app.get("/sync")
    def slow_sync() -> dict[str, Any]:
        time.sleep(float(request.args.get("delay", "0")))
        return {"tag": g.tag, "thread": threading.current_thread().name}

    @app.get("/boom")
    async def boom() -> str:
        raise RuntimeError(own_app.SECRET)

    return app


def _client(adapter: ASGIAdapter) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's ASGI types
    return httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30)


async def _timed_burst(
    client: httpx.AsyncClient, url: str, n: int, **params: str
) -> tuple[float, list[httpx.Response]]:
    """`n` concurrent GETs of `url` with `params`, each tagged with its index."""
    started = time.perf_counter()
    responses = await asyncio.gather(
        *[client.get(url, params={**params, "tag": str(i)}) for i in range(n)]
    )
    return time.perf_counter() - started, list(responses)


# -- to_asgi in-process ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["loop", "threads", "serial"])
async def test_to_asgi_serves_a_plain_flask_app_in_each_mode(mode: Mode) -> None:
    adapter = to_asgi(_plain_app(), mode=mode)
    assert adapter.mode == mode and adapter.engine is None
    async with adapter.lifespan(), _client(adapter) as client:
        elapsed, responses = await _timed_burst(client, "/async", 8, delay="0.2")
        echoed = await client.get("/async", headers={"X-Request-ID": "own-app-1"})
        boom = await client.get("/boom")
    assert [r.status_code for r in responses] == [200] * 8
    # The async before_request hook ran for each request, in its own request context.
    assert [r.json()["tag"] for r in responses] == [str(i) for i in range(8)]
    assert all(len(r.headers["x-request-id"]) >= 16 for r in responses)
    assert echoed.headers["x-request-id"] == "own-app-1"
    if mode == "serial":
        assert elapsed > 8 * 0.2 * 0.8, elapsed  # asgiref's stock recipe: one at a time
    else:
        assert elapsed < 1.0, elapsed  # together ~0.2 s; one after another 1.6 s
        # awaited on the loop the server (here: this test) runs
        assert {r.json()["loop"] for r in responses} == {id(asyncio.get_running_loop())}
    assert boom.status_code == 500  # Flask's own 500 page: the app has no JSON handler
    assert own_app.SECRET not in boom.text and "Traceback" not in boom.text


async def test_loop_mode_runs_a_plain_apps_def_views_in_the_pool_even_those_added_later() -> None:
    app = _plain_app()
    adapter = to_asgi(app, mode="loop")

    @app.get("/late")
    def late() -> dict[str, str]:  # registered after to_asgi(): bridged all the same
        return {"thread": threading.current_thread().name}

    async with adapter.lifespan(), _client(adapter) as client:
        started = time.perf_counter()
        sleepers = [
            asyncio.create_task(client.get("/sync", params={"delay": "0.6", "tag": str(i)}))
            for i in range(4)
        ]
        await asyncio.sleep(0.05)
        quick, _ = await _timed_burst(client, "/async", 4, delay="0.05")
        still_sleeping = not any(task.done() for task in sleepers)
        slept = [await task for task in sleepers]
        total = time.perf_counter() - started
        later = await client.get("/late")
    assert still_sleeping and quick < 0.4, quick  # the loop kept serving while they slept
    assert [r.json()["tag"] for r in slept] == ["0", "1", "2", "3"]
    assert all(r.json()["thread"].startswith("aggregator-view") for r in slept)
    assert total < 1.3, total  # the four sleeps overlapped in the pool
    assert later.json()["thread"].startswith("aggregator-view")


def test_the_bridge_is_given_in_place_once_and_keeps_the_apps_own_class() -> None:
    class MyFlask(Flask):
        def marker(self) -> str:
            return "mine"

    app = MyFlask("mine")

    @app.get("/sync")
    def view() -> str:
        return threading.current_thread().name

    adapter = to_asgi(app)
    assert adapter.app is cast(Any, app)  # the very object the developer holds
    assert isinstance(app, MyFlask) and isinstance(app, FlaskBridge)
    assert type(app).__name__ == "MyFlask" and app.marker() == "mine"
    wrapped = app.view_functions["view"]
    assert wrapped is not view and getattr(wrapped, "__wrapped__", None) is view
    kind: type = type(app)
    to_asgi(app, mode="threads")  # a second wrapping: same class, the view wrapped once
    assert type(app) is kind and app.view_functions["view"] is wrapped
    app.add_url_rule("/again", view_func=view)  # the same view on another rule: one endpoint
    assert app.view_functions["view"] is wrapped
    # Outside a server, the app behaves as Flask does: the test client runs views inline.
    assert app.test_client().get("/sync").text == threading.current_thread().name
    ours = AggregatorFlask("ours")
    assert bridge(ours) is ours and type(ours) is AggregatorFlask


async def test_without_an_engine_limits_overload_and_the_lifespan_protocol_still_apply() -> None:
    settings = Settings(max_in_flight=1, max_request_body=10, max_request_headers=8)
    adapter = to_asgi(_plain_app(), settings=settings)
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> Any:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message)

    await adapter({"type": "lifespan"}, receive, send)  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    async with adapter.lifespan(), _client(adapter) as client:
        first = asyncio.create_task(client.get("/async", params={"delay": "0.5"}))
        while adapter.in_flight == 0:
            await asyncio.sleep(0.01)
        refused = await client.get("/async")
        assert (await first).status_code == 200
        too_large = await client.post("/async", content=b"x" * 100)
        too_many = await client.get("/async", headers={f"x-h{i}": "v" for i in range(10)})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "Service Unavailable"
    assert too_large.status_code == 413 and too_many.status_code == 431


async def test_shutdown_without_an_engine_waits_for_requests_in_flight_within_drain_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    adapter = to_asgi(_plain_app(), settings=Settings(drain_timeout=0.4))
    async with _client(adapter) as client:
        await adapter.startup()
        short = asyncio.create_task(client.get("/async", params={"delay": "0.2"}))
        stuck = asyncio.create_task(client.get("/async", params={"delay": "5"}))
        while adapter.in_flight < 2:
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        with caplog.at_level(logging.WARNING, "aggregator.adapter"):
            await adapter.shutdown()
        waited = time.perf_counter() - started
        assert (await short).status_code == 200  # finished while the shutdown waited
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stuck
    assert 0.3 < waited < 1.5, waited  # drain_timeout, not the stuck request's 5 s
    assert "shutting down with 1 requests still in flight" in caplog.text


@pytest.mark.integration  # the demo upstreams, for the config
async def test_an_app_with_our_engine_keeps_its_engine_settings_fast_path_and_lifespan(
    config_path: Path,
) -> None:
    app = create_app(Settings(config=config_path, threads=7))
    engine = engine_of(app)
    assert find_engine(app) is engine and find_engine(Flask("plain")) is None
    adapter = to_asgi(app)
    assert adapter.engine is engine and adapter.settings is engine.settings
    threads = to_asgi(app, mode="threads")
    assert (threads.mode, threads.settings.threads, engine.settings.mode) == ("threads", 7, "loop")
    async with adapter.lifespan():
        assert engine.clients.shared() is not None  # the engine's lifespan ran
    assert engine.clients.shared() is None


def test_to_asgi_reads_its_mode_from_the_environment_and_refuses_what_it_cannot_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert to_asgi(Flask("a")).mode == "loop"
    monkeypatch.setenv("AGGREGATOR_MODE", "threads")
    assert to_asgi(Flask("b")).mode == "threads"
    assert to_asgi(Flask("c"), mode="serial").mode == "serial"
    assert to_asgi(Flask("d"), settings=Settings(mode="serial"), mode="loop").mode == "loop"
    with pytest.raises(ValueError, match="mode must be one of loop, threads, serial"):
        to_asgi(Flask("e"), mode="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a Flask app"):
        to_asgi(object())  # type: ignore[arg-type]


def test_the_docstring_example_of_to_asgi_runs(capsys: pytest.CaptureFixture[str]) -> None:
    doc = aggregator.to_asgi.__doc__
    assert doc is not None
    code = textwrap.dedent(doc.split("::", 1)[1])
    exec(compile(code, "to_asgi example", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out == "{'hello': 'world'}\n"


# -- --app references --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        ("tests.support.own_app:app", Flask),
        ("tests.support.own_app", Flask),  # MODULE alone: its `app`
        ("tests.support.own_app:create_app()", Flask),
        ("tests.support.own_app:asgi_app", ASGIAdapter),
    ],
)
def test_app_references_name_a_flask_app_a_factory_or_an_adapter(ref: str, kind: type) -> None:
    assert isinstance(appref.load(ref), kind)


@pytest.fixture
def broken_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "own_broken_app.py").write_text("from flask import Flask\napp = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    yield "own_broken_app"
    sys.modules.pop("own_broken_app", None)


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("not a reference", "expected MODULE:NAME or MODULE:FACTORY()"),
        ("no_such_module_here:app", "no module named 'no_such_module_here'"),
        ("tests.support.own_app:nope", "module 'tests.support.own_app' has no attribute 'nope'"),
        ("tests.support.own_app:NOT_AN_APP", "NOT_AN_APP is of type int, not a Flask app"),
        ("tests.support.own_app:NOT_AN_APP()", "NOT_AN_APP is not callable"),
        ("tests.support.own_app:app()", "app() failed: TypeError:"),
        ("BROKEN:app", "importing own_broken_app failed: ZeroDivisionError: division by zero"),
    ],
)
def test_bad_app_references_say_why_in_one_line(ref: str, reason: str, broken_module: str) -> None:
    ref = ref.replace("BROKEN", broken_module)
    with pytest.raises(AppRefError) as caught:
        appref.load(ref)
    message = str(caught.value)
    assert message.startswith(f"--app {ref}: ") and reason in message
    assert "\n" not in message


def test_an_adapter_reference_is_rewrapped_only_for_another_mode() -> None:
    assert appref.asgi_app("tests.support.own_app:asgi_app") is own_app.asgi_app
    threads = appref.asgi_app("tests.support.own_app:asgi_app", mode="threads")
    assert threads.mode == "threads" and threads.app is own_app.app
    assert appref.wsgi_app("tests.support.own_app:asgi_app") is own_app.app
    assert serve_module.APP_ENV == appref.APP_ENV


# -- over the wire: aggregator serve --app, hypercorn module:asgi_app -------------------------


@pytest.fixture
def own_servers(tmp_path: Path) -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.stop()


async def _wire_burst(url: str, n: int) -> tuple[float, list[httpx.Response]]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:
        return await _timed_burst(client, url, n)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["loop", "threads"])
async def test_serve_app_answers_16_slow_async_views_at_the_time_of_one(
    mode: str, tmp_path: Path, own_servers: list[Server]
) -> None:
    server = start_own_app(
        tmp_path, "aggregator", "serve", "--app", "tests.support.own_app:app", "--mode", mode
    )
    own_servers.append(server)
    elapsed, responses = await _wire_burst(f"{server.url}/async", 16)
    with httpx.Client(trust_env=False, timeout=10) as client:
        echoed = client.get(f"{server.url}/async?delay=0", headers={"X-Request-ID": "wire-1"})
        boom = client.get(f"{server.url}/boom")
    assert [r.status_code for r in responses] == [200] * 16
    assert elapsed < 2.5, elapsed  # 16 x 0.3 s = 4.8 s one after another
    assert echoed.headers["x-request-id"] == "wire-1"
    assert boom.status_code == 500
    assert own_app.SECRET not in boom.text and "Traceback" not in boom.text
    log = server.log()
    assert f"(mode={mode}, workers=1)" in log
    assert "GET /async?tag=0 200" in log  # our access line


@pytest.mark.integration
async def test_serve_app_keeps_def_views_from_blocking_the_loop(
    tmp_path: Path, own_servers: list[Server]
) -> None:
    server = start_own_app(tmp_path, "aggregator", "serve", "--app", "tests.support.own_app:app")
    own_servers.append(server)
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(timeout=30, limits=limits, trust_env=False) as client:
        sleepers = [
            asyncio.create_task(client.get(f"{server.url}/sync", params={"delay": "1.5"}))
            for _ in range(4)
        ]
        await asyncio.sleep(0.2)
        quick, answers = await _timed_burst(client, f"{server.url}/async", 8, delay="0.1")
        still_sleeping = not any(task.done() for task in sleepers)
        slept = [await task for task in sleepers]
    assert still_sleeping and quick < 1.0, quick  # served while the def views slept
    assert [r.status_code for r in answers + slept] == [200] * 12
    assert all(r.json()["thread"].startswith("aggregator-view") for r in slept)


@pytest.mark.integration
async def test_serve_app_with_two_workers_loads_the_factory_in_each_worker(
    tmp_path: Path, own_servers: list[Server]
) -> None:
    ref = "tests.support.own_app:create_app()"
    server = start_own_app(tmp_path, "aggregator", "serve", "--app", ref, "-w", "2")
    own_servers.append(server)
    pids: set[int] = set()
    for _ in range(60):  # fresh connections until both spawned workers have answered
        response, pid = get_fresh(server, "/async?delay=0")
        assert response.status_code == 200 and response.headers["x-request-id"]
        pids.add(pid)
        if len(pids) == 2:
            break
    assert len(pids) == 2, server.log()
    elapsed, responses = await _wire_burst(f"{server.url}/async", 8)
    assert [r.status_code for r in responses] == [200] * 8 and elapsed < 2.0, elapsed
    server.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.popen.wait, 15) == 0
    assert "workers=2" in server.log() and "Traceback" not in server.log()


@pytest.mark.integration
async def test_sigterm_lets_a_plain_apps_requests_finish_and_refuses_new_ones(
    tmp_path: Path, own_servers: list[Server]
) -> None:
    server = start_own_app(tmp_path, "aggregator", "serve", "--app", "tests.support.own_app:app")
    own_servers.append(server)
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        requests = [
            asyncio.create_task(client.get(f"{server.url}/async", params={"delay": "1.5"}))
            for _ in range(4)
        ]
        await asyncio.sleep(0.5)
        server.popen.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        late: BaseException | int
        try:
            late = (await client.get(f"{server.url}/async", timeout=3)).status_code
        except httpx.TransportError as exc:
            late = exc
        answers = await asyncio.gather(*requests)
    exit_code = await asyncio.to_thread(server.popen.wait, SHIPPED["graceful_timeout"] + 5)
    assert [r.status_code for r in answers] == [200] * 4
    assert isinstance(late, httpx.ConnectError), late  # refused at once
    assert exit_code == 0 and "Traceback" not in server.log()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("no_such_module_here:app", "no module named 'no_such_module_here'"),
        ("tests.support.own_app:nope", "has no attribute 'nope'"),
        ("tests.support.own_app:NOT_AN_APP", "not a Flask app"),
        ("tests.support.own_app:NOT_AN_APP()", "is not callable"),
    ],
)
def test_serve_refuses_a_bad_app_with_one_line_and_exit_2(ref: str, reason: str) -> None:
    bind = f"127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "aggregator", "serve", "--app", ref, "--bind", bind],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert reason in proc.stderr and "Traceback" not in proc.stderr
    assert "serving" not in proc.stdout  # no worker started


@pytest.mark.integration
async def test_hypercorn_serves_a_module_level_to_asgi_adapter(
    tmp_path: Path, own_servers: list[Server]
) -> None:
    server = start_own_app(
        tmp_path, "hypercorn", "--config", "hypercorn.toml", "tests.support.own_app:asgi_app"
    )
    own_servers.append(server)
    elapsed, responses = await _wire_burst(f"{server.url}/async", 8)
    assert [r.status_code for r in responses] == [200] * 8
    assert elapsed < 2.0, elapsed  # 8 x 0.3 s = 2.4 s one after another
    assert all(r.headers["x-request-id"] for r in responses)
    server.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.popen.wait, 15) == 0
    assert "Traceback" not in server.log()


def test_serve_help_names_app_without_importing_flask() -> None:
    code = (
        "import sys; from aggregator.ops import cli; "
        "from click.testing import CliRunner; "
        "out = CliRunner().invoke(cli.main, ['serve', '--help']).output; "
        "print('--app MODULE:NAME' in out, 'flask' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["True", "False"], proc.stdout + proc.stderr
