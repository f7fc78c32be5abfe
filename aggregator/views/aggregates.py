"""One route per configured aggregate: parse parameters, fan out, merge, answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from aggregator.config import AppConfig
from aggregator.fanout import fan_out
from aggregator.merge import merge, server_timing
from aggregator.settings import Settings
from aggregator.upstream import borrow_client


def register(app: Flask, config: AppConfig) -> None:
    """Attach a blueprint with one route per aggregate in `config`.

    The blueprint is built per app because its routes come from that app's config.
    """
    bp = Blueprint("aggregates", __name__)
    for name in config.aggregates:
        path = config.aggregates[name].path
        bp.add_url_rule(path, endpoint=name, view_func=_make_view(name), methods=["GET"])
    app.register_blueprint(bp)


def _make_view(name: str) -> Callable[[], Awaitable[Response]]:
    async def view() -> Response:
        config: AppConfig = current_app.extensions["aggregator.config"]
        settings: Settings = current_app.extensions["aggregator.settings"]
        aggregate = config.aggregates[name]
        params = aggregate.parse_params(request.args.to_dict(flat=False))
        async with borrow_client(settings) as client:
            results = await fan_out(
                client, config, aggregate, params, max_body=settings.max_upstream_body
            )
        envelope, status = merge(results, aggregate.required)
        response = jsonify(envelope.model_dump(mode="json", exclude_none=True))
        response.status_code = status
        response.headers["X-Aggregate-Complete"] = "true" if envelope.complete else "false"
        response.headers["Server-Timing"] = server_timing(results)
        return response

    view.__name__ = f"aggregate_{name}"
    view.__doc__ = f"Serve the {name!r} aggregate."
    return view
