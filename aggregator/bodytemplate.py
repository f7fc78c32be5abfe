"""JSON request-body templates (POST sources) whose placeholders fill data, never structure.

A `body` is any JSON value from the config (a TOML table, usually). Its object keys are taken
as written; placeholders live in its string values only:

- a string that is exactly one placeholder, `"{user_id}"`, becomes the value itself, typed
  (an `int` parameter stays a JSON number, a `bool` a JSON boolean);
- a string with a placeholder among other text, `"city:{city}"`, stays a string with the value
  spelled in (`urltemplate.format_value`).

The body is then encoded with `json.dumps`, so a value is always one JSON string, number or
boolean at its place: quotes, braces, `"}, "admin": true` or NUL in a value cannot add a key or
close an object. `{name}` is a parameter and `{profile.city}` a field of another source's answer,
exactly as in URLs (`aggregator.urltemplate`, `aggregator.graph`).

A GraphQL source (`graphql = true`) sends `{"query": ..., "variables": ...}` with this template
(its `query` is sent as written, never filled: `{id}` there is a selection set, and values
belong in `variables`) and takes its answer's `data`; an `errors` array with no `data` is the
source's `graphql` error (`graphql_data`). Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aggregator.errors import UpstreamGraphQLError
from aggregator.urltemplate import _PLACEHOLDER, FieldRef, format_value


@dataclass(frozen=True, slots=True)
class BodyTemplate:
    """A parsed JSON body with `{name}` placeholders in its string values."""

    value: Any
    #: Top-level keys sent as written (a GraphQL `query`).
    literal: frozenset[str]
    #: The aggregate parameters it names.
    names: frozenset[str]
    #: The fields of other sources' answers it names, in order, once each.
    fields: tuple[FieldRef, ...]

    @classmethod
    def parse(cls, value: Any, *, literal: frozenset[str] = frozenset()) -> BodyTemplate:
        """Collect the placeholders of every string value (keys are never templated), but for
        the top-level keys in `literal`."""
        found: list[str] = []
        templated = _without(value, literal)
        for text in _strings(templated):
            found.extend(_PLACEHOLDER.findall(text))
        names = frozenset(t for t in found if "." not in t)
        fields = tuple(FieldRef.parse(t) for t in dict.fromkeys(found) if "." in t)
        return cls(value, literal, names, fields)

    def render(self, values: Mapping[str, object]) -> bytes:
        """The body as JSON bytes, every placeholder filled with its value as JSON data."""
        filled = _fill(_without(self.value, self.literal), values)
        if self.literal:  # back in the configured order, the literal keys as written
            filled = {k: v if k in self.literal else filled[k] for k, v in self.value.items()}
        return json.dumps(filled, ensure_ascii=False).encode()


def body_digest(body: bytes) -> str:
    """What a source-cache key takes from a body (its bytes determine the answer)."""
    return hashlib.sha256(body).hexdigest()[:32]


def graphql_data(name: str, payload: Any) -> Any:
    """A GraphQL answer's `data`; `errors` with no `data` (or a non-object) is the source's error.

    Partial answers (`data` and `errors`) keep their data: the fields that failed are null in it.
    The errors' messages are never copied into the detail (they reach the client).
    """
    if not isinstance(payload, dict):
        raise UpstreamGraphQLError(name, "the answer is not a GraphQL response object")
    data = payload.get("data")
    errors = payload.get("errors")
    if data is None:
        if isinstance(errors, list) and errors:
            count = len(errors)
            raise UpstreamGraphQLError(
                name, f"the GraphQL answer has {count} error{'s' * (count != 1)} and no data"
            )
        raise UpstreamGraphQLError(name, "the GraphQL answer has no data")
    return data


def _without(value: Any, literal: frozenset[str]) -> Any:
    if not literal or not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if k not in literal}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _fill(value: Any, values: Mapping[str, object]) -> Any:
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole is not None:
            filled = values[whole.group(1)]
            # A typed value keeps its JSON type; anything else is spelled as text.
            return filled if isinstance(filled, str | int | float | bool) else str(filled)
        return _PLACEHOLDER.sub(lambda m: format_value(values[m.group(1)]), value)
    if isinstance(value, dict):
        return {key: _fill(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, values) for item in value]
    return value
