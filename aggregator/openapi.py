"""The OpenAPI 3.1 document, generated from the configured aggregates (pure: no I/O, no Flask).

Dashboards get a contract that cannot drift from what is served: every aggregate path with its
query parameters (types, defaults, required-ness and the limits `params.parse_value` enforces),
the envelope with each source's pydantic model under `data` (`model_json_schema` in
serialization mode, as upstream payloads are dumped), the one error shape, and the health,
readiness, status (with the dashboard page when it is on), admin and metrics routes. The sync
twins are listed too, tagged `benchmark`: they exist to be compared, not to be built on. Every
operation takes an optional `X-Request-ID` and every response carries one (`aggregator.context`);
an aggregate also lists the client headers its sources forward. Built once per app: the config
is read once.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from aggregator.config import AggregateConfig, AppConfig
from aggregator.context import MAX_REQUEST_ID, REQUEST_ID_HEADER
from aggregator.models import JSONDict, SourceError, SourceInfo
from aggregator.params import MAX_PARAM_LENGTH, ParamSpec
from aggregator.status import status_paths, status_schemas

_REF = "#/components/schemas/{model}"
#: `params.parse_value` accepts at most 18 digits.
_INT_LIMIT = 10**18 - 1
_JSON = "application/json"
_EMPTY: JSONDict = {"const": "", "description": "Empty: the default."}
_ERROR_STATUSES = {
    400: "A parameter or body field is missing or malformed; `field` names it.",
    401: "No admin token, or the wrong one (`WWW-Authenticate: Bearer`).",
    404: "An unknown aggregate or upstream name (`field` says which), or the admin endpoints "
    "are disabled: the server has no AGGREGATOR_ADMIN_TOKEN (no `field`).",
    409: "The cache lives inside each worker process: warming one helps nobody.",
    413: "The request body is over AGGREGATOR_MAX_REQUEST_BODY.",
    431: "More request headers, or bytes of them, than AGGREGATOR_MAX_REQUEST_HEADERS(_BYTES).",
    503: "The cache backend is unreachable.",
}


def build_openapi(
    config: AppConfig, *, sync_prefixes: Iterable[str] = (), dashboard: bool = True
) -> JSONDict:
    """The whole document for `config`; `sync_prefixes` are the sync twins' path prefixes,
    `dashboard` whether the page at `/` is served."""
    schemas, refs = _model_schemas(config)
    schemas.update(_fixed_schemas(config))
    schemas.update(status_schemas())
    paths: JSONDict = {}
    for name, agg in config.aggregates.items():
        data = {s: _data_schema(refs, config.upstreams[s].model) for s in agg.sources}
        schemas[_envelope(name)] = _envelope_schema(agg, data, refs)
        paths[agg.path] = {"get": _aggregate_operation(config, name, agg)}
        for prefix in sync_prefixes:
            paths[prefix + agg.path] = {"get": _twin_operation(name, agg, prefix)}
    paths.update(_health_paths())
    paths.update(status_paths(dashboard=dashboard))
    paths.update(_admin_paths())
    paths.update(_metrics_paths())
    _add_request_ids(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aggregator",
            "version": _version(),
            "description": (
                "One request becomes concurrent calls to slow upstreams, merged into one "
                "envelope: `data` per source that answered, `errors` per source that did not, "
                "`sources` with status and ms for every source, `complete`. 200 for complete "
                "or partial answers; 502/504 when a required source (or, with none required, "
                "every source) failed or was cut off by the deadline (the envelope still says "
                "what arrived)."
            ),
        },
        "tags": [
            {"name": "aggregates", "description": "The configured aggregates."},
            {"name": "health", "description": "Liveness and readiness probes."},
            {"name": "status", "description": "The live dashboard page and per-worker state."},
            {"name": "admin", "description": "Cache purge and warm-up, behind a bearer token."},
            {"name": "metrics", "description": "Prometheus metrics for operators."},
            {
                "name": "benchmark",
                "description": "Sync twins of each aggregate (plain `def` views, uncached), "
                "kept to compare async and sync fan-out. Not for dashboards.",
            },
        ],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The value of AGGREGATOR_ADMIN_TOKEN on the server.",
                }
            },
        },
    }


def _version() -> str:
    try:
        return version("aggregator")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _ref(name: str) -> JSONDict:
    return {"$ref": _REF.format(model=name)}


def _envelope(name: str) -> str:
    return f"Envelope_{name}"


def _model_schemas(config: AppConfig) -> tuple[JSONDict, dict[type[BaseModel], JSONDict]]:
    """Definitions of each source model and the envelope's own, and the `$ref` of each model.

    One pydantic run for all of them: nested models are defined once, and two models that share
    a class name get distinct (qualified) definition names.
    """
    models: list[type[BaseModel]] = [SourceError, SourceInfo]
    for upstream in config.upstreams.values():
        if upstream.model is not None and upstream.model not in models:
            models.append(upstream.model)
    keys, top = models_json_schema([(m, "serialization") for m in models], ref_template=_REF)
    refs = {model: keys[(model, "serialization")] for model in models}
    defs: JSONDict = top.get("$defs", {})
    return defs, refs


def _data_schema(refs: dict[type[BaseModel], JSONDict], model: type[BaseModel] | None) -> JSONDict:
    if model is None:
        return {"description": "Any JSON: this upstream has no schema."}
    return refs[model]


# -- parameters ------------------------------------------------------------------------------


def param_schema(spec: ParamSpec) -> JSONDict:
    """The JSON Schema of one parameter's value, with the limits `parse_value` enforces.

    An empty value of an optional parameter means its default (`AggregateConfig.parse_params`),
    so only a required string has a minimum length.
    """
    schema: JSONDict
    if spec.type == "str":
        schema = {"type": "string", "maxLength": MAX_PARAM_LENGTH}
        if spec.default is None:
            schema["minLength"] = 1
    elif spec.type == "int":
        schema = {"type": "integer", "minimum": -_INT_LIMIT, "maximum": _INT_LIMIT}
    elif spec.type == "float":
        schema = {"type": "number"}
    else:
        schema = {"type": "boolean"}
    if spec.default is not None:
        schema["default"] = spec.default
    return schema


def _query_parameters(agg: AggregateConfig) -> list[JSONDict]:
    params = []
    for name, spec in agg.params.items():
        description = (
            f"{spec.type}, required"
            if spec.default is None
            else (f"{spec.type}, default {spec.default!r}; an empty value means the default")
        )
        params.append(
            {
                "name": name,
                "in": "query",
                "required": spec.default is None,
                "description": description,
                "schema": query_param_schema(spec),
            }
        )
    return params


def body_param_schema(spec: ParamSpec) -> JSONDict:
    """One parameter in an admin body: the JSON scalar of its type, or its query-string text."""
    schema = param_schema(spec)
    text: JSONDict
    if spec.type == "int":
        text = {"type": "string", "pattern": r"^[+-]?[0-9]{1,18}$"}
    elif spec.type == "float":
        # Bounded digits and exponent: the text must stay a finite float.
        text = {
            "type": "string",
            "pattern": r"^[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,2})?$",
        }
    elif spec.type == "bool":
        text = {"enum": ["true", "false", "1", "0", "yes", "no", "on", "off"]}
    else:
        return schema
    default = schema.pop("default", None)
    both: JSONDict = {"anyOf": [schema, text]}
    if default is not None:
        both["anyOf"].append(_EMPTY)
        both["default"] = default
    return both


def query_param_schema(spec: ParamSpec) -> JSONDict:
    """One query parameter; an optional one may also be empty (`?n=`), meaning its default."""
    schema = param_schema(spec)
    if spec.default is None or spec.type == "str":  # an optional string already may be ""
        return schema
    default = schema.pop("default")
    return {"anyOf": [schema, _EMPTY], "default": default}


def _params_object(agg: AggregateConfig) -> JSONDict:
    """An aggregate's parameters as a JSON object (admin bodies): typed like a query string."""
    return {
        "type": "object",
        "properties": {n: body_param_schema(s) for n, s in agg.params.items()},
        "required": [n for n, s in agg.params.items() if s.default is None],
        "additionalProperties": False,
    }


def _has_required(agg: AggregateConfig) -> bool:
    return any(spec.default is None for spec in agg.params.values())


# -- aggregates ------------------------------------------------------------------------------


def _envelope_schema(
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
                "description": "Status and ms of every source.",
                "properties": {s: refs[SourceInfo] for s in agg.sources},
                "required": list(agg.sources),
                "additionalProperties": False,
            },
            "complete": {"type": "boolean", "description": "True when no source failed."},
        },
        "additionalProperties": False,
    }


def _header(
    description: str, schema: JSONDict | None = None, *, required: bool = False
) -> JSONDict:
    return {
        "description": description,
        "required": required,
        "schema": schema or {"type": "string"},
    }


def _envelope_headers(*, cached: bool) -> JSONDict:
    headers = {
        "X-Aggregate-Complete": _header(
            "Whether every source answered.", {"enum": ["true", "false"]}, required=True
        ),
        "Server-Timing": _header(
            "One entry per source this request waited for, then `cache` and `total` (ms).",
            required=True,
        ),
        "Cache-Control": _header(
            "`max-age=N` for a cacheable answer, else `no-store`; prefixed `private, ` when "
            "the request carried Authorization or Cookie."
        ),
    }
    if cached:
        headers["X-Cache"] = _header(
            "Where the answer came from (absent when the aggregate is not cached).",
            {"enum": ["HIT", "STALE", "MISS", "BYPASS"]},
        )
        headers["X-Cache-Bypass"] = _header(
            "Why the cache was skipped: `credentials` (the request carried Authorization or "
            "Cookie) or `backend` (the cache backend is unreachable).",
            {"enum": ["credentials", "backend"]},
        )
        headers["ETag"] = _header("Send it back in If-None-Match to get a 304.")
        headers["Age"] = _header("Seconds since the answer was stored.")
    return headers


def _json_response(description: str, schema: JSONDict, **extra: Any) -> JSONDict:
    return {"description": description, "content": {_JSON: {"schema": schema}}, **extra}


def _error(status: int, description: str | None = None) -> JSONDict:
    return _json_response(description or _ERROR_STATUSES[status], _ref("ErrorBody"))


def _unavailable() -> JSONDict:
    """The adapter's 503: over the in-flight limit, or cut at shutdown (docs/reliability.md)."""
    return _json_response(
        "This worker already has AGGREGATOR_MAX_IN_FLIGHT requests in flight, or it is shutting "
        "down and could not finish this request in time: retry after `Retry-After` seconds.",
        _ref("ErrorBody"),
        headers={"Retry-After": _header("Seconds to wait.", {"type": "string"}, required=True)},
    )


def _aggregate_operation(config: AppConfig, name: str, agg: AggregateConfig) -> JSONDict:
    envelope = _ref(_envelope(name))
    ok = envelope
    if agg.required:
        # A 200 means every required source answered (or served its fallback).
        ok = {"allOf": [envelope, {"properties": {"data": {"required": list(agg.required)}}}]}
    required = ", ".join(agg.required) or "none"
    parameters = _query_parameters(agg)
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
    return {
        "tags": ["aggregates"],
        "operationId": f"aggregate_{name}",
        "summary": f"The {name!r} aggregate: {', '.join(agg.sources)}",
        "description": (
            f"Calls {len(agg.sources)} sources at once within a {agg.deadline:g} s deadline. "
            f"Required sources: {required}. Cached for {agg.cache_ttl:g} s "
            f"(0: not cached). Unknown query parameters are ignored (cache busters)."
        ),
        "parameters": parameters,
        "responses": {
            "200": _json_response(
                "Every source answered, or only optional ones failed (`complete: false`).",
                ok,
                headers=_envelope_headers(cached=True),
            ),
            "304": {
                "description": "Not modified: the If-None-Match ETag is current.",
                "headers": _envelope_headers(cached=True),
            },
            "400": _error(400),
            "413": _error(413),
            "431": _error(431),
            "503": _unavailable(),
            "502": _json_response(
                "A required source failed, or every source did; the envelope says what arrived.",
                envelope,
                headers=_envelope_headers(cached=True),
            ),
            "504": _json_response(
                "The deadline cut off a required source (or, every source having failed, one of "
                "them); the envelope says what arrived.",
                envelope,
                headers=_envelope_headers(cached=True),
            ),
        },
    }


def _twin_operation(name: str, agg: AggregateConfig, prefix: str) -> JSONDict:
    style = "from a thread pool" if "pool" in prefix else "one source after another"
    envelope = _ref(_envelope(name))
    headers = _envelope_headers(cached=False)
    return {
        "tags": ["benchmark"],
        "operationId": f"{prefix.strip('/').replace('-', '_')}_{name}",
        "summary": f"Benchmark twin of {agg.path}: sources called {style}, uncached",
        "description": "A plain `def` view kept to compare sync and async fan-out; same "
        "parameters, envelope and statuses as the aggregate, never cached.",
        "x-benchmark": True,
        "parameters": _query_parameters(agg),
        "responses": {
            "200": _json_response("As the aggregate.", envelope, headers=headers),
            "400": _error(400),
            "413": _error(413),
            "431": _error(431),
            "503": _unavailable(),
            "502": _json_response(
                "A required source failed, or every source did.", envelope, headers=headers
            ),
            "504": _json_response("The deadline cut off a required source.", envelope),
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


_REQUEST_ID_SCHEMA: JSONDict = {
    "type": "string",
    "pattern": f"^[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID}}}$",
}


def _add_request_ids(paths: JSONDict) -> None:
    """`X-Request-ID` in and out of every operation (the adapter stamps every response)."""
    parameter = {
        "name": REQUEST_ID_HEADER,
        "in": "header",
        "required": False,
        "description": (
            f"Kept when it is 1-{MAX_REQUEST_ID} of A-Z a-z 0-9 . _ : -, else replaced by a "
            "new id (never refused); sent upstream and logged."
        ),
        # Any value is accepted (an invalid one is replaced), so the input schema is open.
        "schema": {"type": "string"},
    }
    header = _header(
        "The request's id: the client's when valid, else a new one.",
        _REQUEST_ID_SCHEMA,
        required=True,
    )
    for item in paths.values():
        for operation in item.values():
            operation["parameters"] = [*operation.get("parameters", []), parameter]
            for response in operation["responses"].values():
                response["headers"] = {**response.get("headers", {}), REQUEST_ID_HEADER: header}


# -- health and admin ------------------------------------------------------------------------


def _health_paths() -> JSONDict:
    return {
        "/healthz": {
            "get": {
                "tags": ["health"],
                "operationId": "healthz",
                "summary": "Liveness: the process serves HTTP (touches nothing else)",
                "responses": {"200": _json_response("Alive.", _ref("Health"))},
            }
        },
        "/readyz": {
            "get": {
                "tags": ["health"],
                "operationId": "readyz",
                "summary": "Readiness: config loaded, upstream client open, cache reachable",
                "responses": {
                    "200": _json_response("Ready for traffic.", _ref("Readiness")),
                    "503": _json_response(
                        "Not ready: `failed` names each part, `checks` says why.",
                        _ref("NotReady"),
                    ),
                },
            }
        },
    }


def _admin_paths() -> JSONDict:
    secured = {"tags": ["admin"], "security": [{"adminToken": []}]}
    return {
        "/admin/purge": {
            "post": {
                **secured,
                "operationId": "admin_purge",
                "summary": "Purge one entry, one aggregate, or an upstream and its aggregates",
                "requestBody": {
                    "required": True,
                    "content": {_JSON: {"schema": _ref("PurgeRequest")}},
                },
                "responses": {
                    "200": _json_response("What was purged.", _ref("PurgeResult")),
                    **{str(s): _error(s) for s in (400, 401, 404, 413, 431, 503)},
                },
            }
        },
        "/admin/warm": {
            "post": {
                **secured,
                "operationId": "admin_warm",
                "summary": "Refresh one entry now, through the live single-flight",
                "requestBody": {
                    "required": True,
                    "content": {_JSON: {"schema": _ref("WarmRequest")}},
                },
                "responses": {
                    "200": _json_response("What warming did.", _ref("WarmResult")),
                    "409": _json_response(_ERROR_STATUSES[409], _ref("NotWarmable")),
                    **{str(s): _error(s) for s in (400, 401, 404, 413, 431)},
                },
            }
        },
    }


def _metrics_paths() -> JSONDict:
    return {
        "/metrics": {
            "get": {
                "tags": ["metrics"],
                "operationId": "metrics",
                "summary": "Prometheus metrics of every worker, behind the admin token",
                "description": (
                    "Prometheus text format 0.0.4. AGGREGATOR_METRICS=token (the default) needs "
                    "the admin token and answers 404 while none is set; `public` needs no "
                    "token; `off` answers 404."
                ),
                "security": [{"adminToken": []}],
                "responses": {
                    "200": {
                        "description": "Every metric, merged over the workers.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _error(401),
                    "404": _error(
                        404, "Metrics are not served here (no admin token set, or turned off)."
                    ),
                },
            }
        }
    }


def _fixed_schemas(config: AppConfig) -> JSONDict:
    """The shapes that do not come from pydantic models: errors, probes, admin bodies."""
    check = {
        "type": "object",
        "required": ["ok", "detail"],
        "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
    }
    checks = {
        "type": "object",
        "required": ["config", "client", "cache"],
        "properties": {part: check for part in ("config", "client", "cache")},
    }
    error = {
        "type": "object",
        "description": "The one error shape of every failure.",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "The HTTP status phrase."},
            "message": {"type": "string"},
            "field": {"type": "string", "description": "The parameter or body field at fault."},
            "retry_after": {
                "type": "integer",
                "description": "Seconds to wait (an overloaded worker's 503, as Retry-After).",
            },
        },
    }
    upstreams = list(config.upstreams)
    purge_shapes: list[JSONDict] = [
        {
            "type": "object",
            "required": ["aggregate"],
            "properties": {
                "aggregate": {"const": name},
                "params": _params_object(agg),
                "upstream": {"enum": upstreams},
            },
            "additionalProperties": False,
        }
        for name, agg in config.aggregates.items()
    ]
    purge_shapes.append(
        {
            "type": "object",
            "required": ["upstream"],
            "properties": {"upstream": {"enum": upstreams}},
            "additionalProperties": False,
        }
    )
    warm_shapes = [
        {
            "type": "object",
            # Warming fills one entry: every required parameter must be given.
            "required": ["aggregate", "params"] if _has_required(agg) else ["aggregate"],
            "properties": {
                "aggregate": {"const": name},
                "params": _params_object(agg),
                "only_missing": {"type": "boolean", "default": False},
            },
            "additionalProperties": False,
        }
        for name, agg in config.aggregates.items()
    ]
    return {
        "ErrorBody": error,
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
        },
        "Readiness": {
            "type": "object",
            "required": ["status", "checks"],
            "properties": {"status": {"const": "ready"}, "checks": checks},
        },
        "NotReady": {
            "allOf": [
                _ref("ErrorBody"),
                {
                    "type": "object",
                    "required": ["failed", "checks"],
                    "properties": {
                        "failed": {
                            "type": "array",
                            "items": {"enum": ["config", "client", "cache"]},
                        },
                        "checks": checks,
                    },
                },
            ]
        },
        "PurgeRequest": {
            "description": "An aggregate (with `params`: one entry), and/or an upstream.",
            "anyOf": purge_shapes,
        },
        "PurgeResult": {
            "type": "object",
            "required": ["purged"],
            "properties": {"purged": {"type": "array", "items": {"type": "string"}}},
        },
        "WarmRequest": {"oneOf": warm_shapes} if warm_shapes else {"not": {}},
        "WarmResult": {
            "type": "object",
            "required": ["outcome", "sources_failed", "detail", "cache"],
            "properties": {
                "outcome": {"enum": ["warmed", "partial", "failed", "skipped"]},
                "status": {"type": ["integer", "null"]},
                "sources_failed": {"type": "array", "items": {"type": "string"}},
                "detail": {"type": "string"},
                "cache": _ref("CacheInfo"),
            },
        },
        "CacheInfo": {
            "type": "object",
            "required": ["type", "shared"],
            "properties": {"type": {"type": "string"}, "shared": {"type": "boolean"}},
        },
        "NotWarmable": {
            "allOf": [
                _ref("ErrorBody"),
                {
                    "type": "object",
                    "required": ["cache"],
                    "properties": {"cache": _ref("CacheInfo")},
                },
            ]
        },
    }
