"""The cache: flask-caching backends plus what they lack.

The engine (`aggregator.engine`) builds the backend, the store around it, the per-process
`AggregateCache` and the `SourceCache` (per-upstream payloads, same store). Purging lives here,
shared by the CLI and the admin endpoint.
"""

from __future__ import annotations

from aggregator.cache.privacy import Caller, caller_from_headers
from aggregator.cache.purge import check_target, purge
from aggregator.cache.results import Fill, Filled, Lookup, WarmResult, looked_up
from aggregator.cache.service import AggregateCache
from aggregator.cache.sources import SourceCache
from aggregator.errors import CacheUnavailableError

__all__ = [
    "AggregateCache",
    "Caller",
    "CacheUnavailableError",
    "Fill",
    "Filled",
    "Lookup",
    "SourceCache",
    "WarmResult",
    "caller_from_headers",
    "check_target",
    "looked_up",
    "purge",
]
