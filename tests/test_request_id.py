"""X-Request-ID: on every response, kept when valid or replaced, and sent with every upstream call.

The integration tests run real Hypercorn against the demo, which records what it received
(`/_requests`), so "the upstream saw the id" is read from the upstream's side.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from aggregator import context, create_app
from aggregator.context import accept_request_id, read_request, request_id
from aggregator.demo.process import DemoProcess, free_port
from aggregator.serving import ASGIAdapter
from aggregator.settings import Mode, Settings
from tests.support.configs import traced_config
from tests.support.demo import received, reset_demo
from tests.support.servers import Server

GENERATED = re.compile(r"[0-9a-f]{32}")


def ids_seen(demo: DemoProcess, service: str | None = None) -> list[str | None]:
    return [r["headers"].get("x-request-id") for r in received(demo, service)]


@pytest.fixture
def traced(
    demo: DemoProcess, write_config: Callable[[str], Path], serve: Callable[..., Server]
) -> Server:
    return serve(write_config(traced_config(demo.url)))


# -- validation (unit) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(b"a", id="one-char"),
        pytest.param(b"x" * 128, id="128-chars"),
        pytest.param(b"dash-42.a:b_C", id="every-allowed-kind"),
        pytest.param(b"0f8fad5b-d9cb-469f-a165-70867728950e", id="uuid"),
    ],
)
def test_a_valid_id_is_kept(given: bytes) -> None:
    assert accept_request_id(given) == given.decode()


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(None, id="absent"),
        pytest.param(b"", id="empty"),
        pytest.param(b"x" * 129, id="129-chars"),
        pytest.param(b"a b", id="space"),
        pytest.param(b"Root=1-abc;Parent=2", id="equals-and-semicolon"),
        pytest.param(b"\xc3\xa9t\xc3\xa9", id="non-ascii"),
        pytest.param(b'id"><script>', id="markup"),
        pytest.param(b"a\tb", id="tab"),
    ],
)
def test_an_invalid_or_missing_id_is_replaced(given: bytes | None) -> None:
    rid = accept_request_id(given)
    assert GENERATED.fullmatch(rid)
    assert accept_request_id(given) != rid  # a new one each time


def test_a_repeated_id_is_ambiguous_and_replaced() -> None:
    rid, _ = read_request([(b"x-request-id", b"one"), (b"x-request-id", b"two")], frozenset())
    assert GENERATED.fullmatch(rid)


def test_read_request_takes_only_forwarded_headers_and_joins_repeats() -> None:
    headers = [
        (b"x-request-id", b"abc"),
        (b"accept-language", b"fr"),
        (b"cookie", b"a=1"),
        (b"x-other", b"no"),
        (b"accept-language", b"de"),
        (b"cookie", b"b=2"),
    ]
    rid, values = read_request(headers, frozenset({b"accept-language", b"cookie"}))
    assert rid == "abc"
    assert values == {"accept-language": "fr, de", "cookie": "a=1; b=2"}


def test_read_request_reads_underscores_as_dashes_like_the_cache_key() -> None:
    # WSGI (and so the cache key's digest) cannot tell `X_Tenant` from `X-Tenant`: nor may we.
    _, values = read_request([(b"x_tenant", b"acme")], frozenset({b"x-tenant"}))
    assert values == {"x-tenant": "acme"}


# -- where the id is visible (in-process ASGI stack, both modes) --------------------------------


def _probe(config_path: Path, mode: Mode) -> ASGIAdapter:
    """The real app plus routes that report the request id they see from each place code runs."""
    app = create_app(Settings(config=config_path, mode=mode))

    async def in_task() -> str | None:
        await asyncio.sleep(0)
        return request_id.get()

    @app.get("/probe/async")
    async def probe_async() -> dict[str, Any]:
        seen = request_id.get()
        task = await asyncio.create_task(in_task())  # a fan-out task copies the context
        return {"view": seen, "task": task}

    @app.get("/probe/sync")
    def probe_sync() -> dict[str, Any]:
        return {"view": request_id.get(), "async": app.ensure_sync(in_task)()}

    @app.get("/probe/boom")
    async def probe_boom() -> dict[str, Any]:
        raise RuntimeError("a bug")

    return ASGIAdapter(app, Settings(config=config_path, mode=mode))


@pytest.mark.parametrize("mode", ["loop", "threads"])
async def test_the_id_is_visible_in_views_tasks_and_pool_threads(
    config_path: Path, mode: Mode
) -> None:
    adapter = _probe(config_path, mode)
    transport = httpx.ASGITransport(app=adapter)  # type: ignore[arg-type]  # hypercorn's types
    async with (
        adapter.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        answers = await asyncio.gather(
            *(
                client.get(f"/probe/{kind}", headers={"X-Request-ID": f"{kind}-{i}"})
                for kind in ("async", "sync")
                for i in range(5)
            )
        )
        boom = await client.get("/probe/boom", headers={"X-Request-ID": "bug-1"})
    for response in answers:
        rid = response.headers["x-request-id"]
        assert set(response.json().values()) == {rid}, response.json()
    assert request_id.get() is None  # reset after each request: nothing leaks into the caller
    assert boom.status_code == 500 and boom.headers["x-request-id"] == "bug-1"


# -- real Hypercorn -------------------------------------------------------------------------------


@pytest.mark.integration
def test_every_kind_of_response_carries_a_new_id(
    demo: DemoProcess, write_config: Callable[[str], Path], serve: Callable[..., Server]
) -> None:
    server = serve(write_config(traced_config(demo.url)), max_request_body="100")
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        responses = {
            "miss": client.get("/api/traced?city=Paris"),
            "fast-path hit": client.get("/api/traced?city=Paris"),
            "fast-path HEAD": client.head("/api/traced?city=Paris"),
            "304": client.get(
                "/api/traced?city=Paris",
                headers={"If-None-Match": client.get("/api/traced?city=Paris").headers["etag"]},
            ),
            "400": client.get("/api/traced"),
            "404": client.get("/nowhere"),
            "405": client.post("/api/traced?city=Paris"),
            "413": client.post("/api/traced?city=Paris", content=b"x" * 1000),
            "431": client.get("/healthz", headers=[(f"x-h{i}", "1") for i in range(120)]),
            "dashboard": client.get("/"),
            "healthz": client.get("/healthz"),
            "readyz": client.get("/readyz"),
            "admin (disabled)": client.post("/admin/purge", json={}),
            "openapi": client.get("/openapi.json"),
            "docs": client.get("/docs"),
            "sync twin": client.get("/sync/api/traced?city=Paris"),
            "sync-pool twin": client.get("/sync-pool/api/traced?city=Paris"),
            "502 (its only source failed)": client.get("/api/flaky"),
        }
    assert responses["fast-path hit"].headers["x-cache"] == "HIT"
    assert responses["304"].status_code == 304
    assert responses["400"].status_code == 400
    assert responses["413"].status_code == 413
    assert responses["431"].status_code == 431
    ids = {}
    for what, response in responses.items():
        rid = response.headers.get("x-request-id", "")
        assert GENERATED.fullmatch(rid), f"{what}: {response.status_code} {response.headers}"
        ids[rid] = what
    assert len(ids) == len(responses), "every response has its own id"


@pytest.mark.integration
def test_a_503_carries_an_id(
    demo: DemoProcess, write_config: Callable[[str], Path], serve: Callable[..., Server]
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    server = serve(
        write_config(traced_config(demo.url)), cache_type="redis", cache_redis_url=dead_redis
    )
    ready = httpx.get(f"{server.url}/readyz", trust_env=False, headers={"X-Request-ID": "r-1"})
    served = httpx.get(f"{server.url}/api/traced?city=Oslo", trust_env=False)
    assert ready.status_code == 503
    assert ready.headers["x-request-id"] == "r-1"
    assert served.headers["x-cache"] == "BYPASS"
    assert GENERATED.fullmatch(served.headers["x-request-id"])


@pytest.mark.integration
def test_a_valid_client_id_is_kept_and_every_upstream_call_carries_it(
    demo: DemoProcess, traced: Server
) -> None:
    reset_demo(demo)
    with httpx.Client(base_url=traced.url, trust_env=False, timeout=10) as client:
        for path, rid in [
            ("/api/traced?city=Lima", "async-1"),
            ("/sync/api/traced?city=Lima", "sequential-2"),
            ("/sync-pool/api/traced?city=Lima", "pool-3"),  # calls from a thread pool
        ]:
            response = client.get(path, headers={"X-Request-ID": rid})
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == rid
    assert ids_seen(demo, "echo") == ["async-1", "sequential-2", "pool-3"]
    assert ids_seen(demo, "weather") == ["async-1", "sequential-2", "pool-3"]


@pytest.mark.integration
def test_retries_carry_the_same_id(demo: DemoProcess, traced: Server) -> None:
    reset_demo(demo)
    response = httpx.get(
        f"{traced.url}/api/flaky", trust_env=False, headers={"X-Request-ID": "retried"}
    )
    assert response.json()["errors"]["flaky"]["status"] == 503
    assert ids_seen(demo, "profile") == ["retried"] * 3  # the call and its two retries


@pytest.mark.integration
def test_invalid_client_ids_are_replaced_here_and_upstream(
    demo: DemoProcess, traced: Server
) -> None:
    invalid: list[list[tuple[bytes, bytes]]] = [
        [(b"X-Request-ID", b"x" * 129)],
        [(b"X-Request-ID", b"has space")],
        [(b"X-Request-ID", b"Root=1-5e1b;Sampled=1")],
        [(b"X-Request-ID", "caf\u00e9".encode())],
        [(b"X-Request-ID", b"one"), (b"X-Request-ID", b"two")],
    ]
    with httpx.Client(base_url=traced.url, trust_env=False, timeout=10) as client:
        for i, headers in enumerate(invalid):
            reset_demo(demo)
            response = client.get(f"/api/traced?city=Tokyo{i}", headers=headers)
            rid = response.headers["x-request-id"]
            assert response.status_code == 200
            assert GENERATED.fullmatch(rid), headers
            assert ids_seen(demo) == [rid, rid], headers  # echo and weather got the new id


@pytest.mark.integration
async def test_a_shared_fill_calls_upstreams_with_the_starting_requests_id(
    demo: DemoProcess, write_config: Callable[[str], Path], serve: Callable[..., Server]
) -> None:
    server = serve(write_config(traced_config(demo.url, delay=0.6)))
    reset_demo(demo)
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=10) as client:
        first = asyncio.create_task(
            client.get("/api/traced?city=Hanoi", headers={"X-Request-ID": "first"})
        )
        await asyncio.sleep(0.2)  # the first request's fill is under way
        second = await client.get("/api/traced?city=Hanoi", headers={"X-Request-ID": "second"})
        answered = await first
    assert ids_seen(demo, "echo") == ["first"]  # one fill, in the starter's context
    assert answered.headers["x-request-id"] == "first"
    assert second.headers["x-request-id"] == "second"  # each answer keeps its own id
    assert second.json() == answered.json()
    assert answered.json()["data"]["echo"]["headers"]["x-request-id"] == "first"
    log = server.log()
    assert "waiting for fill:" not in log  # INFO: the DEBUG line about joining is off


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["threads", "serial"])
def test_other_serving_modes_keep_and_send_the_id(
    demo: DemoProcess, write_config: Callable[[str], Path], serve: Callable[..., Server], mode: str
) -> None:
    server = serve(write_config(traced_config(demo.url)), mode=mode)
    reset_demo(demo)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as client:
        kept = client.get("/api/traced?city=Austin", headers={"X-Request-ID": f"{mode}-1"})
        hit = client.get("/api/traced?city=Austin")
        pooled = client.get("/sync-pool/api/traced?city=Austin", headers={"X-Request-ID": "p"})
        missing = client.get("/nowhere")
    assert kept.headers["x-request-id"] == f"{mode}-1"
    assert GENERATED.fullmatch(hit.headers["x-request-id"])
    assert pooled.headers["x-request-id"] == "p"
    assert GENERATED.fullmatch(missing.headers["x-request-id"])
    assert ids_seen(demo, "echo") == [f"{mode}-1", "p"]


def test_new_ids_are_unique_hex_across_batches() -> None:
    ids = [context.new_request_id() for _ in range(3 * context._ID_BATCH + 7)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_reuses_the_parents_spare_ids() -> None:
    context.new_request_id()  # the parent now holds spare ids
    spare = set(context._spare_ids)
    assert spare
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave at once
        try:
            os.write(write, " ".join(context.new_request_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as got:
        child_ids = set(got.read().split())
    os.waitpid(pid, 0)
    assert len(child_ids) == 5 and not child_ids & spare
