"""The progressive answers in the document: SSE and NDJSON beside JSON, and their two events.

OpenAPI 3.1 has no schema for a sequence of items in one body, so each media type's `schema` is
a string saying how it is framed, and `x-events` names the schema of each event
(`aggregator.events` is what they describe).
"""

from __future__ import annotations

from pydantic import BaseModel

from aggregator.events import MEDIA_TYPES
from aggregator.models import JSONDict, SourceError, SourceInfo, StaleInfo
from aggregator.openapi.responses import ref

_FRAMING = {
    "sse": "Server-Sent Events: one `event: source` block per source as it lands, then one "
    "`event: done`; each `data:` line is one JSON object.",
    "ndjson": "One JSON object per line: a `source` object per source as it lands, then one "
    "`done`; each carries `event` (`source` or `done`).",
}


def event_schemas(refs: dict[type[BaseModel], JSONDict]) -> JSONDict:
    """The `SourceEvent` and `DoneEvent` components."""
    source = {
        "description": "One source, the moment it landed: its entry in `sources` with its key "
        "as `source`, its `data` (a configured aggregate's source that answered or served its "
        "fallback; never a view's) and its `error` (one that failed, as in `errors`).",
        "allOf": [
            refs[SourceInfo],
            {
                "type": "object",
                "required": ["source"],
                "properties": {
                    "source": {"type": "string"},
                    "data": {"description": "The source's payload, as in the envelope's data."},
                    "error": refs[SourceError],
                },
            },
        ],
    }
    done = {
        "type": "object",
        "description": "The end: the status the JSON answer has, the envelope without `data` "
        "(a view's keeps it: what the view returned), and the JSON answer's X-Cache, Age and "
        "Server-Timing. For a bad parameter: the status and the one error body.",
        "required": ["status"],
        "properties": {
            "status": {"type": "integer", "description": "The JSON answer's HTTP status."},
            "errors": {"type": "object", "additionalProperties": refs[SourceError]},
            "sources": {"type": "object", "additionalProperties": refs[SourceInfo]},
            "complete": {"type": "boolean"},
            "stale": refs[StaleInfo],
            "data": {"type": "object", "description": "A view's answer (views only)."},
            "x_cache": {"type": "string", "enum": ["HIT", "STALE", "MISS", "BYPASS"]},
            "age": {"type": "integer", "minimum": 0},
            "server_timing": {"type": "string"},
            "error": {"type": "string"},
            "message": {"type": "string"},
            "field": {"type": "string"},
        },
    }
    return {"SourceEvent": source, "DoneEvent": done}


def progressive_content() -> JSONDict:
    """The 200 response's SSE and NDJSON media types (always a 200: the status is in `done`)."""
    events = {"source": ref("SourceEvent"), "done": ref("DoneEvent")}
    return {
        media: {"schema": {"type": "string", "description": _FRAMING[kind]}, "x-events": events}
        for kind, media in MEDIA_TYPES.items()
    }
