"""`GET /status`: this worker's circuit breakers and in-flight calls, and the aggregates.

For the dashboard page and for scripts. It reads in-memory counters only (no I/O), so it is as
cheap as `/healthz`; it is not a probe (the state of upstreams is not the readiness of a worker).
"""

from __future__ import annotations

import os
import weakref

from flask import Blueprint, Flask, Response, jsonify

from aggregator.engine import Engine, current_engine
from aggregator.models import JSONDict
from aggregator.routes import STATUS
from aggregator.status import aggregates_meta, worker_status

_META: weakref.WeakKeyDictionary[Engine, list[JSONDict]] = weakref.WeakKeyDictionary()


def meta_of(engine: Engine) -> list[JSONDict]:
    """The aggregates' part of `/status` and the dashboard (built once per engine: the config,
    views included, never changes once the engine is built)."""
    meta = _META.get(engine)
    if meta is None:
        meta = _META[engine] = aggregates_meta(engine.config)
    return meta


def register(app: Flask) -> None:
    """Attach the route (it reads the engine of the app it serves)."""
    bp = Blueprint("status", __name__)

    @bp.get(STATUS)
    def status() -> Response:
        """The answering worker's state; the pid tells workers apart (each has its own
        breakers)."""
        engine = current_engine()
        response = jsonify(worker_status(engine.guards, meta_of(engine), os.getpid()))
        response.headers["Cache-Control"] = "no-store"
        return response

    app.register_blueprint(bp)
