"""One route per configured aggregate: answer through the cache with the request's lookup."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from flask import Blueprint, Flask, Response, request

from aggregator.cache import caller_from_headers, looked_up
from aggregator.config import AppConfig
from aggregator.engine import current_engine
from aggregator.params import parse_query


def register(app: Flask, config: AppConfig) -> None:
    """A blueprint with one route per aggregate in `config` (built per app: its routes come from
    that app's config)."""
    bp = Blueprint("aggregates", __name__)
    for name, agg in config.aggregates.items():
        bp.add_url_rule(agg.path, endpoint=name, view_func=_make_view(name), methods=["GET"])
    app.register_blueprint(bp)


def _make_view(name: str) -> Callable[[], Awaitable[Response]]:
    async def view() -> Response:
        engine = current_engine()
        lookup = looked_up.get()
        if lookup is not None and lookup.name == name:
            # The adapter's fast path parsed this request and looked it up: use what it found.
            answer = await engine.cache.answer(name, lookup.params, lookup.caller, lookup)
        else:
            query = parse_query(request.environ.get("QUERY_STRING", ""))
            params = engine.config.aggregates[name].parse_params(query)
            caller = caller_from_headers(request.headers.get, engine.config.vary_by(name))
            answer = await engine.cache.answer(name, params, caller)
        return Response(answer.body, status=answer.status, headers=answer.headers)

    view.__name__ = f"aggregate_{name}"
    view.__doc__ = f"Serve the {name!r} aggregate."
    return view
