"""Per-process tuning for serving processes (our Hypercorn workers, the bench's reference)."""

from __future__ import annotations

import gc


def tune_gc(threshold: int) -> None:
    """Freeze what start-up built and collect young objects less often (0: Python's defaults).

    Each fan-out allocates thousands of short-lived containers (requests, responses, models,
    tasks). At Python's generation-0 threshold of 700 the collector ran every few requests and
    cost ~30% of the framework's CPU per request (in-process, 64 concurrent requests, upstream
    calls stubbed: 290 -> 205 us) and ~10% of a whole aggregated request's on the bench
    (2.79 -> 2.50 ms at c=64, docs/benchmarks.md). Everything alive after start-up (modules,
    the app, config models) lives as long as the process; frozen, no full collection walks it
    again. With a
    higher threshold the requests' containers die by reference counting before a collection
    looks at them; the few real cycles wait a little longer.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)
