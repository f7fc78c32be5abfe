"""The OpenAPI objects every operation is built from: `$ref`s, headers, JSON and error responses.

Shared so each status is described once: the error statuses' wording, the one error body, the
adapter's 503 with `Retry-After`.
"""

from __future__ import annotations

from typing import Any

from aggregator.models import JSONDict

REF_TEMPLATE = "#/components/schemas/{model}"


JSON_MEDIA = "application/json"


ERROR_STATUSES = {
    400: "A parameter or body field is missing or malformed; `field` names it.",
    401: "No admin token, or the wrong one (`WWW-Authenticate: Bearer`).",
    404: "An unknown aggregate or upstream name (`field` says which), or the admin endpoints "
    "are disabled: the server has no AGGREGATOR_ADMIN_TOKEN (no `field`).",
    409: "The cache lives inside each worker process: warming one helps nobody.",
    413: "The request body is over AGGREGATOR_MAX_REQUEST_BODY.",
    431: "More request headers, or bytes of them, than AGGREGATOR_MAX_REQUEST_HEADERS(_BYTES).",
    503: "The cache backend is unreachable.",
}


def ref(name: str) -> JSONDict:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def envelope_name(name: str) -> str:
    return f"Envelope_{name}"


def header_spec(
    description: str, schema: JSONDict | None = None, *, required: bool = False
) -> JSONDict:
    return {
        "description": description,
        "required": required,
        "schema": schema or {"type": "string"},
    }


def json_response(description: str, schema: JSONDict, **extra: Any) -> JSONDict:
    return {"description": description, "content": {JSON_MEDIA: {"schema": schema}}, **extra}


def error_response(status: int, description: str | None = None) -> JSONDict:
    return json_response(description or ERROR_STATUSES[status], ref("ErrorBody"))


def unavailable_response() -> JSONDict:
    """The adapter's 503: over the in-flight limit, or cut at shutdown (docs/reliability.md)."""
    return json_response(
        "This worker already has AGGREGATOR_MAX_IN_FLIGHT requests in flight, or it is shutting "
        "down and could not finish this request in time: retry after `Retry-After` seconds.",
        ref("ErrorBody"),
        headers={"Retry-After": header_spec("Seconds to wait.", {"type": "string"}, required=True)},
    )
