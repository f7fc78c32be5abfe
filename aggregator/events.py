"""A progressive answer's events and their two wire formats, pure (no I/O, no Flask).

A request whose `Accept` asks for `text/event-stream` (Server-Sent Events) or
`application/x-ndjson` (one JSON object a line) gets its aggregate's answer as it is made: one
`source` event per source the moment it lands, then one `done` event. A `source` event is the
source's entry in the envelope's `sources` (`status`, `ms`, `started`, `cache`, `fallback`)
under `source` (its key there), with its `data` (a configured aggregate's source that answered
or served its fallback) and its `error` (one that failed, as in `errors`). `done` is the
envelope without `data` (`errors`, `sources`, `complete`, and whatever else the JSON body
carries), after the HTTP `status` the JSON answer has, with `x_cache` and `age` (its `X-Cache`
and `Age`, when it has them) and `server_timing` (its `Server-Timing`). An aggregate written as
a view keeps `data` in `done` (what its body returned), and its `source` events carry none: a
view returns what it chooses of its sources' answers, and an event must not tell more.

In NDJSON each object has an `event` field (`source`, `done`) instead of SSE's `event:` line.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Literal

import pydantic_core
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from aggregator.merge import source_error, source_info
from aggregator.models import JSONDict, SourceResult

Kind = Literal["sse", "ndjson"]
#: The media type of each kind of progressive answer.
MEDIA_TYPES: dict[str, str] = {"sse": "text/event-stream", "ndjson": "application/x-ndjson"}
_OFFERED = ["application/json", *MEDIA_TYPES.values()]  # JSON first: it wins a tie (`*/*`)
_KINDS = {media: kind for kind, media in MEDIA_TYPES.items()}


def wanted_stream(accept: str | None) -> str:
    """The progressive answer an `Accept` header asks for by name ("sse", "ndjson"), or ""."""
    # Most requests name neither (the fast path reads this on every hit): look before parsing.
    if not accept or ("event-stream" not in accept and "ndjson" not in accept):
        return ""
    best = parse_accept_header(accept, MIMEAccept).best_match(_OFFERED)
    return _KINDS.get(best or "", "")


def source_event(key: str, result: SourceResult, *, view: bool = False) -> JSONDict:
    """A source's event from its result as it landed (`view`: an aggregate written as a view)."""
    event: JSONDict = {"source": key, **source_info(result).model_dump(exclude_none=True)}
    if not view and (result.ok or result.fallback):
        event["data"] = result.data
    if not result.ok:
        event["error"] = source_error(result).model_dump(exclude_none=True)
    return event


def stored_events(
    envelope: Mapping[str, object], *, view: bool = False, told: Collection[str] = ()
) -> Iterator[JSONDict]:
    """The `source` events of an envelope (a stored or finished answer), in its `sources`
    order, leaving out the keys in `told` (already sent as they landed)."""
    sources = envelope.get("sources")
    data = envelope.get("data")
    errors = envelope.get("errors")
    if not isinstance(sources, dict):
        return
    data = data if isinstance(data, dict) and not view else {}
    errors = errors if isinstance(errors, dict) else {}
    for key, info in sources.items():
        if key in told:
            continue
        event: JSONDict = {"source": key, **info}
        if key in data:
            event["data"] = data[key]
        if key in errors:
            event["error"] = errors[key]
        yield event


def done_event(
    envelope: Mapping[str, object],
    status: int,
    headers: Mapping[str, str],
    *,
    view: bool = False,
) -> JSONDict:
    """The last event: `status`, the envelope without `data` (unless `view`), then what the
    JSON answer's headers say (`x_cache`, `age`, `server_timing`)."""
    done: JSONDict = {"status": status}
    done.update((k, v) for k, v in envelope.items() if view or k != "data")
    if "X-Cache" in headers:
        done["x_cache"] = headers["X-Cache"]
    if headers.get("Age", "").isdigit():
        done["age"] = int(headers["Age"])
    done["server_timing"] = headers.get("Server-Timing", "")
    return done


def encode(kind: str, event: str, payload: JSONDict) -> bytes:
    """One event on the wire: an SSE `event:`/`data:` block, or an NDJSON line."""
    if kind == "sse":
        # Compact JSON holds no raw newline, so one `data:` line carries it whole.
        return b"event: " + event.encode() + b"\ndata: " + pydantic_core.to_json(payload) + b"\n\n"
    return pydantic_core.to_json({"event": event, **payload}) + b"\n"
