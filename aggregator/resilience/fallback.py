"""Fallback data: a failed source answered with the static data its config provides.

Flagged `fallback`, keeping its error kind in `errors`, so the answer is not `complete`: a
dashboard can show something, and still knows the source failed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from aggregator.models import SourceResult
from aggregator.shape import apply_shape

if TYPE_CHECKING:
    from aggregator.config import UpstreamConfig


def with_fallback(result: SourceResult, upstream: UpstreamConfig) -> SourceResult:
    """A failed result answered with the upstream's static fallback data, if it has any.

    The error kind stays (it is still reported under `errors`, so the answer is not complete);
    only `data` and the `fallback` flag change.
    """
    if result.ok or upstream.fallback is None:
        return result
    # Shaped like a live answer, so a dashboard reads the same fields either way.
    data = apply_shape(result.name, upstream, upstream.fallback_data)
    return dataclasses.replace(result, data=data, fallback=True)
