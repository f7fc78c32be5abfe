"""Liveness (`/healthz`) and readiness (`/readyz`) for load balancers, orchestrators and Docker.

They answer different questions, so they fail for different reasons. `/healthz` says the process
serves HTTP at all and touches nothing else: restarting a worker because Redis or an upstream is
down would not fix either. `/readyz` says this worker can do its job now: its config is loaded,
the shared upstream client is open on the server loop (the lifespan ran and has not shut down),
and the cache backend answers a ping. The client's detail counts its pool's connections (in use,
idle, waiting): with no request in flight, a connection still in use is a leak. Take a worker
out of rotation on 503, never restart it for one. Upstreams themselves are not probed: a dead
optional source is a partial answer, not an unready worker, and probing N upstreams per check
would multiply their load.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from aggregator.engine import current_engine
from aggregator.errors import CacheUnavailableError
from aggregator.routes import HEALTHZ, READYZ
from aggregator.upstream.engines import pool_usage
from aggregator.views.errors import error_response

bp = Blueprint("health", __name__)

#: One check's verdict: passed, and what was seen (or why it failed).
_Check = tuple[bool, str]


@bp.get(HEALTHZ)
def healthz() -> dict[str, str]:
    """Answer without touching upstreams, so a slow upstream never marks us unhealthy."""
    return {"status": "ok"}


@bp.get(READYZ)
async def readyz() -> Response:
    """200 when config, client and cache are usable; 503 naming each failed part and why."""
    checks = {"config": _check_config(), "client": _check_client(), "cache": await _check_cache()}
    report = {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()}
    failed = [name for name, (ok, _) in checks.items() if not ok]
    if failed:
        reasons = "; ".join(f"{name}: {checks[name][1]}" for name in failed)
        response = error_response(503, f"not ready: {reasons}", failed=failed, checks=report)
    else:
        response = jsonify(status="ready", checks=report)
    response.headers["Cache-Control"] = "no-store"
    return response


def _check_config() -> _Check:
    engine = current_engine()
    config, settings = engine.config, engine.settings
    source = str(settings.config) if settings.config else "the bundled demo config"
    return (
        True,
        f"{len(config.aggregates)} aggregates, {len(config.upstreams)} upstreams from {source}",
    )


def _check_client() -> _Check:
    # Looked up on the running loop: in a server that is the loop the lifespan opened it on.
    client = current_engine().clients.shared()
    if client is None:
        return False, "not open on this event loop (the ASGI lifespan startup has not run)"
    if client.is_closed:
        return False, "closed (the server is shutting down)"
    pool = pool_usage(client)
    return True, (
        f"open; upstream connections: {pool.in_use} in use, {pool.idle} idle, "
        f"{pool.waiting} waiting"
    )


async def _check_cache() -> _Check:
    try:
        return True, await current_engine().store.ping()
    except CacheUnavailableError as exc:
        return False, f"backend unreachable: {exc}"
