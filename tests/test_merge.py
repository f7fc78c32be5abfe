"""Pure merging of source results into the envelope, its HTTP status and Server-Timing."""

from __future__ import annotations

import re
from typing import Any

import pytest

from aggregator.merge import merge, server_timing
from aggregator.models import SourceResult, SourceStatus


def ok(name: str, data: object = None, ms: float = 10.0) -> SourceResult:
    return SourceResult(
        name=name, status="ok", ms=ms, data={"from": name} if data is None else data
    )


def failed(name: str, status: SourceStatus, ms: float = 20.0, **extra: Any) -> SourceResult:
    return SourceResult(name=name, status=status, ms=ms, **extra)


def results(*items: SourceResult) -> dict[str, SourceResult]:
    return {r.name: r for r in items}


def test_complete() -> None:
    envelope, status = merge(results(ok("a"), ok("b", data=[1, 2])), required=["a"])

    assert status == 200
    assert envelope.complete is True
    assert envelope.data == {"a": {"from": "a"}, "b": [1, 2]}
    assert envelope.errors == {}
    assert {n: (s.status, s.ms) for n, s in envelope.sources.items()} == {
        "a": ("ok", 10.0),
        "b": ("ok", 10.0),
    }


def test_ok_source_with_null_data_is_kept() -> None:
    source = SourceResult(name="a", status="ok", ms=1.0, data=None)

    envelope, status = merge({"a": source}, required=[])

    assert status == 200
    assert envelope.data == {"a": None}
    assert envelope.complete


def test_partial_when_an_optional_source_fails() -> None:
    envelope, status = merge(
        results(ok("profile"), failed("news", "timeout", detail="no answer within 0.8 s")),
        required=["profile"],
    )

    assert status == 200
    assert envelope.complete is False
    assert envelope.data == {"profile": {"from": "profile"}}
    assert list(envelope.errors) == ["news"]
    assert envelope.errors["news"].kind == "timeout"
    assert envelope.sources["news"].status == "timeout"
    assert envelope.sources["profile"].status == "ok"


@pytest.mark.parametrize(
    ("items", "required", "expected"),
    [
        pytest.param([ok("a"), ok("b")], [], 200, id="all-ok-none-required"),
        pytest.param([ok("a"), failed("b", "timeout")], ["a"], 200, id="optional-timeout"),
        pytest.param([ok("a"), failed("b", "deadline")], ["a"], 200, id="optional-deadline"),
        pytest.param([failed("a", "http_status"), ok("b")], ["a"], 502, id="required-http"),
        pytest.param([failed("a", "timeout")], ["a"], 502, id="required-timeout"),
        pytest.param([failed("a", "connect")], ["a"], 502, id="required-connect"),
        pytest.param([failed("a", "invalid_json")], ["a"], 502, id="required-invalid-json"),
        pytest.param([failed("a", "validation")], ["a"], 502, id="required-validation"),
        pytest.param([failed("a", "too_large")], ["a"], 502, id="required-too-large"),
        pytest.param([failed("a", "circuit_open")], ["a"], 502, id="required-circuit-open"),
        pytest.param([failed("a", "deadline"), ok("b")], ["a"], 504, id="required-deadline"),
        pytest.param(
            [failed("a", "http_status"), failed("b", "deadline")],
            ["a", "b"],
            504,
            id="required-deadline-wins",
        ),
        pytest.param(
            [failed("a", "http_status"), failed("b", "deadline")],
            ["a"],
            502,
            id="optional-deadline-does-not-make-504",
        ),
        pytest.param([failed("a", "timeout"), ok("b")], [], 200, id="optional-failed"),
        # nothing arrived: no partial answer to give, whatever was required
        pytest.param([failed("a", "timeout"), failed("b", "connect")], [], 502, id="all-failed"),
        pytest.param(
            [failed("a", "timeout"), failed("b", "deadline")], [], 504, id="all-failed-deadline"
        ),
        pytest.param(
            [failed("a", "timeout"), failed("b", "timeout", fallback=True)],
            [],
            200,
            id="all-failed-one-fallback",
        ),
    ],
)
def test_status(items: list[SourceResult], required: list[str], expected: int) -> None:
    envelope, status = merge(results(*items), required)

    assert status == expected
    assert envelope.complete is all(r.ok for r in items)


def test_error_envelope_carries_kind_detail_status_locations() -> None:
    envelope, _ = merge(
        results(
            failed("bad", "http_status", detail="answered HTTP 503", upstream_status=503),
            failed(
                "shape",
                "validation",
                detail="the payload does not match Stocks (2 errors)",
                locations=["user_id", "quotes.0.price"],
            ),
            failed("slow", "deadline"),
        ),
        required=[],
    )

    dumped = envelope.model_dump(mode="json", exclude_none=True)
    assert dumped["errors"] == {
        "bad": {"kind": "http_status", "detail": "answered HTTP 503", "status": 503},
        "shape": {
            "kind": "validation",
            "detail": "the payload does not match Stocks (2 errors)",
            "locations": ["user_id", "quotes.0.price"],
        },
        # Without a detail, the kind stands in for it so the field is never empty.
        "slow": {"kind": "deadline", "detail": "deadline"},
    }
    assert dumped["data"] == {}
    assert dumped["complete"] is False
    assert dumped["sources"] == {
        "bad": {"status": "http_status", "ms": 20.0},
        "shape": {"status": "validation", "ms": 20.0},
        "slow": {"status": "deadline", "ms": 20.0},
    }


def test_envelope_keeps_source_order() -> None:
    items = [ok("z"), failed("m", "timeout"), ok("a")]

    envelope, _ = merge(results(*items), required=[])

    assert list(envelope.sources) == ["z", "m", "a"]
    assert list(envelope.data) == ["z", "a"]


def test_server_timing_has_one_entry_per_source() -> None:
    timing = server_timing(
        results(ok("weather", ms=101.2), failed("news", "timeout", ms=800.4), ok("profile", ms=0))
    )

    assert timing == (
        'weather;dur=101.2;desc="ok", news;dur=800.4;desc="timeout", profile;dur=0;desc="ok"'
    )
    assert len(timing.split(", ")) == 3


# The Server-Timing grammar (W3C Server Timing, with RFC 9110's token and quoted-string).
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_METRIC = re.compile(rf"{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}[ \t]*=[ \t]*(?:{_TOKEN}|{_QUOTED}))*")


def test_server_timing_says_when_each_source_started_and_stays_valid() -> None:
    weather = ok("weather", ms=101.2)
    weather.started = 48.1
    first = ok("profile", ms=48.0)
    first.started = 0.0
    never = failed("late", "deadline", ms=1500.0)  # cut off while it waited: never started

    timing = server_timing(results(first, weather, never))

    assert timing == (
        'profile;dur=48.0;desc="ok";start=0.0, weather;dur=101.2;desc="ok";start=48.1, '
        'late;dur=1500.0;desc="deadline"'
    )
    for entry in timing.split(", "):
        assert _METRIC.fullmatch(entry), entry
    envelope, _ = merge(results(first, weather, never), required=[])
    dumped = envelope.model_dump(mode="json", exclude_none=True)["sources"]
    assert dumped == {
        "profile": {"status": "ok", "ms": 48.0, "started": 0.0},
        "weather": {"status": "ok", "ms": 101.2, "started": 48.1},
        "late": {"status": "deadline", "ms": 1500.0},
    }


def test_server_timing_of_nothing_is_empty() -> None:
    assert server_timing({}) == ""
