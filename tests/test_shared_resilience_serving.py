"""Shared resilience state across real servers: two `aggregator serve -w 2` on loopback, one
Redis, a dead demo upstream; how many calls reach it, shared state vs each worker alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator.demo.process import DemoProcess
from tests.support.fleet import dead_calls, dead_config

pytestmark = pytest.mark.integration

COOLDOWN = 0.25  # short, so a few seconds hold many cool-downs


@pytest.mark.timeout(240)  # eight server processes start on a shared machine
def test_a_shared_breaker_lets_far_fewer_calls_reach_a_dead_upstream(
    demo: DemoProcess, write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    config = write_config(dead_config(demo.url, cooldown=COOLDOWN))
    counts: dict[bool, int] = {}
    for mode in (False, True):
        counts[mode], answered = dead_calls(
            demo,
            tmp_path,
            config,
            processes=2,
            workers=2,
            seconds=4.0,
            shared=mode,
            shared_resilience_interval="0.1",
        )
        assert answered > 20, f"the load barely ran ({answered} requests)"
    local, shared = counts[False], counts[True]
    # Alone, each of 4 workers trips after 3 failures and probes once per cool-down (~4 x 19
    # here); shared, the fleet probes once per cool-down. Expect ~3x fewer; assert 1.5x.
    assert shared >= 3, f"the dead upstream was never called ({shared})"
    assert shared * 1.5 < local, f"shared {shared} calls vs local {local}"
