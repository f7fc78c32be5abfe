"""`GET /status`: this worker's circuit breakers and in-flight calls, and the aggregates.

For the dashboard page and for scripts. It reads in-memory counters only (no I/O), so it is as
cheap as `/healthz`; it is not a probe (the state of upstreams is not the readiness of a worker).
"""

from __future__ import annotations

import os

from flask import Blueprint, Flask, Response, current_app, jsonify

from aggregator.config import AppConfig
from aggregator.resilience import Guards
from aggregator.status import STATUS_PATH, aggregates_meta, worker_status

bp = Blueprint("status", __name__)


def register(app: Flask, config: AppConfig) -> None:
    """Attach the route; the aggregates' part never changes, so it is built once."""
    app.extensions["aggregator.aggregates_meta"] = aggregates_meta(config)
    app.register_blueprint(bp)


@bp.get(STATUS_PATH)
def status() -> Response:
    """The answering worker's state; the pid tells workers apart (each has its own breakers)."""
    guards: Guards = current_app.extensions["aggregator.guards"]
    meta = current_app.extensions["aggregator.aggregates_meta"]
    response = jsonify(worker_status(guards, meta, os.getpid()))
    response.headers["Cache-Control"] = "no-store"
    return response
