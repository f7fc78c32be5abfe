"""The live dashboard page at `/`: pick an aggregate, fill its parameters, watch every source.

One Jinja2 template and plain JS/CSS files from the package (no build step, nothing from a CDN):
the page works on a machine without internet access and sends nothing elsewhere. The strict
Content-Security-Policy (own scripts, styles and fetches only; no inline code) keeps it that way.
The aggregates' metadata travels in the page as a JSON data block, which a CSP does not treat
as a script. Everything live comes from the aggregate endpoints and `/status`, fetched by the
page itself; the server does no work per refresh beyond answering those.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Flask, Response, render_template, request

from aggregator.engine import current_engine
from aggregator.models import JSONDict
from aggregator.routes import DASHBOARD, STATIC_PREFIX
from aggregator.status import DASHBOARD_CSP, SCOPE_NOTE
from aggregator.views.status import meta_of

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def register(app: Flask, *, enabled: bool) -> None:
    """Attach the page and its assets when enabled; otherwise `/` and `/static/` are 404s."""
    if not enabled:
        return
    bp = Blueprint("dashboard", __name__, static_folder=STATIC_DIR, static_url_path=STATIC_PREFIX)

    @bp.get(DASHBOARD)
    def page() -> Response:
        """The page; the script reads the aggregates from its `aggregator-meta` data block."""
        aggregates = meta_of(current_engine())
        meta = {"root": request.script_root, "aggregates": aggregates, "scope_note": SCOPE_NOTE}
        return _page(meta)

    # Jinja's `tojson` sorts keys by default; the form shows parameters in config order.
    app.jinja_env.policies["json.dumps_kwargs"] = {"sort_keys": False}
    app.register_blueprint(bp)


def _page(meta: JSONDict) -> Response:
    response = Response(render_template("dashboard.html", meta=meta), mimetype="text/html")
    response.headers["Content-Security-Policy"] = DASHBOARD_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response
