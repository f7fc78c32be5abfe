"""Hostile upstream bodies: a gzip bomb is cut at the decoded size limit without being inflated,
non-JSON answers and absurdly deep JSON are that source's `invalid_json` (never a RecursionError
or a 500), and nothing of an upstream's body is ever echoed to the client."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from aggregator.demo.process import DemoProcess
from aggregator.settings import Settings
from aggregator.upstream import fetch
from aggregator.upstream.checks import MAX_JSON_DEPTH
from aggregator.upstream.engines import build_client
from tests.support.clients import upstream

BASE = "http://upstream.test"
MIB = 1 << 20
#: A demo service whose body is distinctive (headlines about this topic), for the echo check.
HOSTILE_PATH = "/news?topic=zq-hostile-upstream"
#: Each answers 200; each must be refused as invalid_json, by the reason given.
HOSTILE = [
    pytest.param("html=1", "the body is text/html, not JSON", id="html-with-200"),
    pytest.param("ctype=text%2Fplain", "the body is text/plain, not JSON", id="json-as-text"),
    pytest.param(
        "ctype=application%2Foctet-stream",
        "the body is application/octet-stream, not JSON",
        id="octet-stream",
    ),
    pytest.param(
        "ctype=%3Cscript%3E", "the body is an unexpected Content-Type, not JSON", id="odd-ctype"
    ),
    pytest.param("depth=10000", "the body is not valid JSON", id="depth-10000"),
    pytest.param(
        f"depth={MAX_JSON_DEPTH + 1}",
        f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels",
        id="depth-past-the-limit",
    ),
    # parses, but pydantic cannot serialize past depth ~255: the envelope would be a 500
    pytest.param(
        "depth=300", f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels", id="depth-300"
    ),
    pytest.param("invalid=1", "the body is not valid JSON", id="cut-json"),
]


class Raw:
    """A one-chunk async body, handed to the client undecoded."""

    def __init__(self, body: bytes) -> None:
        self.parts = [body]

    def __aiter__(self) -> Raw:
        return self

    async def __anext__(self) -> bytes:
        if not self.parts:
            raise StopAsyncIteration
        return self.parts.pop()


@pytest.mark.integration
async def test_a_gzip_bomb_is_cut_at_the_limit_without_inflating_it(
    engine_client: httpx.AsyncClient, demo: DemoProcess
) -> None:
    # 1 GiB of padding in ~1 MiB of gzip, sent in 64 KiB writes (~64 MiB each once inflated):
    # httpx's own decoding inflates every network chunk whole (measured peaks 45-143 MiB).
    config = upstream(f"{demo.url}/weather/Paris?gzip=1&size={1 << 30}", timeout=20)
    tracemalloc.start()
    try:
        started = time.monotonic()
        result = await fetch(engine_client, "bomb", config, {}, max_body=MIB)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.status == "too_large"
    assert result.detail == f"the body is larger than {MIB} bytes"
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"
    assert elapsed < 10  # a bound, not a speed test: the call ends at the limit, not at 1 GiB


@pytest.mark.integration
async def test_gzip_under_the_limit_is_decoded(
    engine_client: httpx.AsyncClient, demo: DemoProcess
) -> None:
    config = upstream(
        f"{demo.url}/weather/Paris?gzip=1&size=200000", schema="aggregator.demo.models:Weather"
    )

    result = await fetch(engine_client, "packed", config, {}, max_body=MIB)

    assert result.ok, result
    assert result.data["city"] == "Paris"


@pytest.mark.respx(base_url=BASE)
@pytest.mark.parametrize(
    ("encoding", "body", "kind"),
    [
        pytest.param("deflate", zlib.compress(b'{"a": 1}'), "ok", id="deflate-zlib"),
        pytest.param("deflate", zlib.compress(b'{"a": 1}')[2:-4], "ok", id="deflate-raw"),
        pytest.param("x-gzip", gzip.compress(b'{"a": 1}'), "ok", id="x-gzip"),
        pytest.param("identity", b'{"a": 1}', "ok", id="identity"),
        pytest.param("deflate", zlib.compress(b" " * 50_000), "too_large", id="deflate-bomb"),
        pytest.param("br", b"\x1b\x07\x00", "invalid_json", id="unsupported"),
        pytest.param("gzip", b"\x1f\x8b garbage", "invalid_json", id="broken-gzip"),
    ],
)
async def test_content_encodings(
    respx_mock: respx.MockRouter, encoding: str, body: bytes, kind: str
) -> None:
    # a stream, so httpx does not decode the body while building the mocked response
    respx_mock.get("/e").respond(200, content=Raw(body), headers={"Content-Encoding": encoding})
    async with build_client(Settings(engine="httpx")) as client:
        result = await fetch(client, "e", upstream(f"{BASE}/e"), {}, max_body=10_000)

    assert result.status == kind, result
    if kind == "ok":
        assert result.data == {"a": 1}


@pytest.mark.respx(base_url=BASE)
async def test_only_encodings_we_can_bound_are_advertised(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.get("/e").respond(json={})
    async with build_client(Settings(engine="httpx")) as client:
        await fetch(client, "e", upstream(f"{BASE}/e"), {}, max_body=100)

    assert route.calls.last.request.headers["accept-encoding"] == "gzip, deflate"


@pytest.mark.integration
@pytest.mark.parametrize(("knob", "detail"), HOSTILE)
@pytest.mark.parametrize("schema", [None, "aggregator.demo.models:Weather"], ids=["raw", "schema"])
async def test_hostile_bodies_are_invalid_json(
    engine_client: httpx.AsyncClient, demo: DemoProcess, knob: str, detail: str, schema: str | None
) -> None:
    config = upstream(f"{demo.url}/weather/Paris?{knob}", schema=schema)

    result = await fetch(engine_client, "h", config, {}, max_body=MIB)

    assert (result.status, result.detail) == ("invalid_json", detail)


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        pytest.param(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, True, id="at-the-limit"),
        pytest.param(b'{"a":' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH, True, id="objects"),
        pytest.param(
            b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1),
            False,
            id="objects-past-the-limit",
        ),
        # many brackets, little depth: the cheap count says "maybe", the walk says fine
        pytest.param(b"[" + b"[1]," * 5000 + b"[]]", True, id="wide"),
        pytest.param(b'["' + b"[{" * 500 + b'"]', True, id="brackets-in-strings"),
    ],
)
@pytest.mark.respx(base_url=BASE)
async def test_depth_limit(respx_mock: respx.MockRouter, body: bytes, ok: bool) -> None:
    respx_mock.get("/d").respond(200, content=body)
    async with build_client(Settings(engine="httpx")) as client:
        result = await fetch(client, "d", upstream(f"{BASE}/d"), {}, max_body=MIB)

    assert result.ok is ok, result


# --- over the wire: never a 500, never an echo ---------------------------------------------------


def _config(demo_url: str) -> str:
    lines = []
    names = []
    for i, param in enumerate(HOSTILE):
        knob = param.values[0]
        names.append(f"h{i}")
        lines += [f"[upstreams.h{i}]", f'url = "{demo_url}{HOSTILE_PATH}&{knob}"', ""]
    lines += [
        "[upstreams.good]",
        f'url = "{demo_url}/profile/7"',
        "",
        "[aggregates.hostile]",
        'path = "/hostile"',
        f"sources = {[*names, 'good']!r}".replace("'", '"'),
    ]
    return "\n".join(lines)


def _windows(body: bytes, size: int = 16) -> set[bytes]:
    return {body[i : i + size] for i in range(max(1, len(body) - size + 1))}


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["aiohttp", "httpx"])
def test_over_the_wire_each_is_that_sources_error_and_nothing_is_echoed(
    serve: Callable[..., Any],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
    engine: str,
) -> None:
    server = serve(write_config(_config(demo.url)), engine=engine)

    r = httpx.get(f"{server.url}/hostile", trust_env=False, timeout=20)

    assert r.status_code == 200, r.text  # partial: only optional sources failed
    body = r.json()
    assert body["data"]["good"]["user_id"] == 7
    for i, param in enumerate(HOSTILE):
        assert body["errors"][f"h{i}"] == {"kind": "invalid_json", "detail": param.values[1]}
    # Not one 16-byte run of any hostile upstream's body (its headlines, its markup, its
    # brackets) appears in what the client got.
    sent = r.content
    for param in HOSTILE:
        upstream_body = httpx.get(
            f"{demo.url}{HOSTILE_PATH}&{param.values[0]}", trust_env=False
        ).content
        leaked = [w for w in _windows(upstream_body[:4096]) if w in sent]
        assert not leaked, (param.id, leaked[:3])
    log = server.log()
    assert "Traceback" not in log and "RecursionError" not in log
