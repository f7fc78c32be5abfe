"""Shapes that cross module boundaries: one source's outcome and the envelope dashboards get."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

JSONDict = dict[str, Any]

#: Error kinds of DESIGN §4; "ok" marks success.
SourceStatus = Literal[
    "ok",
    "timeout",
    "connect",
    "http_status",
    "invalid_json",
    "validation",
    "too_large",
    "deadline",
    "circuit_open",
]


@dataclass(slots=True)
class SourceResult:
    """What one upstream call produced: data on success, an error kind otherwise; never raises."""

    name: str
    status: SourceStatus
    ms: float
    data: Any = None
    detail: str | None = None
    upstream_status: int | None = None
    locations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class SourceError(BaseModel):
    """One failed source as the envelope reports it."""

    kind: SourceStatus
    detail: str
    status: int | None = None
    locations: list[str] | None = None


class SourceInfo(BaseModel):
    """Per-source status and timing, present for every source."""

    status: SourceStatus
    ms: float


class Envelope(BaseModel):
    """The merged answer: what arrived, what failed, and whether it is complete."""

    data: JSONDict
    errors: dict[str, SourceError]
    sources: dict[str, SourceInfo]
    complete: bool
