"""Upstream redirects: refused unless a source opts in; then http(s) only, bounded, and a hop to
another origin never carries the source's headers. Two real demo processes are two origins; every
case runs on both engines, and the blocking client of the sync twins behaves the same."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from aggregator.config import UpstreamConfig, parse_config
from aggregator.context import request_id
from aggregator.demo.process import DemoProcess, start_demo_process
from aggregator.errors import ConfigError
from aggregator.settings import Settings
from aggregator.twins.upstream_sync import fetch_sync
from aggregator.upstream import fetch
from aggregator.upstream.engines import build_sync_client
from tests.support.demo import demo_stats, reset_demo

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-redirect-token"
HEADERS = {"Authorization": f"Bearer {SECRET}", "X-Api-Key": SECRET}
REDIRECTS = [301, 302, 303, 307, 308]


@pytest.fixture(scope="module")
def other() -> Iterator[DemoProcess]:
    """A second demo process: a different port is a different origin."""
    with start_demo_process(latency=0.0) as proc:
        yield proc


def upstream(url: str, **extra: Any) -> UpstreamConfig:
    return UpstreamConfig.model_validate({"url": url, "headers": HEADERS} | extra)


def moved(origin: str, location: str, status: int = 302) -> str:
    """A demo URL on `origin` that answers `status` with `Location: location`."""
    return f"{origin}/weather/Paris?status={status}&redirect={quote(location, safe='')}"


def received(result: Any) -> dict[str, str]:
    """The headers the final (echo) hop received."""
    assert result.ok, result
    headers: dict[str, str] = result.data["headers"]
    return headers


@pytest.mark.parametrize("status", REDIRECTS)
async def test_without_opt_in_a_redirect_is_http_status_and_not_followed(
    engine_client: httpx.AsyncClient, demo: DemoProcess, other: DemoProcess, status: int
) -> None:
    reset_demo(other)
    location = f"{other.url}/echo/x"

    result = await fetch(
        engine_client, "r", upstream(moved(demo.url, location, status)), {}, max_body=10_000
    )

    assert (result.status, result.upstream_status) == ("http_status", status)
    assert (
        result.detail
        == f"answered HTTP {status} (a redirect; this source does not follow redirects)"
    )
    assert demo_stats(other)["total_requests"] == 0  # the other origin never saw a request


async def test_same_origin_hops_keep_the_source_headers(
    engine_client: httpx.AsyncClient, demo: DemoProcess
) -> None:
    config = upstream(moved(demo.url, "/echo/same?via=relative"), follow_redirects=True)

    result = await fetch(engine_client, "r", config, {}, max_body=10_000)

    headers = received(result)
    assert result.data["path"] == "/echo/same"
    assert headers["authorization"] == f"Bearer {SECRET}"
    assert headers["x-api-key"] == SECRET


@pytest.mark.parametrize("status", REDIRECTS)
async def test_a_hop_to_another_origin_never_carries_the_source_headers(
    engine_client: httpx.AsyncClient, demo: DemoProcess, other: DemoProcess, status: int
) -> None:
    config = upstream(moved(demo.url, f"{other.url}/echo/x", status), follow_redirects=True)

    result = await fetch(engine_client, "r", config, {}, max_body=10_000)

    headers = received(result)
    assert result.data["path"] == "/echo/x"  # it did reach the other origin
    assert "authorization" not in headers and "x-api-key" not in headers
    assert SECRET not in repr(result.data)


async def test_a_request_id_still_crosses_origins(
    engine_client: httpx.AsyncClient, demo: DemoProcess, other: DemoProcess
) -> None:
    config = upstream(moved(demo.url, f"{other.url}/echo/x"), follow_redirects=True)

    token = request_id.set("req-42")  # the id of the request this call is made for
    try:
        result = await fetch(engine_client, "r", config, {}, max_body=10_000)
    finally:
        request_id.reset(token)

    headers = received(result)
    assert headers["x-request-id"] == "req-42"  # names the call, not the caller
    assert "authorization" not in headers and "x-api-key" not in headers


async def test_headers_stay_dropped_when_the_chain_comes_back(
    engine_client: httpx.AsyncClient, demo: DemoProcess, other: DemoProcess
) -> None:
    # A -> B -> A: B chose where the last hop goes, so A's credentials are not re-sent.
    back = moved(other.url, f"{demo.url}/echo/back")
    config = upstream(moved(demo.url, back), follow_redirects=True)

    result = await fetch(engine_client, "r", config, {}, max_body=10_000)

    assert result.data["path"] == "/echo/back"
    assert "authorization" not in received(result)


@pytest.mark.parametrize(
    "location",
    [
        pytest.param("file:///etc/passwd", id="file"),
        pytest.param("ftp://127.0.0.1/x", id="ftp"),
        pytest.param("javascript:alert(1)", id="javascript"),
        pytest.param("gopher://127.0.0.1:6379/_FLUSHALL", id="gopher"),
    ],
)
async def test_a_redirect_to_another_scheme_is_refused(
    engine_client: httpx.AsyncClient, demo: DemoProcess, location: str
) -> None:
    config = upstream(moved(demo.url, location), follow_redirects=True)

    result = await fetch(engine_client, "r", config, {}, max_body=10_000)

    assert (result.status, result.upstream_status) == ("http_status", 302)
    assert result.detail == "answered HTTP 302 (a redirect to a non-HTTP(S) URL, refused)"
    assert location not in (result.detail or "")


@pytest.mark.parametrize(
    ("location", "why"),
    [
        # httpx builds `next_request` even when not following, and raised InvalidURL for this
        pytest.param("javascript:alert(1)", "a redirect to a non-HTTP(S) URL, refused", id="js"),
        # yarl (aiohttp engine) raised ValueError for this one
        pytest.param("http://127.0.0.1:99999/x", "a redirect to an unusable URL", id="bad-port"),
        pytest.param("http://[::1", "a redirect to an unusable URL", id="bad-host"),
        pytest.param("https:/", "a redirect to an unusable URL", id="no-host"),
    ],
)
@pytest.mark.parametrize("follow", [False, True], ids=["refused", "followed"])
async def test_a_malformed_location_is_a_result_never_an_exception(
    engine_client: httpx.AsyncClient, demo: DemoProcess, location: str, why: str, follow: bool
) -> None:
    config = upstream(moved(demo.url, location), follow_redirects=follow)

    result = await fetch(engine_client, "r", config, {}, max_body=10_000)

    assert (result.status, result.upstream_status) == ("http_status", 302)
    if follow:
        assert result.detail == f"answered HTTP 302 ({why})"


@pytest.mark.parametrize(("hops", "allowed", "ok"), [(3, 3, True), (3, 2, False)])
async def test_redirect_chains_are_bounded(
    engine_client: httpx.AsyncClient, demo: DemoProcess, hops: int, allowed: int, ok: bool
) -> None:
    url = f"{demo.url}/echo/end"
    for _ in range(hops):
        url = moved(demo.url, url)
    config = upstream(url, follow_redirects=True, max_redirects=allowed)

    result = await fetch(engine_client, "r", config, {}, max_body=10_000)

    if ok:
        assert result.data["path"] == "/echo/end"
    else:
        assert (result.status, result.upstream_status) == ("http_status", 302)
        assert result.detail == f"answered HTTP 302 (more than {allowed} redirects)"


async def test_the_source_timeout_covers_the_whole_chain(
    engine_client: httpx.AsyncClient, demo: DemoProcess
) -> None:
    config = upstream(moved(demo.url, "/weather/Paris?delay=5"), follow_redirects=True, timeout=0.5)
    started = time.monotonic()

    result = await fetch(engine_client, "r", config, {}, max_body=10_000)

    assert result.status == "timeout"
    assert time.monotonic() - started < 2.5


def test_the_blocking_client_follows_the_same_rules(demo: DemoProcess, other: DemoProcess) -> None:
    cross = moved(demo.url, f"{other.url}/echo/x")
    with build_sync_client(Settings()) as client:
        refused = fetch_sync(client, "r", upstream(cross), {}, max_body=10_000)
        followed = fetch_sync(
            client, "r", upstream(cross, follow_redirects=True), {}, max_body=10_000
        )
        scheme = fetch_sync(
            client,
            "r",
            upstream(moved(demo.url, "file:///etc/passwd"), follow_redirects=True),
            {},
            max_body=10_000,
        )

    assert (refused.status, refused.upstream_status) == ("http_status", 302)
    assert followed.data["path"] == "/echo/x"
    assert "authorization" not in received(followed)
    assert scheme.detail == "answered HTTP 302 (a redirect to a non-HTTP(S) URL, refused)"


def test_redirect_settings_are_checked_at_load() -> None:
    base = (
        '[upstreams.a]\nurl = "http://x/y"\n{extra}\n[aggregates.g]\npath = "/g"\nsources = ["a"]\n'
    )
    config = parse_config(base.format(extra="follow_redirects = true\nmax_redirects = 3"), "t")
    assert config.upstreams["a"].follow_redirects is True
    assert config.upstreams["a"].max_redirects == 3
    assert parse_config(base.format(extra=""), "t").upstreams["a"].follow_redirects is False
    for extra, problem in [
        (
            "max_redirects = 0",
            "upstreams.a.max_redirects: Input should be greater than or equal to 1",
        ),
        (
            'follow_redirects = "yes"',
            "upstreams.a.follow_redirects: Input should be a valid boolean",
        ),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config(base.format(extra=extra), "t")
        assert problem in str(caught.value)
