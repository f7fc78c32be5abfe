"""Reading a progressive answer in the tests: SSE blocks and NDJSON lines, as a client would."""

from __future__ import annotations

import json
from typing import Any

SSE = {"Accept": "text/event-stream"}
NDJSON = {"Accept": "application/x-ndjson"}


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Each `event:`/`data:` block as (event, data) (the HTML spec's format, as we send it)."""
    found = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
        found.append((fields["event"][0], json.loads("\n".join(fields["data"]))))
    return found


def parse_ndjson(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Each line as (event, the object without its `event` field)."""
    found = []
    for line in text.splitlines():
        item = json.loads(line)
        found.append((item.pop("event"), item))
    return found


def sources_of(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [data["source"] for kind, data in events if kind == "source"]


def done_of(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    kinds = [kind for kind, _ in events]
    assert kinds.count("done") == 1 and kinds[-1] == "done", kinds
    return events[-1][1]
