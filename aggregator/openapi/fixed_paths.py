"""The operations that do not come from the config: the probes, the admin endpoints, /metrics.

Apart from the aggregates because they never vary with the config (but for the admin bodies'
schemas, built in `schemas`); the status page's own paths come from `aggregator.status`.
"""

from __future__ import annotations

from aggregator.models import JSONDict
from aggregator.openapi.responses import (
    ERROR_STATUSES,
    JSON_MEDIA,
    error_response,
    json_response,
    ref,
)


def health_paths() -> JSONDict:
    return {
        "/healthz": {
            "get": {
                "tags": ["health"],
                "operationId": "healthz",
                "summary": "Liveness: the process serves HTTP (touches nothing else)",
                "responses": {"200": json_response("Alive.", ref("Health"))},
            }
        },
        "/readyz": {
            "get": {
                "tags": ["health"],
                "operationId": "readyz",
                "summary": "Readiness: config loaded, upstream client open, cache reachable",
                "responses": {
                    "200": json_response("Ready for traffic.", ref("Readiness")),
                    "503": json_response(
                        "Not ready: `failed` names each part, `checks` says why.",
                        ref("NotReady"),
                    ),
                },
            }
        },
    }


def admin_paths() -> JSONDict:
    secured = {"tags": ["admin"], "security": [{"adminToken": []}]}
    return {
        "/admin/purge": {
            "post": {
                **secured,
                "operationId": "admin_purge",
                "summary": "Purge one entry, one aggregate, or an upstream and its aggregates",
                "requestBody": {
                    "required": True,
                    "content": {JSON_MEDIA: {"schema": ref("PurgeRequest")}},
                },
                "responses": {
                    "200": json_response("What was purged.", ref("PurgeResult")),
                    **{str(s): error_response(s) for s in (400, 401, 404, 413, 431, 503)},
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
                    "content": {JSON_MEDIA: {"schema": ref("WarmRequest")}},
                },
                "responses": {
                    "200": json_response("What warming did.", ref("WarmResult")),
                    "409": json_response(ERROR_STATUSES[409], ref("NotWarmable")),
                    **{str(s): error_response(s) for s in (400, 401, 404, 413, 431)},
                },
            }
        },
    }


def metrics_paths() -> JSONDict:
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
                    "401": error_response(401),
                    "404": error_response(
                        404, "Metrics are not served here (no admin token set, or turned off)."
                    ),
                },
            }
        }
    }
