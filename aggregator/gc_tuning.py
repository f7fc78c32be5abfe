"""Garbage-collector tuning for serving processes (our Hypercorn workers, the bench's reference)."""

from __future__ import annotations

import gc


def tune_gc(threshold: int) -> None:
    """Freeze what start-up built and collect young objects less often (0: Python's defaults).

    Each fan-out allocates thousands of short-lived containers (requests, responses, models,
    tasks). At Python's generation-0 threshold of 700 the collector ran every few requests and
    took a large share of the CPU per request (docs/benchmarks.md has the figures). Everything
    alive after start-up (modules, the app, config models) lives as long as the process;
    frozen, no full collection walks it again. With a higher threshold the requests' containers
    die by reference counting before a collection looks at them; the few real cycles wait a
    little longer.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)
