"""Admin endpoints, behind a bearer token: purge or warm cached answers without a restart.

`POST /admin/purge` takes `{"aggregate": NAME}`, `{"aggregate": NAME, "params": {...}}` or
`{"upstream": NAME}` (aggregate and upstream may be combined). Both routes are POST-only;
without AGGREGATOR_ADMIN_TOKEN they are disabled (404, as `/metrics`), never open.
Parameters are typed, validated and defaulted exactly as a live request's query string, so
`{"user_id": "07"}` purges the entry that `?user_id=7` filled; a value is its query-string text
or the JSON scalar of its declared type (`7.0` is the integer 7 to JSON), anything else is a
400, as `/openapi.json` documents.
The token (AGGREGATOR_ADMIN_TOKEN) never appears in a log line or a response, nor is it (or any
other header of an admin request) forwarded upstream by a warm. Targets are checked as
`aggregator cache purge` checks them (`cache.check_target`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, jsonify, request

from aggregator.cache import check_target, purge
from aggregator.config import AggregateConfig
from aggregator.context import NO_HEADERS, forwarded
from aggregator.engine import current_engine
from aggregator.errors import CacheUnavailableError, InvalidRequestError
from aggregator.params import ParamType, ParamValue
from aggregator.routes import ADMIN_PREFIX
from aggregator.views.errors import error_response

logger = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix=ADMIN_PREFIX)

_BODY_KEYS = ("aggregate", "params", "upstream")


@bp.before_request
def _forward_nothing() -> None:
    """An admin request's headers (its bearer token above all) never reach an upstream that
    forwards client headers: a warm fills the entries of requests that send none of them."""
    forwarded.set(NO_HEADERS)


@bp.post("/purge")
async def purge_cache() -> Response:
    """Purge one entry, one aggregate, or an upstream and every aggregate built from it."""
    denied = check_token()
    if denied is not None:
        return denied
    engine = current_engine()
    config, service = engine.config, engine.cache
    aggregate, raw_params, upstream = _parse_body(request.get_json(force=True, silent=True))
    check_target(config, aggregate, upstream)
    params = None
    if aggregate is not None and raw_params is not None:
        params = _typed_params(config.aggregates[aggregate], raw_params)
    try:
        purged = await purge(service, aggregate=aggregate, params=params, upstream=upstream)
    except CacheUnavailableError as exc:
        logger.warning("admin purge failed: %s", exc)
        return error_response(
            503, "the cache backend is unreachable; the purge did not complete, retry it"
        )
    logger.info("admin purge: %s", ", ".join(purged))
    return jsonify(purged=purged)


@bp.post("/warm")
async def warm_entry() -> Response:
    """Refresh one aggregate entry now, through the same single-flight as live traffic.

    For `aggregator warm --url`: the answer says what happened and which cache the deployment
    uses; a per-process cache is refused (409), since warming one worker's memory helps nobody.
    """
    denied = check_token()
    if denied is not None:
        return denied
    engine = current_engine()
    config, settings, service = engine.config, engine.settings, engine.cache
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise InvalidRequestError(
            "body", 'must be a JSON object such as {"aggregate": "dashboard"}'
        )
    for key in body:
        if key not in ("aggregate", "params", "only_missing"):
            raise InvalidRequestError(key, "unknown key (expected aggregate, params, only_missing)")
    aggregate = _name(body, "aggregate")
    if aggregate is None:
        raise InvalidRequestError("aggregate", "is required")
    check_target(config, aggregate, None)
    raw = body.get("params", {})
    if not isinstance(raw, dict):
        raise InvalidRequestError("params", "must be an object of parameter values")
    only_missing = body.get("only_missing", False)
    if not isinstance(only_missing, bool):
        raise InvalidRequestError("only_missing", "must be true or false")
    params = _typed_params(config.aggregates[aggregate], raw)
    cache_info = {"type": settings.cache_type, "shared": service.store.shared}
    if not service.store.shared:
        response = error_response(
            409,
            f"this deployment's cache ({settings.cache_type}) lives inside each worker process: "
            "warming it through one request fills one worker's memory and helps nobody else; "
            "use a shared cache (filesystem or redis)",
            cache=cache_info,
        )
        return response
    result = await service.warm(aggregate, params, only_missing=only_missing)
    return jsonify(
        outcome=result.outcome,
        status=result.status,
        sources_failed=list(result.sources_failed),
        detail=result.detail,
        cache=cache_info,
    )


#: JSON types a body may use per parameter type, besides the query-string text (a string).
_JSON_TYPES: dict[ParamType, tuple[type, ...]] = {
    "str": (),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
}
_EXPECTED: dict[ParamType, str] = {
    "str": "must be a string",
    "int": "must be an integer",
    "float": "must be a number",
    "bool": "must be a boolean (true/false, 1/0, yes/no, on/off)",
}


def _typed_params(agg: AggregateConfig, raw: Mapping[str, object]) -> dict[str, ParamValue]:
    """Body parameters typed like a query string; errors name `params.<name>`."""
    values: dict[str, object] = {}
    for name, value in raw.items():
        spec = agg.params.get(name)
        # Other shapes (null, lists, objects) and unknown names: typed_params names them.
        if spec is not None and isinstance(value, str | int | float):
            allowed = _JSON_TYPES[spec.type]
            if isinstance(value, float) and int in allowed and value.is_integer():
                value = int(value)  # JSON has one number type: 7.0 is the integer 7
            ok = isinstance(value, (str, *allowed)) and (
                spec.type == "bool" or not isinstance(value, bool)
            )
            if not ok:
                raise InvalidRequestError(f"params.{name}", _EXPECTED[spec.type])
        values[name] = value
    try:
        return agg.typed_params(values)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"params.{exc.field}", exc.reason) from None


def check_token() -> Response | None:
    """None when the request carries the admin token, else the 401 (or 404) to send.

    Without a configured token the endpoints are disabled, not open: 404 whatever the request
    carries, as `/metrics` answers then (no credential can help, so no `WWW-Authenticate`
    challenge either); the body says why, without a `field` (an unknown name's 404 has one).
    """
    settings = current_engine().settings
    secret = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not secret:  # an empty token would let `Authorization: Bearer ` in
        logger.warning("admin request refused (endpoints disabled) from %s", request.remote_addr)
        return error_response(
            404,
            "the admin endpoints are disabled on this server: start it with "
            "AGGREGATOR_ADMIN_TOKEN set to a long random secret, then send that as "
            "'Authorization: Bearer <token>'",
        )
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return _unauthorized("send the admin token as 'Authorization: Bearer <token>'", "no token")
    # Header values are latin-1 decoded bytes (WSGI): compare the bytes the client sent with
    # the secret's UTF-8 bytes, in constant time so the comparison leaks nothing but length.
    if not hmac.compare_digest(given.encode("latin-1", "replace"), secret.encode()):
        return _unauthorized("the admin token is wrong", "wrong token")
    return None


def _unauthorized(message: str, reason: str) -> Response:
    logger.warning("admin request refused (%s) from %s", reason, request.remote_addr)
    response = error_response(401, message)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _parse_body(body: Any) -> tuple[str | None, dict[str, object] | None, str | None]:
    """`(aggregate, params, upstream)` from the JSON body; InvalidRequestError names the field."""
    if not isinstance(body, dict):
        raise InvalidRequestError(
            "body", 'must be a JSON object such as {"aggregate": "dashboard"}'
        )
    for key in body:
        if key not in _BODY_KEYS:
            raise InvalidRequestError(key, "unknown key (expected aggregate, params, upstream)")
    aggregate = _name(body, "aggregate")
    upstream = _name(body, "upstream")
    raw = body.get("params")
    if raw is None and "params" not in body:
        params = None
    elif not isinstance(raw, dict):
        raise InvalidRequestError("params", "must be an object of parameter values")
    elif aggregate is None:
        raise InvalidRequestError("params", "given without an aggregate")
    else:
        params = {str(name): value for name, value in raw.items()}  # typed by typed_params
    if aggregate is None and upstream is None:
        raise InvalidRequestError("body", 'needs "aggregate" (maybe with "params") or "upstream"')
    return aggregate, params, upstream


def _name(body: dict[str, Any], key: str) -> str | None:
    if key not in body:
        return None
    value = body[key]
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(key, "must be a non-empty string")
    return value
