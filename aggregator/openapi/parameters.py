"""Aggregate parameters as the document states them: the same types and limits
`aggregator.params` enforces, in a query string and in an admin body.

Kept beside the parsing rules they mirror rather than with the paths: when a limit changes in
`aggregator.params`, this is the one place the contract has to follow.
"""

from __future__ import annotations

from aggregator.config import AggregateConfig
from aggregator.models import JSONDict
from aggregator.params import MAX_PARAM_LENGTH, ParamSpec

#: `params.parse_value` accepts at most 18 digits.
_INT_LIMIT = 10**18 - 1


_EMPTY: JSONDict = {"const": "", "description": "Empty: the default."}


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


def query_parameters(agg: AggregateConfig) -> list[JSONDict]:
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


def params_object(agg: AggregateConfig) -> JSONDict:
    """An aggregate's parameters as a JSON object (admin bodies): typed like a query string."""
    return {
        "type": "object",
        "properties": {n: body_param_schema(s) for n, s in agg.params.items()},
        "required": [n for n, s in agg.params.items() if s.default is None],
        "additionalProperties": False,
    }


def has_required(agg: AggregateConfig) -> bool:
    return any(spec.default is None for spec in agg.params.values())
