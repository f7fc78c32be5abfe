"""Shaped answers: a source's `shape`, a JMESPath expression applied to its validated payload.

One expression covers what dashboards ask for: keep some fields and rename them
(`{city: location.name, temp: current.temp_c}`), pick a sub-object (`current`) or a nested value
(`items[0].title`), or project a list (`items[*].{id: id, title: title}`). JMESPath (the
`jmespath` package) is a specified language with a conformance suite and the one AWS's CLI and
Azure's use, so an expression means the same here as in the tools operators already know.

It runs after validation (the model still checks what the upstream sent, and its dump is what
the expression sees). At load, a malformed expression is a one-line error, and with a schema
every field the expression names is looked up in the model's JSON schema, so a typo such as
`locaton.name` stops start-up with its key path instead of always answering null. The same walk
gives the shaped payload's schema for `/openapi.json`; the parts it cannot follow (functions,
filters, pipes) are documented there as any JSON.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jmespath
from jmespath.exceptions import JMESPathError
from jmespath.parser import ParsedResult

from aggregator.errors import UpstreamInvalidPayloadError
from aggregator.models import JSONDict

if TYPE_CHECKING:
    from aggregator.config import UpstreamConfig

_ANY: JSONDict = {}


@functools.lru_cache(maxsize=256)
def compile_shape(expression: str) -> ParsedResult:
    """The compiled expression; ValueError with a one-line reason when it is not JMESPath."""
    try:
        return jmespath.compile(expression)
    except JMESPathError as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"not a valid JMESPath expression: {reason}") from None


def apply_shape(name: str, upstream: UpstreamConfig, data: Any) -> Any:
    """`data` shaped by the upstream's `shape` (unchanged without one).

    A missing field reads as null (JMESPath's rule); a function given a value of the wrong type
    (`length(n)` on a number) is the source's `validation` error: the payload is not one the
    shape was written for.
    """
    if upstream.shape is None:
        return data
    try:
        return compile_shape(upstream.shape).search(data)
    except JMESPathError as exc:
        raise UpstreamInvalidPayloadError(
            name,
            f"the payload does not fit its shape ({type(exc).__name__})",
            kind="validation",
        ) from None


def shape_problems(where: str, upstream: UpstreamConfig) -> list[str]:
    """Fields the shape names that the upstream's schema does not have (`where.shape: ...`)."""
    if upstream.shape is None or upstream.model is None:
        return []
    problems: list[str] = []
    schema = upstream.model.model_json_schema(mode="serialization")
    _Walker(schema, problems).walk(compile_shape(upstream.shape).parsed, schema)
    return [f"{where}.shape: {p} (the schema is {upstream.schema_})" for p in problems]


def shaped_schema(upstream: UpstreamConfig, schema: JSONDict, defs: JSONDict) -> JSONDict:
    """The JSON schema of the shaped payload, given the payload's `schema` (a `$ref` into
    `defs`, the document's component schemas): what `/openapi.json` shows under `data`."""
    if upstream.shape is None:
        return schema
    walker = _Walker({"$defs": defs}, [], ref_prefix="#/components/schemas/")
    shaped = walker.walk(compile_shape(upstream.shape).parsed, schema)
    return {**shaped, "description": f"Shaped by `{upstream.shape}` (JMESPath)."}


class _Walker:
    """Follows a JMESPath AST through a JSON schema: the result's schema, and missing fields."""

    def __init__(self, root: JSONDict, problems: list[str], *, ref_prefix: str = "#/$defs/"):
        self._defs: JSONDict = root.get("$defs", {})
        self._prefix = ref_prefix
        self.problems = problems

    def _resolve(self, schema: JSONDict) -> JSONDict:
        seen = 0
        while "$ref" in schema and seen < 32:
            name = str(schema["$ref"]).removeprefix(self._prefix)
            schema = self._defs.get(name, _ANY)
            seen += 1
        # Optional fields are `anyOf: [X, null]`: follow the non-null branch.
        options = schema.get("anyOf")
        if isinstance(options, list):
            real = [o for o in options if o.get("type") != "null"]
            if len(real) == 1:
                return self._resolve(real[0])
        return schema

    def walk(self, node: dict[str, Any], schema: JSONDict, path: str = "") -> JSONDict:
        kind = node["type"]
        children: list[dict[str, Any]] = node.get("children", [])
        if kind == "identity" or kind == "current":
            return schema
        if kind == "field":
            return self._field(node["value"], schema, path)
        if kind in ("subexpression", "index_expression"):
            left = self.walk(children[0], schema, path)
            return self.walk(children[1], left, _join(path, _text(children[0])))
        if kind == "index":
            return self._items(schema)
        if kind == "projection":
            left = self.walk(children[0], schema, path)
            items = self._items(left)
            inner = _join(path, _text(children[0]) + "[*]")
            return {"type": "array", "items": self.walk(children[1], items, inner)}
        if kind == "flatten":
            return self.walk(children[0], schema, path)
        if kind == "multi_select_dict":
            props = {
                pair["value"]: self.walk(pair["children"][0], schema, path) for pair in children
            }
            return {"type": "object", "properties": props, "required": list(props)}
        if kind == "multi_select_list":
            return {"type": "array", "items": {}}
        if kind == "literal":
            return {"const": node["value"]}
        return _ANY  # functions, filters, pipes, comparisons: not followed

    def _field(self, name: str, schema: JSONDict, path: str) -> JSONDict:
        schema = self._resolve(schema)
        props = schema.get("properties")
        if not isinstance(props, dict):
            return _ANY  # an untyped part of the schema: nothing to check against
        if name not in props:
            where = _join(path, name)
            known = ", ".join(sorted(props)) or "none"
            self.problems.append(f"{where} is not a field of the payload (known: {known})")
            return _ANY
        found: JSONDict = props[name]
        return found

    def _items(self, schema: JSONDict) -> JSONDict:
        schema = self._resolve(schema)
        items = schema.get("items")
        return items if isinstance(items, dict) else _ANY


def _join(path: str, text: str) -> str:
    if not text:
        return path
    return f"{path}.{text}" if path and not text.startswith("[") else path + text


def _text(node: dict[str, Any]) -> str:
    """The key path a node names (`location.name`, `items[0]`), for error messages."""
    kind, children = node["type"], node.get("children", [])
    if kind == "field":
        return str(node["value"])
    if kind == "subexpression":
        return _join(_text(children[0]), _text(children[1]))
    if kind == "index_expression":
        return _join(_text(children[0]), _text(children[1]))
    if kind == "index":
        return f"[{node['value']}]"
    return ""
