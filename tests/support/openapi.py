"""Checking answers against the OpenAPI document the service publishes."""

from __future__ import annotations

from typing import Any

import jsonschema


def response_validator(document: dict[str, Any], path: str, status: int) -> Any:
    """A JSON Schema validator for the body of `status` at GET `path`, refs resolved in place."""
    operation = document["paths"][path]
    method = "get" if "get" in operation else "post"
    schema = operation[method]["responses"][str(status)]["content"]["application/json"]["schema"]
    whole = {**schema, "components": document["components"]}
    return jsonschema.Draft202012Validator(whole)
