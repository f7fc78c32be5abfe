"""Which HTTP/1.1 parser Hypercorn runs: stock h11, or its mypyc-compiled fork (opt-in).

Hypercorn reads and writes every HTTP/1.1 message with h11, which is pure Python and a large
share of a cache hit's CPU. h11-mypyc is the same code compiled. It is an opt-in
(`AGGREGATOR_HTTP1_PARSER=h11-mypyc`, installed by the `fast` extra) because it is a young fork
with one maintainer, and it would parse untrusted requests: only the version our conformance
tests ran against is accepted, it must be the compiled build, and it must parse a few requests
exactly as stock h11 does; otherwise the worker says why in one line and keeps stock h11.

Only Hypercorn's HTTP/1 protocol module is pointed at it (its module attribute `h11`, read on
every connection), not `sys.modules`: httpcore and anything else importing h11 keep the stock
one, whatever the import order.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from aggregator.settings import Http1Parser, Settings
from aggregator.status import parser_in_use

logger = logging.getLogger(__name__)

#: The h11-mypyc release the conformance tests (tests/test_http1_parser.py) ran against; pinned
#: in pyproject's `fast` extra and in constraints.txt.
PINNED_MYPYC = "0.17.0"

#: Requests both parsers must read into the same events (and refuse the same way): a GET, a
#: chunked POST, two pipelined requests, and framing Hypercorn must refuse.
_PROBES: dict[str, bytes] = {
    "a GET": b"GET /api/a?x=1 HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n",
    "a chunked POST": (
        b"POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "two pipelined requests": (
        b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\n"
    ),
    "Content-Length with chunked": (
        b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
    "a space in a header name": b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
    "a NUL in the target": b"GET /\x00 HTTP/1.1\r\nHost: t\r\n\r\n",
}


class ParserUnusable(Exception):
    """The compiled parser cannot be used; the message says why, in a few words."""


@dataclass(frozen=True)
class ParserChoice:
    """What `use_parser` did: the parser asked for, whether it is the one in use, and one line
    saying so (or why not)."""

    asked: Http1Parser
    used: Http1Parser
    line: str

    @property
    def fell_back(self) -> bool:
        return self.used != self.asked


def use_parser(parser: Http1Parser) -> ParserChoice:
    """Point Hypercorn's HTTP/1 protocol at `parser` in this process (each worker calls it
    before serving)."""
    protocol = importlib.import_module("hypercorn.protocol.h11")
    stock = importlib.import_module("h11")
    if parser == "h11":
        vars(protocol)["h11"] = stock
        return ParserChoice(parser, "h11", f"HTTP/1.1 parser: h11 {stock.__version__}")
    try:
        compiled = _checked_mypyc(stock)
    except ParserUnusable as exc:
        vars(protocol)["h11"] = stock
        line = f"AGGREGATOR_HTTP1_PARSER=h11-mypyc: {exc}; serving with h11 {stock.__version__}"
        return ParserChoice(parser, "h11", line)
    vars(protocol)["h11"] = compiled
    if parser_in_use() != "h11-mypyc":
        raise RuntimeError("Hypercorn's HTTP/1 protocol did not take the compiled parser")
    line = f"HTTP/1.1 parser: h11-mypyc {PINNED_MYPYC} (compiled)"
    return ParserChoice(parser, "h11-mypyc", line)


def use_configured_parser(*, report: bool = False) -> ParserChoice:
    """`use_parser` with AGGREGATOR_HTTP1_PARSER; `report`: log its line when the setting asks
    for the compiled parser (a warning when it fell back), for entry points that `aggregator
    serve` does not announce (`hypercorn asgi:app`)."""
    choice = use_parser(Settings().http1_parser)
    if report and choice.asked != "h11":
        logger.log(logging.WARNING if choice.fell_back else logging.INFO, choice.line)
    return choice


def _checked_mypyc(stock: ModuleType) -> ModuleType:
    try:
        version = importlib.metadata.version("h11-mypyc")
    except importlib.metadata.PackageNotFoundError:
        raise ParserUnusable("it is not installed (pip install 'aggregator[fast]')") from None
    if version != PINNED_MYPYC:
        raise ParserUnusable(f"{version} is installed, only {PINNED_MYPYC} is tested")
    try:
        compiled = importlib.import_module("h11_mypyc")
        connection = importlib.import_module("h11_mypyc._connection")
    except ImportError as exc:
        raise ParserUnusable(f"it does not import ({exc})") from None
    if not str(getattr(connection, "__file__", "")).endswith(".so"):
        raise ParserUnusable("it is not the compiled build (no extension modules)")
    for name, probe in _PROBES.items():
        if _events(compiled, probe) != _events(stock, probe):
            raise ParserUnusable(f"it reads {name} unlike h11")
    if _response(compiled) != _response(stock):
        raise ParserUnusable("it writes a response unlike h11")
    return compiled


def _events(h11: Any, data: bytes) -> list[str]:
    """What a server-side connection reads from `data`, as comparable text (answering 204 to
    each request, so that a pipelined one is read too)."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
    connection.receive_data(data)
    seen: list[str] = []
    for _ in range(20):
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            seen.append(f"refused {exc.error_status_hint}")
            break
        if event is h11.NEED_DATA:
            seen.append("NEED_DATA")
            break
        if event is h11.PAUSED:
            connection.send(h11.Response(status_code=204, headers=[]))
            connection.send(h11.EndOfMessage())
            connection.start_next_cycle()
            seen.append("answered")
            continue
        seen.append(_describe(event))
    return seen


def _describe(event: Any) -> str:
    fields = {
        name: getattr(event, name)
        for name in ("method", "target", "http_version", "data", "status_code")
        if hasattr(event, name)
    }
    headers = getattr(event, "headers", None)
    if headers is not None:
        fields["headers"] = list(headers)
    return f"{type(event).__name__}{sorted(fields.items())}"


def _response(h11: Any) -> bytes:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    connection.next_event()
    connection.next_event()
    head = connection.send(
        h11.Response(status_code=200, headers=[(b"content-length", b"2"), (b"x-a", b"b")])
    )
    return (
        bytes(head)
        + bytes(connection.send(h11.Data(data=b"{}")))
        + bytes(connection.send(h11.EndOfMessage()))
    )
