"""The Docker image as shipped: its own CMD serves the demo, as a non-root user, with Redis as the
cache, and SIGTERM lets a request in flight finish.

Skipped, saying why, where neither podman nor a working docker is available; `.ci/run` builds the
image and runs this module on its own (`-m container`). See tests/support/container.py for which
tool and image are used.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from aggregator.demo.process import free_port
from tests.support.container import Container, build_image, find_cli, inspect_image
from tests.support.redis import SHARED_REDIS, SHARED_REDIS_URL, shared_prefix

# Minutes when the image is built here (seconds for each test once it is).
pytestmark = [pytest.mark.container, pytest.mark.timeout(300)]

DASHBOARD = "/api/dashboard"


@pytest.fixture(scope="module")
def cli() -> list[str]:
    found, why = find_cli()
    if found is None:
        pytest.skip(f"no container tool: {why}")
    return found


@pytest.fixture(scope="module")
def image(cli: list[str]) -> str:
    return build_image(cli)


@pytest.fixture(scope="module")
def redis_prefix() -> Iterator[str]:
    with shared_prefix() as prefix:
        yield prefix


def _container(cli: list[str], image: str, prefix: str) -> Container:
    # No config: the image's CMD starts the demo upstreams inside the container. On the host's
    # network they get a free port of their own instead of the default 8101, which another
    # aggregator serve on this machine may hold.
    return Container(
        cli,
        image,
        port=free_port(),
        env={
            "AGGREGATOR_DEMO_URL": f"http://127.0.0.1:{free_port()}",
            "AGGREGATOR_CACHE_TYPE": "redis",
            "AGGREGATOR_CACHE_REDIS_URL": SHARED_REDIS_URL,
            "AGGREGATOR_CACHE_KEY_PREFIX": prefix,
        },
    )


@pytest.fixture(scope="module")
def box(cli: list[str], image: str, redis_prefix: str) -> Iterator[Container]:
    container = _container(cli, image, redis_prefix)
    try:
        container.start()
        yield container
    finally:
        container.remove()


def _dashboard(url: str, **params: Any) -> httpx.Response:
    query = {"city": "Paris", "user_id": 7, **params}
    return httpx.get(f"{url}{DASHBOARD}", params=query, timeout=10, trust_env=False)


def test_the_image_keeps_its_healthcheck_and_runs_as_a_user(cli: list[str], image: str) -> None:
    config = inspect_image(cli, image)
    # Without --format docker, podman builds OCI images, which have no HEALTHCHECK.
    assert config["Healthcheck"], "no HEALTHCHECK in the image"
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    assert config["User"] not in ("", "root", "0")


def test_the_default_command_serves_the_demo_with_answers_from_every_source(box: Container) -> None:
    assert "started the demo services at" in box.logs()
    assert httpx.get(f"{box.url}/healthz", trust_env=False).json() == {"status": "ok"}
    response = _dashboard(box.url, user_id=uuid.uuid4().int % 10**6)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["complete"] is True and body["errors"] == {}
    assert {s["status"] for s in body["sources"].values()} == {"ok"}


def test_the_server_process_is_not_root(box: Container) -> None:
    status = box.exec("cat", "/proc/1/status").stdout
    uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
    assert uid and int(uid[1]) != 0, status


def test_the_image_can_opt_in_to_the_compiled_http1_parser(box: Container) -> None:
    # The fast extra is in the image, so AGGREGATOR_HTTP1_PARSER=h11-mypyc passes its checks
    # there (checked in the image's own Python, as a worker would at start-up).
    check = "from aggregator.ops.http1 import use_parser; print(use_parser('h11-mypyc').line)"
    done = box.exec("python", "-c", check)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "HTTP/1.1 parser: h11-mypyc 0.17.0 (compiled)"
    assert httpx.get(f"{box.url}/status", trust_env=False).json()["http1_parser"] == "h11"


def test_the_healthcheck_command_passes(box: Container, cli: list[str], image: str) -> None:
    test = inspect_image(cli, image)["Healthcheck"]["Test"]
    assert test[0] == "CMD"
    # The same command, at the port this container listens on (8000 in a real deployment).
    argv = [part.replace("127.0.0.1:8000", f"127.0.0.1:{box.port}") for part in test[1:]]
    done = box.exec(*argv)
    assert done.returncode == 0, done.stderr


def test_answers_are_cached_in_redis(box: Container, redis_prefix: str) -> None:
    response = _dashboard(box.url, city="Lisbon")
    assert response.status_code == 200
    client = redis.Redis(host=SHARED_REDIS[0], port=SHARED_REDIS[1], socket_timeout=2)
    try:
        deadline = time.monotonic() + 5
        while not list(client.scan_iter(match=f"{redis_prefix}*")):
            assert time.monotonic() < deadline, f"no key under {redis_prefix!r}:\n{box.logs()}"
            time.sleep(0.1)
    finally:
        client.close()


def _requests_seen(demo_url: str) -> list[str]:
    listed = httpx.get(f"{demo_url}/_requests", timeout=2, trust_env=False).json()["requests"]
    return [r["raw_path"] for r in listed]


def test_sigterm_lets_a_request_in_flight_finish(
    cli: list[str], image: str, redis_prefix: str
) -> None:
    container = _container(cli, image, redis_prefix)
    demo_url = container.env["AGGREGATOR_DEMO_URL"]
    user_id = uuid.uuid4().int % 10**6
    try:
        container.start()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # The optional recommendations source answers after 0.6 s (its timeout is 0.8 s).
            pending = pool.submit(_dashboard, container.url, user_id=user_id, reco_delay=0.6)
            deadline = time.monotonic() + 5
            mark = f"/recommendations/{user_id}"
            while not any(p.startswith(mark) for p in _requests_seen(demo_url)):
                assert time.monotonic() < deadline, "the request never reached the demo"
                time.sleep(0.02)
            container.signal("TERM")  # while that call is still waiting on the demo
            signalled = time.monotonic()
            response = pending.result(timeout=15)
        assert response.status_code == 200, response.text
        assert response.json()["complete"] is True
        assert container.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 10, "stopped by the drain, not by a timeout"
    finally:
        logs = container.logs()
        container.remove()
    assert "Traceback" not in logs, logs
