"""Serving: the ASGI adapter Hypercorn runs, and the bridge that keeps async views concurrent.

`wrap` (`to_asgi`: any Flask app), `adapter` (lifespan, dispatch, overload), `bridge` (greenlets,
the mixin and the Flask subclass), `stream` (a WSGI response sent as it is produced), `limits`
(what a client may send), `answers` (responses sent without Flask), `access` (request ids and
the access line).
"""

from __future__ import annotations

from aggregator.serving.adapter import ASGIAdapter
from aggregator.serving.bridge import AggregatorFlask, FlaskBridge, await_only, greenlet_spawn
from aggregator.serving.wrap import to_asgi

__all__ = [
    "ASGIAdapter",
    "AggregatorFlask",
    "FlaskBridge",
    "await_only",
    "greenlet_spawn",
    "to_asgi",
]
