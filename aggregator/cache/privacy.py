"""Who may share a cached answer: requests with credentials never share one across users.

A request carrying `Authorization` or `Cookie` may be answered per user, so unless its aggregate
declares `cache_vary` it bypasses the aggregate cache: no lookup, no store, and a fan-out of its
own (not the single-flight fill of other requests), answered with `X-Cache: BYPASS`,
`X-Cache-Bypass: credentials` and `Cache-Control: private, no-store`. An aggregate that declares
`cache_vary = ["X-Tenant"]` says its answers depend on those headers only (set by an
authenticating gateway); their values become part of the cache key, so requests share entries
only with requests that carry the same values, and answers to requests with credentials are
`private`. The fast path before Flask and the view read the same things from the headers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from aggregator.events import wanted_stream

CREDENTIAL_HEADERS = ("authorization", "cookie")
_CREDENTIALS = frozenset(name.encode() for name in CREDENTIAL_HEADERS)


class Caller(NamedTuple):
    """What the cache needs from a request's headers (a tuple: built on every fast-path hit)."""

    if_none_match: str | None = None
    #: It carries Authorization or Cookie.
    credentials: bool = False
    #: A digest of its `cache_vary` header values; empty when the aggregate declares none.
    vary: str = ""
    #: The progressive answer its Accept asks for ("sse", "ndjson"), or "" (JSON).
    stream: str = ""


ANONYMOUS = Caller()


def vary_digest(values: Sequence[str]) -> str:
    """The cache key's part for these header values (hashed: no tenant or secret in key names).

    "" when none of them is set: such a request has the same inputs as one made without headers
    (`aggregator warm`, a purge of one parameter set), so it shares their plain key.
    """
    if not any(values):
        return ""
    return hashlib.sha256("\0".join(values).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def caller_from_asgi(headers: Iterable[tuple[bytes, bytes]], vary: Sequence[bytes]) -> Caller:
    """From raw ASGI headers, as WSGI would see them: repeated headers are joined with `,`
    and, for `cache_vary` names, `_` reads as `-` (asgiref's environ), so the fast path and the
    view build the same key."""
    if_none_match: bytes | None = None
    credentials = False
    accept: bytes | None = None
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name == b"accept":
            accept = value if accept is None else accept + b"," + value
            if name in vary:
                found.setdefault(name, []).append(value)
        elif name == b"if-none-match":
            if_none_match = value if if_none_match is None else if_none_match + b"," + value
        elif name in _CREDENTIALS:
            credentials = credentials or bool(value.strip())
            if name in vary:  # cache_vary = ["Authorization"]: one entry per credential
                found.setdefault(name, []).append(value)
        elif vary:
            name = name.replace(b"_", b"-")
            if name in vary:
                found.setdefault(name, []).append(value)
    return Caller(
        None if if_none_match is None else if_none_match.decode("latin-1"),
        credentials,
        vary_digest([b",".join(found.get(n, ())).decode("latin-1") for n in vary]) if vary else "",
        "" if accept is None else wanted_stream(accept.decode("latin-1")),
    )


def caller_from_headers(get: Callable[[str], str | None], vary: Sequence[str]) -> Caller:
    """From a mapping of header values (werkzeug's `request.headers.get`)."""
    credentials = any((get(name) or "").strip() for name in CREDENTIAL_HEADERS)
    digest = vary_digest([get(name) or "" for name in vary]) if vary else ""
    return Caller(get("If-None-Match"), credentials, digest, wanted_stream(get("Accept")))
