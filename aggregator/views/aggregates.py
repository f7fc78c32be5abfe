"""One route per configured aggregate: answer through the cache with the request's lookup, as
JSON, or as events when the request's Accept asks for them (`views.progressive`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from flask import Blueprint, Flask, Response, request

from aggregator.cache import caller_from_headers, looked_up
from aggregator.config import AppConfig
from aggregator.engine import current_engine
from aggregator.errors import InvalidRequestError
from aggregator.params import parse_query
from aggregator.views import progressive


def register(app: Flask, config: AppConfig) -> None:
    """A blueprint with one route per aggregate in `config` (built per app: its routes come from
    that app's config)."""
    bp = Blueprint("aggregates", __name__)
    for name, agg in config.aggregates.items():
        bp.add_url_rule(agg.path, endpoint=name, view_func=_make_view(name), methods=["GET"])
    app.register_blueprint(bp)


async def answer(name: str) -> Response:
    """The current request's answer from aggregate `name` (configured or written as a view)."""
    engine = current_engine()
    lookup = looked_up.get()
    if lookup is not None and lookup.name == name:
        # The adapter's fast path parsed this request and looked it up: use what it found.
        params, caller = lookup.params, lookup.caller
    else:
        lookup = None
        query = parse_query(request.environ.get("QUERY_STRING", ""))
        caller = caller_from_headers(request.headers.get, engine.config.vary_by(name))
        try:
            params = engine.config.aggregates[name].parse_params(query)
        except InvalidRequestError as exc:
            if caller.stream:
                return progressive.refused(caller.stream, exc)
            raise
    if caller.stream:  # Accept: text/event-stream or application/x-ndjson
        return await progressive.answer(name, params, caller, lookup)
    found = await engine.cache.answer(name, params, caller, lookup)
    return Response(found.body, status=found.status, headers=found.headers)


def _make_view(name: str) -> Callable[[], Awaitable[Response]]:
    async def view() -> Response:
        return await answer(name)

    view.__name__ = f"aggregate_{name}"
    view.__doc__ = f"Serve the {name!r} aggregate."
    return view
