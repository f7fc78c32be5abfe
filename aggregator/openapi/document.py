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

from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version

from aggregator.config import AppConfig
from aggregator.context import MAX_REQUEST_ID, REQUEST_ID_HEADER
from aggregator.models import JSONDict
from aggregator.openapi.aggregates import (
    aggregate_operation,
    envelope_schema,
    twin_operation,
    view_envelope_schema,
)
from aggregator.openapi.fixed_paths import admin_paths, health_paths, metrics_paths
from aggregator.openapi.progressive import event_schemas
from aggregator.openapi.responses import envelope_name, header_spec
from aggregator.openapi.schemas import data_schema, fixed_schemas, model_schemas
from aggregator.shape import shaped_schema
from aggregator.status import status_paths, status_schemas
from aggregator.viewfill import AggregateView


def build_openapi(
    config: AppConfig,
    *,
    sync_prefixes: Iterable[str] = (),
    dashboard: bool = True,
    views: Mapping[str, AggregateView] | None = None,
) -> JSONDict:
    """The whole document for `config`; `sync_prefixes` are the sync twins' path prefixes,
    `dashboard` whether the page at `/` is served, `views` the aggregates written as views
    (their `data` is what the view returns: its return model, if it names one)."""
    views = views or {}
    schemas, refs = model_schemas(config, [v.data_model for v in views.values() if v.data_model])
    schemas.update(fixed_schemas(config))
    schemas.update(status_schemas())
    schemas.update(event_schemas(refs))
    paths: JSONDict = {}
    for name, agg in config.aggregates.items():
        view = views.get(name)
        if view is not None:
            schemas[envelope_name(name)] = view_envelope_schema(agg, view.data_model, refs)
            paths[agg.path] = {"get": aggregate_operation(config, name, agg, view=True)}
            continue
        data = {
            s: shaped_schema(
                config.upstreams[s], data_schema(refs, config.upstreams[s].model), schemas
            )
            for s in agg.sources
        }
        schemas[envelope_name(name)] = envelope_schema(agg, data, refs)
        paths[agg.path] = {"get": aggregate_operation(config, name, agg)}
        for prefix in sync_prefixes:
            paths[prefix + agg.path] = {"get": twin_operation(name, agg, prefix)}
    paths.update(health_paths())
    paths.update(status_paths(dashboard=dashboard))
    paths.update(admin_paths())
    paths.update(metrics_paths())
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
    header = header_spec(
        "The request's id: the client's when valid, else a new one.",
        _REQUEST_ID_SCHEMA,
        required=True,
    )
    for item in paths.values():
        for operation in item.values():
            operation["parameters"] = [*operation.get("parameters", []), parameter]
            for response in operation["responses"].values():
                response["headers"] = {**response.get("headers", {}), REQUEST_ID_HEADER: header}
