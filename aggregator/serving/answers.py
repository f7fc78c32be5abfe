"""Responses the adapter sends itself, without Flask: cache hits, refusals, 503s.

Every error among them is the one JSON error shape (`errors.error_json`), so a client parses a
503 at the in-flight limit like a 400 from a view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aggregator.errors import error_json
from aggregator.settings import Settings

if TYPE_CHECKING:
    from hypercorn.typing import ASGISendCallable


class FastAnswer(Protocol):
    """What a fast path returns for a request it can answer without Flask."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> list[tuple[str, str]]: ...
    @property
    def body(self) -> bytes: ...


@dataclass(slots=True)
class CannedAnswer:
    """A response the adapter sends itself (the FastAnswer shape)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def overload_answer(settings: Settings) -> CannedAnswer:
    """The 503 for a request over the in-flight limit (built once)."""
    retry_after = settings.overload_retry_after
    body = error_json(
        503,
        f"overloaded: {settings.max_in_flight} requests already in flight in "
        f"this worker; retry after {retry_after} s",
        retry_after=retry_after,
    )
    headers = [
        ("content-type", "application/json"),
        ("retry-after", str(retry_after)),
        ("cache-control", "no-store"),
    ]
    return CannedAnswer(503, headers, body)


#: The 503 for a request the server cut at shutdown, past its graceful_timeout.
CUT_ANSWER = CannedAnswer(
    503,
    [
        ("content-type", "application/json"),
        ("retry-after", "1"),
        ("cache-control", "no-store"),
        ("connection", "close"),
    ],
    error_json(
        503,
        "the server is shutting down and could not finish this request in "
        "its graceful_timeout; retry",
    ),
)


async def send_answer(send: ASGISendCallable, answer: FastAnswer, *, head: bool) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    body: bytes = b"" if head else answer.body
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_refusal(send: ASGISendCallable, status: int, message: str) -> None:
    """A JSON error for a request Flask never sees (too large, too slow); closes after."""
    body = error_json(status, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
