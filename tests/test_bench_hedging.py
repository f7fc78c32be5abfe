"""`python -m aggregator.bench.hedging` end to end (its own demo and Hypercorn), on a
deterministic tail: every other call to the demo source stalls 1 s."""

from __future__ import annotations

import pytest

from aggregator.bench.hedging import measure

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_the_hedging_bench_sees_the_hedge_cut_the_tail_and_counts_its_cost() -> None:
    plain, hedged = await measure(
        knobs="delay=0.01&tail_every=2&tail_delay=1",
        hedge_after="0.1",
        concurrency=1,
        requests=6,
        rounds=1,
        retry_budget=1.0,  # about half the calls are hedged: more than the default 0.2 allows
    )

    assert (plain["aggregate"], hedged["aggregate"]) == ("plain", "hedged")
    assert plain["requests"] == hedged["requests"] == 6
    # Unhedged, every other call takes its 1 s stall; hedged, a stalled first attempt's hedge
    # is the next call, which does not stall.
    assert plain["all_max_ms"] >= 1000
    assert hedged["all_max_ms"] < 900
    assert plain["upstream_calls_per_request"] == 1.0
    assert 1.0 < hedged["upstream_calls_per_request"] <= 2.0
    assert hedged["hedges"]["hedge_won"] >= 1 and hedged["hedges"]["refused"] == 0
    assert hedged["server_cpu_ms_per_request"] > 0
