"""`GET /metrics`: Prometheus text, behind the admin token unless the operator made it public.

Not public by default: metric names, label values and counts tell an outsider which upstreams
exist and how they fail. With AGGREGATOR_METRICS=token (the default) the route needs the admin
token and answers 404 while none is set; `public` drops the check (for a private network); `off`
answers 404 and nothing is recorded. A `def` view: in multiprocess mode it reads every worker's
files, blocking I/O that belongs in the view pool, not on the event loop.
"""

from __future__ import annotations

from flask import Blueprint, Response

from aggregator import metrics
from aggregator.engine import current_engine
from aggregator.routes import METRICS
from aggregator.views.admin import check_token
from aggregator.views.errors import error_response

bp = Blueprint("metrics", __name__)


@bp.get(METRICS)
def scrape() -> Response:
    """Every metric of this deployment (all workers) in Prometheus text format."""
    settings = current_engine().settings
    if settings.metrics == "off" or (settings.metrics == "token" and not settings.admin_secret()):
        return error_response(
            404,
            "metrics are not served here: set AGGREGATOR_ADMIN_TOKEN (then send it as "
            "'Authorization: Bearer <token>') or AGGREGATOR_METRICS=public on the server",
        )
    if settings.metrics == "token":
        denied = check_token()
        if denied is not None:
            return denied
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})
