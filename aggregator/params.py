"""Query parameters: their declared types, and how a raw value becomes a typed one.

One owner for what a parameter value may be, so every way a value arrives (a live query string,
the admin API's JSON, a TOML default or warm target, `--param`) is typed and limited alike, and
the OpenAPI document can state exactly the limits enforced here. The config declares parameters
(`ParamSpec`); nothing here reads the config file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal
from urllib.parse import parse_qs

from pydantic import BaseModel, ConfigDict, model_validator

from aggregator.errors import InvalidRequestError

ParamType = Literal["str", "int", "float", "bool"]
ParamValue = str | int | float | bool

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_INT = re.compile(r"[+-]?[0-9]{1,18}")
_FLOAT = re.compile(r"[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|inf|infinity|nan)", re.I)
MAX_PARAM_LENGTH = 1024


def parse_query(query_string: str) -> dict[str, list[str]]:
    """The one query parser for both the fast path and the view, so both build the same key."""
    return parse_qs(query_string, keep_blank_values=True)


def parse_value(kind: ParamType, raw: object) -> ParamValue:
    """Convert a raw query-string (or TOML default) value to its declared type."""
    if kind == "str":
        if not isinstance(raw, str):
            raise ValueError("must be a string")
        if raw == "":
            raise ValueError("must not be empty")
        if len(raw) > MAX_PARAM_LENGTH:
            raise ValueError(f"must be at most {MAX_PARAM_LENGTH} characters")
        return raw
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("must be a boolean (true/false, 1/0, yes/no, on/off)")
    if isinstance(raw, bool):
        raise ValueError(f"must be {'an integer' if kind == 'int' else 'a number'}")
    if kind == "int":
        if isinstance(raw, int):
            return raw
        text = str(raw).strip()
        if not _INT.fullmatch(text):
            raise ValueError("must be an integer")
        return int(text)
    if isinstance(raw, int | float):
        number = float(raw)
    else:
        text = str(raw).strip()
        if not _FLOAT.fullmatch(
            text
        ):  # float() alone would take "1_000", "nan" and non-ASCII digits
            raise ValueError("must be a number")
        number = float(text)
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _query_text(field: str, value: object) -> str:
    """A scalar as the query-string text a live request would carry."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    raise InvalidRequestError(field, "must be a string, number or boolean")


class ParamSpec(BaseModel):
    """One query parameter: its type and, when optional, its default."""

    # As every config model: strict, unknown keys are errors (see `aggregator.config`).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: ParamType
    default: ParamValue | None = None

    @model_validator(mode="after")
    def _coerce_default(self) -> ParamSpec:
        if self.default is not None:
            object.__setattr__(self, "default", parse_value(self.type, self.default))
        return self


def parse_params(
    specs: Mapping[str, ParamSpec], args: Mapping[str, list[str]]
) -> dict[str, ParamValue]:
    """Typed parameters from a query string; InvalidRequestError names the first bad one.

    Unknown parameters are ignored (dashboards add cache-busters such as `_=1700000000`);
    an empty value of an optional parameter means its default.
    """
    values: dict[str, ParamValue] = {}
    for name, spec in specs.items():
        given = args.get(name)
        if not given or (given == [""] and spec.default is not None):
            # an empty value (`?topic=`, an unset dashboard filter) means "the default"
            if spec.default is None:
                raise InvalidRequestError(name, f"required {spec.type} parameter is missing")
            values[name] = spec.default
            continue
        if len(given) > 1:
            raise InvalidRequestError(name, "given more than once")
        try:
            values[name] = parse_value(spec.type, given[0])
        except ValueError as exc:
            raise InvalidRequestError(name, str(exc)) from None
    return values


def typed_params(
    specs: Mapping[str, ParamSpec], raw: Mapping[str, object]
) -> dict[str, ParamValue]:
    """Values given outside a query string (JSON, TOML, `--param`), typed like one.

    Unlike a live request, unknown names are errors here: a typo in an optional
    parameter's name would otherwise silently act on its default's entry.
    """
    unknown = sorted(raw.keys() - specs.keys())
    if unknown:
        known = ", ".join(specs) or "none"
        raise InvalidRequestError(unknown[0], f"unknown parameter (known: {known})")
    return parse_params(specs, {name: [_query_text(name, v)] for name, v in raw.items()})
