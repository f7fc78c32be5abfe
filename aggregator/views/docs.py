"""`/openapi.json` (the contract, generated from the config) and `/docs` (Swagger UI on it).

Swagger UI's assets come from the `flask-swagger-ui` package (Swagger UI 5, the first major
version that reads OpenAPI 3.1) and are served from this app: no CDN, so the page works on a
machine without internet access and leaks no visits. Its validator badge, which would send the
document to an outside service, is turned off.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response
from flask_swagger_ui import get_swaggerui_blueprint  # type: ignore[import-untyped]

from aggregator.config import AppConfig
from aggregator.openapi import build_openapi
from aggregator.routes import DOCS, OPENAPI, SYNC_POOL_PREFIX, SYNC_PREFIX


def register(app: Flask, config: AppConfig, *, dashboard: bool) -> None:
    """Build the document once (the config is read once) and attach both routes."""
    document = build_openapi(
        config, sync_prefixes=(SYNC_PREFIX, SYNC_POOL_PREFIX), dashboard=dashboard
    )
    body = app.json.dumps(document).encode()
    bp = Blueprint("docs", __name__)

    @bp.get(OPENAPI)
    def openapi() -> Response:
        """The OpenAPI 3.1 document of this deployment's aggregates, admin and health routes."""
        return Response(body, mimetype="application/json")

    app.register_blueprint(bp)
    ui = get_swaggerui_blueprint(
        DOCS,
        OPENAPI,
        config={"app_name": "aggregator API", "validatorUrl": None},
        blueprint_name="swagger_ui",
    )
    app.register_blueprint(ui)
