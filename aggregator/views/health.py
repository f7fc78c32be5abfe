"""Liveness for load balancers and the Dockerfile's HEALTHCHECK."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """Answer without touching upstreams, so a slow upstream never marks us unhealthy."""
    return {"status": "ok"}
