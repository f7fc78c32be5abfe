"""Dependent sources, the pure part: run order, and the values a source takes from an answer."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from aggregator import graph
from aggregator.config import AppConfig, parse_config
from aggregator.models import SourceResult

GRAPH = """
[upstreams.a]
url = "http://h/a/{user_id}"

[upstreams.b]
url = "http://h/b/{a.city}"

[upstreams.c]
url = "http://h/c?team={a.team.id}&first={a.teams.0.name}"

[upstreams.d]
url = "http://h/d/{b.x}/{c.y}"

[upstreams.e]
url = "http://h/e"

[aggregates.g]
path = "/g"
sources = ["d", "c", "e", "b", "a"]
params = { user_id = "int" }
"""


@pytest.fixture
def config() -> AppConfig:
    return parse_config(GRAPH, "graph")


def test_waves_follow_the_needs_and_keep_config_order(config: AppConfig) -> None:
    aggregate = config.aggregates["g"]

    assert graph.is_graph(config, aggregate)
    assert graph.waves(config, aggregate.sources) == [["e", "a"], ["c", "b"], ["d"]]


def test_independent_sources_are_one_wave(config: AppConfig) -> None:
    assert graph.waves(config, ["e", "a"]) == [["e", "a"]]


def ok(name: str, data: Any) -> SourceResult:
    return SourceResult(name=name, status="ok", ms=1.0, data=data)


ANSWER = {"city": "Paris", "team": {"id": 3}, "teams": [{"name": "core"}]}


def test_field_values_from_an_answer(config: AppConfig) -> None:
    values = graph.field_values(config.upstreams["c"], {"a": ok("a", ANSWER)})

    assert values == {"a.team.id": 3, "a.teams.0.name": "core"}


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        pytest.param({}, "needs a.city: a.city is missing", id="absent"),
        pytest.param({"city": None}, "needs a.city: a.city is missing (null)", id="null"),
        pytest.param(
            {"city": {"name": "Paris"}}, "needs a.city: a.city is an object, not a value", id="obj"
        ),
        pytest.param({"city": ["Paris"]}, "needs a.city: a.city is a list, not a value", id="list"),
        pytest.param(["Paris"], "needs a.city: a.city is missing", id="answer-is-a-list"),
        pytest.param(None, "needs a.city: a.city is missing", id="answer-is-null"),
    ],
)
def test_a_field_that_cannot_be_had_says_why(config: AppConfig, answer: Any, why: str) -> None:
    assert graph.field_values(config.upstreams["b"], {"a": ok("a", answer)}) == why


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param({"city": True}, True, id="bool"),
        pytest.param({"city": 0}, 0, id="zero"),
        pytest.param({"city": -2.5}, -2.5, id="float"),
        pytest.param({"city": ""}, "", id="empty-string"),
    ],
)
def test_every_scalar_is_a_value(config: AppConfig, answer: Any, expected: object) -> None:
    assert graph.field_values(config.upstreams["b"], {"a": ok("a", answer)}) == {"a.city": expected}


def test_list_indices_out_of_range_or_not_digits_are_missing(config: AppConfig) -> None:
    up = config.upstreams["c"]
    short = {"team": {"id": 1}, "teams": []}
    named = {"team": {"id": 1}, "teams": {"0": {"name": "by key"}}}

    assert graph.field_values(up, {"a": ok("a", short)}) == (
        "needs a.teams.0.name: a.teams.0.name is missing"
    )
    # An object's key of digits is just a key.
    assert graph.field_values(up, {"a": ok("a", named)}) == {
        "a.team.id": 1,
        "a.teams.0.name": "by key",
    }


def test_a_failed_source_is_named_with_its_kind(config: AppConfig) -> None:
    failed = SourceResult(name="a", status="timeout", ms=800.0, detail="no answer within 0.8 s")

    assert graph.field_values(config.upstreams["b"], {"a": failed}) == (
        "needs a.city: a failed (timeout)"
    )


def test_a_failed_source_with_fallback_data_lends_it(config: AppConfig) -> None:
    served = SourceResult(
        name="a", status="http_status", ms=3.0, data={"city": "Lima"}, fallback=True
    )

    assert graph.field_values(config.upstreams["b"], {"a": served}) == {"a.city": "Lima"}


def test_every_problem_of_a_source_with_several_needs_is_named(config: AppConfig) -> None:
    up = config.upstreams["d"]
    b = SourceResult(name="b", status="dependency", ms=0.0, detail="needs a.city: ...")

    assert graph.field_values(up, {"b": b, "c": ok("c", {"y": {}})}) == (
        "needs b.x: b failed (dependency); needs c.y: c.y is an object, not a value"
    )


@pytest.mark.parametrize(
    "value",
    ["../", "../../admin", "@evil.com", "a\r\nX-Injected: 1", "?x=1", "#frag", "%2F", ".."],
)
def test_a_hostile_value_from_an_answer_stays_in_its_segment(config: AppConfig, value: str) -> None:
    # The answer's value is rendered exactly like a parameter: it never leaves its segment.
    answer = {"city": value, "team": {"id": value}, "teams": [{"name": value}]}
    results = {"a": ok("a", answer)}
    b_values = graph.field_values(config.upstreams["b"], results)
    c_values = graph.field_values(config.upstreams["c"], results)
    assert isinstance(b_values, dict) and isinstance(c_values, dict)

    b_url = httpx.URL(config.upstreams["b"].template.render(b_values))
    c_url = httpx.URL(config.upstreams["c"].template.render(c_values))

    for url in (b_url, c_url):
        assert (url.scheme, url.host, url.port, url.userinfo, url.fragment) == (
            "http",
            "h",
            None,
            b"",
            "",
        )
    segments = b_url.raw_path.decode().split("/")
    assert segments[:2] == ["", "b"] and len(segments) == 3
    assert httpx.URL(f"http://h/{segments[2]}").path == f"/{value}"  # decodes back, in one piece
    assert b_url.query == b""
    assert c_url.raw_path.startswith(b"/c?")
    assert list(c_url.params.keys()) == ["team", "first"]
    assert c_url.params["team"] == value and c_url.params["first"] == value
