"""The document's component schemas: the sources' pydantic models and the shapes with no model.

Source models go through one pydantic run, so nested models are defined once and two models
sharing a class name get distinct names; the rest (errors, probes, admin bodies) are written out
because no pydantic model produces them.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from aggregator.config import AppConfig
from aggregator.models import JSONDict, SourceError, SourceInfo, StaleInfo
from aggregator.openapi.parameters import has_required, params_object
from aggregator.openapi.responses import REF_TEMPLATE, ref


def model_schemas(
    config: AppConfig, extra: Iterable[type[BaseModel]] = ()
) -> tuple[JSONDict, dict[type[BaseModel], JSONDict]]:
    """Definitions of each source model, the envelope's own and those in `extra` (what views
    return), and the `$ref` of each model.

    One pydantic run for all of them: nested models are defined once, and two models that share
    a class name get distinct (qualified) definition names.
    """
    models: list[type[BaseModel]] = [SourceError, SourceInfo, StaleInfo]
    for upstream in config.upstreams.values():
        if upstream.model is not None and upstream.model not in models:
            models.append(upstream.model)
    models += [m for m in extra if m not in models]
    keys, top = models_json_schema(
        [(m, "serialization") for m in models], ref_template=REF_TEMPLATE
    )
    refs = {model: keys[(model, "serialization")] for model in models}
    defs: JSONDict = top.get("$defs", {})
    return defs, refs


def data_schema(refs: dict[type[BaseModel], JSONDict], model: type[BaseModel] | None) -> JSONDict:
    if model is None:
        return {"description": "Any JSON: this upstream has no schema."}
    return refs[model]


def fixed_schemas(config: AppConfig) -> JSONDict:
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
                "params": params_object(agg),
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
            "required": ["aggregate", "params"] if has_required(agg) else ["aggregate"],
            "properties": {
                "aggregate": {"const": name},
                "params": params_object(agg),
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
                ref("ErrorBody"),
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
                "cache": ref("CacheInfo"),
            },
        },
        "CacheInfo": {
            "type": "object",
            "required": ["type", "shared"],
            "properties": {"type": {"type": "string"}, "shared": {"type": "boolean"}},
        },
        "NotWarmable": {
            "allOf": [
                ref("ErrorBody"),
                {
                    "type": "object",
                    "required": ["cache"],
                    "properties": {"cache": ref("CacheInfo")},
                },
            ]
        },
    }
