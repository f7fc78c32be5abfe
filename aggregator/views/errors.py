"""One JSON error shape for every failure: `{"error": ..., "message": ..., "field": ...}`.

Never a traceback or an HTML page: dashboards parse whatever we send.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException, InternalServerError

from aggregator.errors import InvalidRequestError, error_body

logger = logging.getLogger(__name__)


def error_response(status: int, message: str, **fields: object) -> Response:
    """The one error body (`errors.error_body`) as a Flask response."""
    response = jsonify(error_body(status, message, **fields))
    response.status_code = status
    return response


def init_app(app: Flask, *, every_error: bool = True) -> None:
    """Register the JSON handlers: for a bad parameter, and (`every_error`) for every other
    failure too; the `Aggregator` extension leaves an app's own errors to the app."""

    @app.errorhandler(InvalidRequestError)
    def _invalid(exc: InvalidRequestError) -> Response:
        return error_response(exc.status, f"{exc.field}: {exc.reason}", field=exc.field)

    if not every_error:
        return

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        response = error_response(exc.code or 500, exc.description or "")
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, InternalServerError.description)
