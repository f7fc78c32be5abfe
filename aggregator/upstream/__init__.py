"""Everything about calling upstreams: the shared client, one call, and what an answer must be.

`client` makes the async call on the worker's shared client, `engines` builds that client (and
holds the fixes its HTTP stacks need), `checks` decides whether an answer is usable, and
`cachecontrol` reads what an upstream says about caching it. The names other modules use are
re-exported here; the sync twins' blocking call lives in `aggregator.twins.upstream_sync`.
"""

from __future__ import annotations

from aggregator.upstream.cachecontrol import parse_cache_control
from aggregator.upstream.client import (
    UpstreamClients,
    fetch,
)
from aggregator.upstream.engines import PoolUsage, build_client, pool_usage

__all__ = [
    "UpstreamClients",
    "PoolUsage",
    "build_client",
    "fetch",
    "parse_cache_control",
    "pool_usage",
]
