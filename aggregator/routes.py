"""Every fixed path the app serves, once; the reserved and always-answered sets derive from them.

An aggregate's configured path may not shadow any of these (config validation reads
`RESERVED_PATHS` and `RESERVED_PREFIXES`), and the adapter answers `ALWAYS_ANSWERED` even at its
in-flight limit (`aggregator.serving` says why).
"""

from __future__ import annotations

DASHBOARD = "/"
STATIC_PREFIX = "/static"
HEALTHZ = "/healthz"
READYZ = "/readyz"
STATUS = "/status"
METRICS = "/metrics"
OPENAPI = "/openapi.json"
DOCS = "/docs"
ADMIN_PREFIX = "/admin"
ADMIN_PURGE = f"{ADMIN_PREFIX}/purge"
ADMIN_WARM = f"{ADMIN_PREFIX}/warm"
#: The sync twins of every aggregate: `/sync/api/x` (in turn), `/sync-pool/api/x` (threads).
SYNC_PREFIX = "/sync"
SYNC_POOL_PREFIX = "/sync-pool"

RESERVED_PATHS = frozenset(
    {DASHBOARD, STATUS, HEALTHZ, READYZ, METRICS, OPENAPI, DOCS, SYNC_PREFIX, SYNC_POOL_PREFIX}
)
#: Admin endpoints, the API docs' and dashboard's assets, and the sync twins of every aggregate.
RESERVED_PREFIXES = tuple(
    f"{prefix}/" for prefix in (ADMIN_PREFIX, DOCS, STATIC_PREFIX, SYNC_PREFIX, SYNC_POOL_PREFIX)
)
#: Answered even at the in-flight limit and not counted in it: the probes, /status and /metrics.
ALWAYS_ANSWERED = frozenset({HEALTHZ, READYZ, STATUS, METRICS})
