"""Which client request headers an upstream may be configured to receive, and why not the others.

A policy about HTTP, not about the file it is configured in: some headers describe the client's
connection to us or ask about *our* answer, and forwarding them would make an upstream answer
something we cannot use; credentials travel only where the config says so explicitly. The
config applies these rules when it loads (`UpstreamConfig.forward_headers`); the values travel
per request in `aggregator.context`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

#: A forwardable header name: letters, digits and `-` (as `cache_vary`: WSGI reads `_` as `-`).
_FORWARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
#: Client headers never forwarded upstream, with why: they describe the connection to us, frame
#: or route our own request, are meant for us as the proxy, or ask about OUR answer (the client's
#: caching and encoding), so an upstream seeing them would answer something we cannot use.
NEVER_FORWARDED = {
    "connection": "a hop-by-hop header",
    "keep-alive": "a hop-by-hop header",
    "proxy-connection": "a hop-by-hop header",
    "te": "a hop-by-hop header",
    "trailer": "a hop-by-hop header",
    "transfer-encoding": "a hop-by-hop header",
    "upgrade": "a hop-by-hop header",
    "host": "set from the upstream's url",
    "content-length": "set by the client for its own request",
    "proxy-authorization": "credentials meant for this service as a proxy",
    "accept-encoding": "the client's encodings are for our answer, not the upstream's",
    "if-none-match": "conditional headers are about our answer, not the upstream's",
    "if-modified-since": "conditional headers are about our answer, not the upstream's",
    "if-match": "conditional headers are about our answer, not the upstream's",
    "if-unmodified-since": "conditional headers are about our answer, not the upstream's",
    "if-range": "conditional headers are about our answer, not the upstream's",
    "range": "a partial body is not a usable answer",
    "x-request-id": "always sent: the request's id (see README, Request ids)",
}
#: Client credentials: forwarded only with `forward_credentials = true` on that upstream.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie"})


def check_names(names: Iterable[str]) -> None:
    """Each name must be forwardable and listed once; ValueError names the first that is not."""
    seen: set[str] = set()
    for name in names:
        key = name.lower()
        if not _FORWARD_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name (letters, digits and -)")
        if key in NEVER_FORWARDED:
            raise ValueError(f"{name} is never forwarded ({NEVER_FORWARDED[key]})")
        if key in seen:
            raise ValueError(f"{name} is listed twice")
        seen.add(key)


def check_upstream(
    forward_headers: Sequence[str], *, credentials: bool, static: Iterable[str]
) -> None:
    """One upstream's forwarded names against its other settings: credentials only when it
    allows them, and no name that is also one of its own configured (`static`) headers."""
    for name in forward_headers:
        if name.lower() in CREDENTIAL_HEADERS and not credentials:
            raise ValueError(
                f"forward_headers: {name} carries the client's credentials; forwarding it "
                "needs forward_credentials = true on this upstream"
            )
    configured = {name.lower() for name in static}
    clash = [name for name in forward_headers if name.lower() in configured]
    if clash:
        raise ValueError(
            f"forward_headers: {clash[0]} is also a configured header (one or the other)"
        )
