"""`GET /status`: this worker's circuit breakers and in-flight calls, and the aggregates.

For the dashboard page and for scripts. It reads in-memory counters only (no I/O), so it is as
cheap as `/healthz`; it is not a probe (the state of upstreams is not the readiness of a worker).
"""

from __future__ import annotations

import os

from flask import Blueprint, Flask, Response, jsonify

from aggregator.engine import Engine
from aggregator.models import JSONDict
from aggregator.routes import STATUS
from aggregator.status import worker_status


def register(app: Flask, engine: Engine, meta: list[JSONDict]) -> None:
    """Attach the route; `meta` (the aggregates' part) never changes, so it is built once."""
    bp = Blueprint("status", __name__)

    @bp.get(STATUS)
    def status() -> Response:
        """The answering worker's state; the pid tells workers apart (each has its own
        breakers)."""
        response = jsonify(worker_status(engine.guards, meta, os.getpid()))
        response.headers["Cache-Control"] = "no-store"
        return response

    app.register_blueprint(bp)
