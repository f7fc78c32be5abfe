"""The operations built from the config: each aggregate's path, its envelope and its sync twins.

Everything here varies with the config (sources, required ones, parameters, `cache_vary`, the
headers its sources forward), so a dashboard's contract is exactly what is served.
"""

from __future__ import annotations

from pydantic import BaseModel

from aggregator.config import AggregateConfig, AppConfig
from aggregator.models import JSONDict, SourceError, SourceInfo, StaleInfo
from aggregator.openapi.parameters import query_parameters
from aggregator.openapi.progressive import progressive_content
from aggregator.openapi.responses import (
    envelope_name,
    error_response,
    header_spec,
    json_response,
    ref,
    unavailable_response,
)


def envelope_schema(
    agg: AggregateConfig, data: JSONDict, refs: dict[type[BaseModel], JSONDict]
) -> JSONDict:
    return {
        "type": "object",
        "description": "The merged answer: what arrived, what failed, and whether it is whole.",
        "required": ["data", "errors", "sources", "complete"],
        "properties": {
            "data": {
                "type": "object",
                "description": "One payload per source that answered (or served its fallback).",
                "properties": data,
                "additionalProperties": False,
            },
            "errors": {
                "type": "object",
                "description": "One entry per source that failed.",
                "propertyNames": {"enum": list(agg.sources)},
                "additionalProperties": refs[SourceError],
            },
            "sources": {
                "type": "object",
                "description": "Status, ms and start (ms since the fan-out) of every source.",
                "properties": {s: refs[SourceInfo] for s in agg.sources},
                "required": list(agg.sources),
                "additionalProperties": False,
            },
            "complete": {"type": "boolean", "description": "True when no source failed."},
            "stale": {
                **refs[StaleInfo],
                "description": "Only on a stale answer (X-Cache: STALE): its age and why it "
                "is served: a refresh runs meanwhile, or the refresh failed.",
            },
        },
        "additionalProperties": False,
    }


def view_envelope_schema(
    agg: AggregateConfig, model: type[BaseModel] | None, refs: dict[type[BaseModel], JSONDict]
) -> JSONDict:
    """The envelope of an aggregate written as a view: `data` is what the view returns, and
    `sources` holds the sources this answer called (a view may call some, or one twice)."""
    schema = envelope_schema(agg, {}, refs)
    properties = schema["properties"]
    properties["data"] = (
        refs[model]
        if model is not None
        else {"type": "object", "description": "What the view returned."}
    )
    properties["errors"].pop("propertyNames")
    properties["sources"] = {
        "type": "object",
        "description": "Status and ms of every source this answer called.",
        "additionalProperties": refs[SourceInfo],
    }
    return schema


def _envelope_headers(*, cached: bool) -> JSONDict:
    headers = {
        "X-Aggregate-Complete": header_spec(
            "Whether every source answered.", {"enum": ["true", "false"]}, required=True
        ),
        "Server-Timing": header_spec(
            "One entry per source this request waited for, then `cache` and `total` (ms).",
            required=True,
        ),
        "Cache-Control": header_spec(
            "`max-age=N` for a cacheable answer, else `no-store`; prefixed `private, ` when "
            "the request carried Authorization or Cookie."
        ),
    }
    if cached:
        headers["X-Cache"] = header_spec(
            "Where the answer came from (absent when the aggregate is not cached).",
            {"enum": ["HIT", "STALE", "MISS", "BYPASS"]},
        )
        headers["X-Cache-Bypass"] = header_spec(
            "Why the cache was skipped: `credentials` (the request carried Authorization or "
            "Cookie) or `backend` (the cache backend is unreachable).",
            {"enum": ["credentials", "backend"]},
        )
        headers["ETag"] = header_spec(
            "A weak ETag over the answer's content (its status, `data`, `errors` and "
            "`complete`; not `sources`, whose timings differ on every fill): send it back in "
            "If-None-Match to get a 304 while the content is unchanged, cached or not."
        )
        headers["X-Cache-Stale"] = header_spec(
            'On a stale answer: `refreshing`, or `refresh-failed; status=N; failed="a,b"`.',
        )
        headers["Age"] = header_spec("Seconds since the answer was stored.")
    return headers


def aggregate_operation(
    config: AppConfig, name: str, agg: AggregateConfig, *, view: bool = False
) -> JSONDict:
    envelope = ref(envelope_name(name))
    ok = envelope
    if agg.required and not view:
        # A 200 means every required source answered (or served its fallback).
        ok = {"allOf": [envelope, {"properties": {"data": {"required": list(agg.required)}}}]}
    required = ", ".join(agg.required) or "none"
    parameters = query_parameters(agg)
    parameters.append(
        {
            "name": "If-None-Match",
            "in": "header",
            "required": False,
            "description": "An ETag from an earlier answer: 304 while it is still current.",
            "schema": {"type": "string"},
        }
    )
    for header in agg.cache_vary:
        parameters.append(
            {
                "name": header,
                "in": "header",
                "required": False,
                "description": "Part of the cache key (`cache_vary`): answers are shared only "
                "between requests with the same value.",
                "schema": {"type": "string"},
            }
        )
    parameters += _forwarded_parameters(config, agg)
    after = [
        f"{source} after {', '.join(sorted(config.upstreams[source].template.sources))}"
        for source in ([] if view else agg.sources)
        if config.upstreams[source].template.fields
    ]
    if view:
        calls = f"A view that calls its sources within a {agg.deadline:g} s deadline."
    elif not after:
        calls = f"Calls {len(agg.sources)} sources at once within a {agg.deadline:g} s deadline."
    else:
        calls = (
            f"Calls {len(agg.sources)} sources within a {agg.deadline:g} s deadline, each as "
            f"soon as the answers it needs have arrived: {'; '.join(after)}."
        )
    return {
        "tags": ["aggregates"],
        "operationId": f"aggregate_{name}",
        "summary": (
            f"The {name!r} aggregate view"
            if view
            else f"The {name!r} aggregate: {', '.join(agg.sources)}"
        ),
        "description": (
            f"{calls} Required sources: {required}. Cached for {agg.cache_ttl:g} s "
            f"(0: not cached). Unknown query parameters are ignored (cache busters)."
        ),
        "parameters": parameters,
        "responses": {
            "200": _with_progressive(
                json_response(
                    "Every source answered, or only optional ones failed (`complete: false`). "
                    "With `Accept: text/event-stream` or `application/x-ndjson`: the answer as "
                    "it is made, one event per source as it lands, then `done` with the status "
                    "the JSON answer has (always a 200, `Cache-Control: no-store`).",
                    ok,
                    headers=_envelope_headers(cached=True),
                )
            ),
            "304": {
                "description": "Not modified: the If-None-Match ETag is current.",
                "headers": _envelope_headers(cached=True),
            },
            "400": error_response(400),
            "413": error_response(413),
            "431": error_response(431),
            "503": unavailable_response(),
            "502": json_response(
                "A required source failed, or every source did; the envelope says what arrived.",
                envelope,
                headers=_envelope_headers(cached=True),
            ),
            "504": json_response(
                "The deadline cut off a required source (or, every source having failed, one of "
                "them); the envelope says what arrived.",
                envelope,
                headers=_envelope_headers(cached=True),
            ),
        },
    }


def _with_progressive(response: JSONDict) -> JSONDict:
    response["content"].update(progressive_content())
    return response


def twin_operation(name: str, agg: AggregateConfig, prefix: str) -> JSONDict:
    style = "from a thread pool" if "pool" in prefix else "one source after another"
    envelope = ref(envelope_name(name))
    headers = _envelope_headers(cached=False)
    return {
        "tags": ["benchmark"],
        "operationId": f"{prefix.strip('/').replace('-', '_')}_{name}",
        "summary": f"Benchmark twin of {agg.path}: sources called {style}, uncached",
        "description": "A plain `def` view kept to compare sync and async fan-out; same "
        "parameters, envelope and statuses as the aggregate, never cached.",
        "x-benchmark": True,
        "parameters": query_parameters(agg),
        "responses": {
            "200": json_response("As the aggregate.", envelope, headers=headers),
            "400": error_response(400),
            "413": error_response(413),
            "431": error_response(431),
            "503": unavailable_response(),
            "502": json_response(
                "A required source failed, or every source did.", envelope, headers=headers
            ),
            "504": json_response("The deadline cut off a required source.", envelope),
        },
    }


def _forwarded_parameters(config: AppConfig, agg: AggregateConfig) -> list[JSONDict]:
    """The client headers the aggregate's sources forward (its answers vary by them)."""
    names: dict[str, str] = {}
    for source in agg.sources:
        for name in config.upstreams[source].forward_headers:
            if name.lower() not in agg.cache_vary:  # listed already
                names.setdefault(name.lower(), name)
    return [
        {
            "name": name,
            "in": "header",
            "required": False,
            "description": "Forwarded to the sources that allow-list it; cached per value.",
            "schema": {"type": "string"},
        }
        for name in names.values()
    ]
