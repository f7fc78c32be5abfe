"""`/openapi.json` (the contract, generated from the config) and `/docs` (Swagger UI on it).

Swagger UI's assets come from the `flask-swagger-ui` package (Swagger UI 5, the first major
version that reads OpenAPI 3.1) and are served from this app: no CDN, so the page works on a
machine without internet access and leaks no visits. Its validator badge, which would send the
document to an outside service, is turned off.
"""

from __future__ import annotations

import weakref

from flask import Blueprint, Flask, Response, current_app
from flask_swagger_ui import get_swaggerui_blueprint  # type: ignore[import-untyped]

from aggregator.engine import Engine, current_engine
from aggregator.openapi import build_openapi
from aggregator.routes import DOCS, OPENAPI, SYNC_POOL_PREFIX, SYNC_PREFIX


def register(app: Flask, *, dashboard: bool, twins: bool = True) -> None:
    """Attach both routes; the document is built on first request, once per engine (its
    config, views included, never changes), so views decorated after this call are in it.
    `twins`: the sync twins' routes are served (`create_app`), so list them."""
    prefixes = (SYNC_PREFIX, SYNC_POOL_PREFIX) if twins else ()
    bodies: weakref.WeakKeyDictionary[Engine, bytes] = weakref.WeakKeyDictionary()
    bp = Blueprint("docs", __name__)

    @bp.get(OPENAPI)
    def openapi() -> Response:
        """The OpenAPI 3.1 document of this deployment's aggregates, admin and health routes."""
        engine = current_engine()
        body = bodies.get(engine)
        if body is None:
            document = build_openapi(
                engine.config,
                sync_prefixes=prefixes,
                dashboard=dashboard,
                views=engine.fill.views,
            )
            body = bodies[engine] = current_app.json.dumps(document).encode()
        return Response(body, mimetype="application/json")

    app.register_blueprint(bp)
    ui = get_swaggerui_blueprint(
        DOCS,
        OPENAPI,
        config={"app_name": "aggregator API", "validatorUrl": None},
        blueprint_name="swagger_ui",
    )
    app.register_blueprint(ui)
