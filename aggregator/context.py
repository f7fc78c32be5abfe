"""What travels with one request into its log lines and upstream calls: its id and the client
headers some upstream forwards.

Both are contextvars, set by the ASGI adapter before anything else runs for the request (the
fast cache path included). Contextvars follow the request wherever its work runs: the adapter's
request greenlet gets a copy of the context, the fan-out's tasks copy it when created, retries
run in the calling task, `def` views and the sync twins' threads are handed a copy
(`contextvars.copy_context().run`). A cache fill is a task created by the request that started
it, so every request that joins that fill (single-flight) is served by upstream calls carrying
the *starting* request's id; its log lines say so.

Request ids: a client's (or proxy's) `X-Request-ID` is kept when it is 1-128 characters of
`A-Z a-z 0-9 . _ : -`, else replaced by a new one. Replaced, not refused with a 400: the id is
diagnostic metadata, often added by a proxy the dashboard does not control, and failing a
request over it would turn a logging detail into an outage. The charset keeps ids safe to echo
in a response header, to send upstream, and to write into a text log line unquoted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from types import MappingProxyType

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 128
_VALID_ID = re.compile(rb"[A-Za-z0-9._:-]{1,%d}" % MAX_REQUEST_ID)
#: No forwarded headers (outside a request, or where a request's own must not travel).
NO_HEADERS: Mapping[str, str] = MappingProxyType({})

#: The id of the request this code runs for; None outside a request (start-up, the CLI).
request_id: ContextVar[str | None] = ContextVar("aggregator_request_id", default=None)
#: Client headers of this request that some upstream forwards: lowercase name -> value.
forwarded: ContextVar[Mapping[str, str]] = ContextVar("aggregator_forwarded", default=NO_HEADERS)


#: Ids drawn ahead: one `os.urandom` call per `_ID_BATCH` ids instead of one per request (a
#: syscall, and on a busy VM a slow one). `list.pop` and `extend` are atomic under the GIL, so
#: threads may share it; a forked child drops the parent's (it must never reuse them).
_ID_BATCH = 256
_spare_ids: list[str] = []
os.register_at_fork(after_in_child=_spare_ids.clear)


def new_request_id() -> str:
    """A fresh id: 128 random bits from the OS as 32 hex digits (a UUID's entropy)."""
    try:
        return _spare_ids.pop()
    except IndexError:
        drawn = os.urandom(16 * _ID_BATCH).hex()
        _spare_ids.extend(drawn[i : i + 32] for i in range(32, len(drawn), 32))
        return drawn[:32]


def accept_request_id(raw: bytes | None) -> str:
    """The client's id when it is valid, else a new one."""
    if raw is not None and _VALID_ID.fullmatch(raw):
        return raw.decode("ascii")
    return new_request_id()


def read_request(
    headers: Iterable[tuple[bytes, bytes]], forward_names: frozenset[bytes]
) -> tuple[str, Mapping[str, str]]:
    """The request's id and its forwardable headers, in one pass over the ASGI header list.

    A repeated `X-Request-ID` is ambiguous, so it is replaced like an invalid one. A repeated
    forwarded header is joined into one value as HTTP allows (`; ` for cookies, else `, `); `_`
    in a name reads as `-`, as asgiref's WSGI environ and the cache key (`cache.privacy`) read it.
    """
    given: bytes | None = None
    repeated = False
    found: dict[str, str] | None = None
    for name, value in headers:
        if name == b"x-request-id":
            repeated = given is not None
            given = value
        elif forward_names:
            if b"_" in name:  # as WSGI (and so the cache key) reads it: `X_Tenant` is X-Tenant
                name = name.replace(b"_", b"-")
            if name not in forward_names:
                continue
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            if found is None:
                found = {key: text}
            elif key in found:
                found[key] += ("; " if key == "cookie" else ", ") + text
            else:
                found[key] = text
    rid = new_request_id() if repeated else accept_request_id(given)
    return rid, NO_HEADERS if found is None else found


def outgoing_headers(
    static: Mapping[str, str], forward: tuple[tuple[str, str], ...]
) -> Mapping[str, str]:
    """Headers of one upstream call: the configured ones, the allow-listed client ones, the id.

    Nothing else of the client's request is ever sent. Cheap on purpose (one small dict per
    call): the upstream call is the hot path's biggest cost already.
    """
    rid = request_id.get()
    if not forward:
        return static if rid is None else {**static, REQUEST_ID_HEADER: rid}
    headers = dict(static)
    values = forwarded.get()
    for name, key in forward:
        value = values.get(key)
        if value is not None:
            headers[name] = value
    if rid is not None:
        headers[REQUEST_ID_HEADER] = rid
    return headers
