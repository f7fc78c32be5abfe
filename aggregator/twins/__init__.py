"""The sync twins: every aggregate again as plain `def` views, for the benchmark only.

Out of the core: nothing in `aggregator` outside this package imports it but the app factory.
"""

from __future__ import annotations

from aggregator.twins.views import SyncTwins, register, twins_of

__all__ = ["SyncTwins", "register", "twins_of"]
