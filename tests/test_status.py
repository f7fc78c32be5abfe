"""`GET /status`: this worker's circuit breakers and in-flight calls, and the aggregates."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from aggregator import create_app
from aggregator.config import parse_config
from aggregator.demo.process import free_port
from aggregator.openapi import build_openapi
from aggregator.resilience import Guards
from aggregator.settings import Settings
from aggregator.status import aggregates_meta, worker_status


def dead_config() -> str:
    """One upstream nobody listens for (refused at once), one never called."""
    port = free_port()  # free: nothing listens, so every call is a fast `connect` failure
    return f"""
[upstreams.dead]
url = "http://127.0.0.1:{port}/x/{{n}}"
retries = 0
breaker_failures = 2
breaker_cooldown = 60

[upstreams.idle]
url = "http://127.0.0.1:{port}/y"
max_concurrency = 3

[aggregates.one]
path = "/api/one"
sources = ["dead"]
params = {{ n = "int", label = {{ type = "str", default = "x" }} }}
warm = [{{ n = 4 }}]

[aggregates.other]
path = "/api/other"
sources = ["idle"]
"""


def status_validator(document: dict[str, Any]) -> jsonschema.Draft202012Validator:
    operation = document["paths"]["/status"]["get"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def test_status_shows_the_circuit_open_after_consecutive_failures(
    write_config: Callable[[str], Path],
) -> None:
    app = create_app(Settings(config=write_config(dead_config())))
    client = app.test_client()
    validator = status_validator(client.get("/openapi.json").get_json())

    def dead() -> dict[str, Any]:
        r = client.get("/status")
        assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
        validator.validate(r.get_json())
        source: dict[str, Any] = r.get_json()["sources"]["dead"]
        return source

    assert dead() == {
        "circuit": "closed",
        "consecutive_failures": 0,
        "breaker_failures": 2,
        "in_flight": 0,
        "max_concurrency": None,
    }
    first = client.get("/api/one?n=1")
    assert first.get_json()["sources"]["dead"]["status"] == "connect"
    assert (dead()["circuit"], dead()["consecutive_failures"]) == ("closed", 1)
    client.get("/api/one?n=2")
    assert (dead()["circuit"], dead()["consecutive_failures"]) == ("open", 2)
    refused = client.get("/api/one?n=3")
    assert refused.get_json()["sources"]["dead"]["status"] == "circuit_open"

    body = client.get("/status").get_json()
    assert body["worker"] == os.getpid() and body["scope"] == "worker"
    assert "this worker process only" in body["note"]
    assert body["sources"]["idle"]["circuit"] == "closed"  # per upstream: its sibling is fine
    assert body["sources"]["idle"]["max_concurrency"] == 3


def test_status_lists_the_aggregates_with_their_parameters_in_config_order(
    write_config: Callable[[str], Path],
) -> None:
    client = create_app(Settings(config=write_config(dead_config()))).test_client()
    aggregates = client.get("/status").get_json()["aggregates"]
    assert [a["name"] for a in aggregates] == ["one", "other"]
    one = aggregates[0]
    assert one["path"] == "/api/one" and one["sources"] == ["dead"] and one["cached"] is False
    assert list(one["params"]) == ["n", "label"]
    assert one["params"]["n"] == {"type": "int", "default": None, "required": True}
    assert one["params"]["label"] == {"type": "str", "default": "x", "required": False}
    assert one["example"] == {"n": 4}  # the first `warm` set
    assert aggregates[1]["params"] == {} and aggregates[1]["example"] == {}


def test_status_counts_calls_in_flight() -> None:
    config = parse_config(dead_config(), "t")
    guards = Guards(config.upstreams)
    assert guards["idle"].bulkhead.try_enter() and guards["idle"].bulkhead.try_enter()
    body = worker_status(guards, aggregates_meta(config), pid=123)
    assert body["worker"] == 123
    assert body["sources"]["idle"]["in_flight"] == 2
    assert body["sources"]["dead"]["in_flight"] == 0
    guards["idle"].bulkhead.leave()
    assert worker_status(guards, [], pid=1)["sources"]["idle"]["in_flight"] == 1


@pytest.mark.parametrize("dashboard", [True, False], ids=["dashboard-on", "dashboard-off"])
def test_the_document_has_status_and_the_page_only_when_it_is_served(dashboard: bool) -> None:
    document = build_openapi(parse_config(dead_config(), "t"), dashboard=dashboard)
    validate(document)
    assert "/status" in document["paths"]
    assert ("/" in document["paths"]) is dashboard
    if dashboard:
        page = document["paths"]["/"]["get"]["responses"]["200"]
        assert list(page["content"]) == ["text/html"]
        assert page["headers"]["Content-Security-Policy"]["required"] is True


def test_status_stays_when_the_dashboard_is_off(write_config: Callable[[str], Path]) -> None:
    settings = Settings(config=write_config(dead_config()), dashboard=False)
    client = create_app(settings).test_client()
    assert client.get("/status").status_code == 200
    assert "/" not in client.get("/openapi.json").get_json()["paths"]
