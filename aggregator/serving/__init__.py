"""Serving: the ASGI adapter Hypercorn runs, and the bridge that keeps async views concurrent.

`adapter` (lifespan, dispatch, overload), `bridge` (greenlets and the Flask subclass), `limits`
(what a client may send), `answers` (responses sent without Flask), `access` (request ids and
the access line).
"""

from __future__ import annotations

from aggregator.serving.adapter import ASGIAdapter
from aggregator.serving.bridge import AggregatorFlask, await_only, greenlet_spawn

__all__ = ["ASGIAdapter", "AggregatorFlask", "await_only", "greenlet_spawn"]
