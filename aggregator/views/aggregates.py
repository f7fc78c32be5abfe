"""One route per configured aggregate: parse parameters, answer through the cache."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from flask import Blueprint, Flask, Response, current_app, request

from aggregator import cache, metrics
from aggregator.config import AppConfig, ParamValue
from aggregator.fanout import fan_out
from aggregator.merge import merge, server_timing
from aggregator.resilience import Guards
from aggregator.settings import Settings
from aggregator.upstream import borrow_client


def register(app: Flask, settings: Settings, config: AppConfig) -> None:
    """Attach the cache and a blueprint with one route per aggregate in `config`.

    The blueprint is built per app because its routes come from that app's config. So are the
    upstreams' guards (retries, breakers, bulkheads): one set per app, i.e. per worker process,
    shared with the sync twins.
    """
    recorder: metrics.Recorder = app.extensions.get("aggregator.metrics", metrics.OFF)
    guards = Guards(config.upstreams, circuit_listener=recorder.circuit_listener)
    app.extensions["aggregator.guards"] = guards
    cache.init_app(app, settings, config, _filler(app, settings, config, guards, recorder))
    bp = Blueprint("aggregates", __name__)
    for name, agg in config.aggregates.items():
        bp.add_url_rule(agg.path, endpoint=name, view_func=_make_view(name), methods=["GET"])
    app.register_blueprint(bp)


def _filler(
    app: Flask, settings: Settings, config: AppConfig, guards: Guards, recorder: metrics.Recorder
) -> cache.FillFn:
    async def fill(name: str, params: Mapping[str, ParamValue]) -> cache.Filled:
        aggregate = config.aggregates[name]
        # Looked up per fill: init_app creates it after this function (and fills also run in
        # background refreshes, outside any app context).
        sources: cache.SourceCache | None = app.extensions.get("aggregator.source_cache")
        async with borrow_client(settings) as client:
            results = await fan_out(
                client,
                config,
                aggregate,
                params,
                max_body=settings.max_upstream_body,
                source_cache=sources,
                guards=guards,
            )
        recorder.sources(results.values())
        envelope, status = merge(results, aggregate.required)
        body = envelope.model_dump_json(exclude_none=True).encode()
        return cache.Filled(status, body, envelope.complete, server_timing(results))

    return fill


def _make_view(name: str) -> Callable[[], Awaitable[Response]]:
    async def view() -> Response:
        config: AppConfig = current_app.extensions["aggregator.config"]
        service: cache.AggregateCache = current_app.extensions["aggregator.cache"]
        query = cache.parse_query(request.environ.get("QUERY_STRING", ""))
        params = config.aggregates[name].parse_params(query)
        lookup = request.environ.get("aggregator.hint")
        caller = cache.caller_from_headers(request.headers.get, config.vary_by(name))
        answer = await service.answer(name, params, caller, lookup)
        return Response(answer.body, status=answer.status, headers=answer.headers)

    view.__name__ = f"aggregate_{name}"
    view.__doc__ = f"Serve the {name!r} aggregate."
    return view
