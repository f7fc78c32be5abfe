"""The fast path parses each (aggregate, query string) once, and never shares a mutable copy."""

from __future__ import annotations

import pytest

from aggregator.params import parse_query
from aggregator.serving import fastpath
from aggregator.serving.fastpath import FastPath
from tests.support.fake_cache import make_cache


async def test_a_repeated_query_is_parsed_once_and_each_request_gets_its_own_params(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[str] = []

    def counting(query: str) -> dict[str, list[str]]:
        parsed.append(query)
        return parse_query(query)

    monkeypatch.setattr(fastpath, "parse_query", counting)
    service, _, _ = make_cache()
    fast = FastPath(service, service.config)
    _, first = await fast("/dash", "city=Paris", [])
    assert first is not None
    first.params["city"] = "Oslo"  # type: ignore[index]  # what a careless view might do
    _, second = await fast("/dash", "city=Paris", [])
    assert second is not None and second.params["city"] == "Paris"
    assert parsed == ["city=Paris"]


async def test_a_bad_query_is_left_to_flask_every_time() -> None:
    service, _, _ = make_cache()
    fast = FastPath(service, service.config)
    assert await fast("/dash", "nocity=1", []) == (None, None)
    assert await fast("/dash", "nocity=1", []) == (None, None)
    assert not fast._params


async def test_the_parsed_queries_held_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "_PARAMS_HELD", 3)
    service, _, _ = make_cache()
    fast = FastPath(service, service.config)
    for n in range(10):
        _, lookup = await fast("/dash", f"city=C{n}", [])
        assert lookup is not None and lookup.params["city"] == f"C{n}"
        assert len(fast._params) <= 3
