"""Every error aggregator raises, in one tree so callers can catch at the right depth.

AggregatorError
 +-- ConfigError                    the TOML file or an environment variable is unusable
 +-- InvalidRequestError            a client's parameters or body were rejected (4xx)
 |    +-- UnknownTargetError        an admin request names no configured aggregate/upstream (404)
 +-- UpstreamError                  one source failed; carried into the envelope, never raised
 |    +-- UpstreamTimeoutError      no full answer within the source's timeout
 |    +-- UpstreamUnavailableError  connection refused, reset or closed early
 |    +-- UpstreamBadStatusError    a non-2xx status
 |    +-- UpstreamInvalidPayloadError  not JSON, wrong shape, or too large
 |    +-- UpstreamCircuitOpenError  not called: its circuit breaker is open (resilience)
 |    +-- UpstreamOverloadedError   not called: its concurrency limit is reached (resilience)
 |    +-- UpstreamAuthError         not called: no OAuth2 token could be had for it
 |    +-- UpstreamGraphQLError      a GraphQL answer with `errors` and no `data`
 +-- WarmError                      `aggregator warm` cannot start (exit 2); nothing was warmed
 |    +-- TargetError               targets that fail validation, each named by file, line, field
 |    +-- NotWarmableError          a per-process cache, a refused token, an unreachable URL
 +-- StatusError                    `aggregator status` cannot read a deployment's metrics (exit 1)
 +-- AppRefError                    `--app module:app` names nothing we can serve (exit 2)
 +-- CacheUnavailableError          the cache backend failed or is cooling down; serve uncached

An `UpstreamError`'s `kind` is one of `ErrorKind`, the error kinds of the envelope.
"""

from __future__ import annotations

import json
from typing import Literal

from werkzeug.http import HTTP_STATUS_CODES

#: The one table of reason phrases every error body names its status with (werkzeug's, which
#: Flask's own errors use; 413 as RFC 9110 names it).
REASONS: dict[int, str] = {**HTTP_STATUS_CODES, 413: "Payload Too Large"}

#: What an invalid upstream body was: not JSON, not the upstream's model, or too large.
PayloadErrorKind = Literal["invalid_json", "validation", "too_large"]
#: Every way a source can fail, as the envelope's `errors` and the metrics name it. `deadline`
#: (cut off by the aggregate's deadline) and `dependency` (not called: a value its URL takes
#: from another source's answer could not be had, aggregator.graph) are never raised.
ErrorKind = Literal[
    "timeout",
    "connect",
    "http_status",
    PayloadErrorKind,
    "deadline",
    "circuit_open",
    "overloaded",
    "dependency",
    "auth",
    "graphql",
]


class AggregatorError(Exception):
    """Base of every error raised by aggregator."""


class ConfigError(AggregatorError):
    """The configuration cannot be used; the message names the file, key path and reason."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self._message())

    def _message(self) -> str:
        if len(self.problems) == 1:
            return f"invalid config {self.source}: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid config {self.source}:\n{lines}"

    def __repr__(self) -> str:
        return f"ConfigError(source={self.source!r}, problems={self.problems!r})"


class AppRefError(AggregatorError):
    """`--app MODULE:ATTR` cannot be served; the message, one line, names the reference and why."""

    def __init__(self, ref: str, reason: str) -> None:
        self.ref = ref
        self.reason = reason
        super().__init__(f"--app {ref}: {reason}")

    def __repr__(self) -> str:
        return f"AppRefError(ref={self.ref!r}, reason={self.reason!r})"


class InvalidRequestError(AggregatorError):
    """A client sent parameters we cannot use; rendered as 400 naming the field."""

    status = 400

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(field={self.field!r}, reason={self.reason!r})"


class UnknownTargetError(InvalidRequestError):
    """An admin request (purge, warm) names an aggregate or upstream not in the config."""

    status = 404


class UpstreamError(AggregatorError):
    """One source failed; `kind` is the envelope's error kind (each subclass sets its own)."""

    kind: ErrorKind

    def __init__(self, upstream: str, detail: str, *, status: int | None = None) -> None:
        self.upstream = upstream
        self.detail = detail
        self.status = status
        super().__init__(f"{upstream}: {detail}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(upstream={self.upstream!r}, detail={self.detail!r}, "
            f"status={self.status!r})"
        )


class UpstreamTimeoutError(UpstreamError):
    """The source did not deliver its whole answer within its timeout."""

    kind = "timeout"


class UpstreamUnavailableError(UpstreamError):
    """The source could not be reached or dropped the connection."""

    kind = "connect"


class UpstreamBadStatusError(UpstreamError):
    """The source answered with a non-2xx status."""

    kind = "http_status"


class UpstreamInvalidPayloadError(UpstreamError):
    """The source's body is unusable; `kind` says why."""

    def __init__(
        self,
        upstream: str,
        detail: str,
        *,
        kind: PayloadErrorKind,
        locations: list[str] | None = None,
    ) -> None:
        super().__init__(upstream, detail)
        self.kind = kind
        self.locations = locations or []


class UpstreamCircuitOpenError(UpstreamError):
    """The source was not called: its recent calls failed and its breaker is open."""

    kind = "circuit_open"


class UpstreamOverloadedError(UpstreamError):
    """The source was not called: it already has as many calls in flight as it may."""

    kind = "overloaded"


class UpstreamAuthError(UpstreamError):
    """The source was not called: its OAuth2 token endpoint gave no usable token.

    The detail never holds the client secret, a token, or the token endpoint's body.
    """

    kind = "auth"


class UpstreamGraphQLError(UpstreamError):
    """A GraphQL upstream answered an `errors` array and no `data` (their text is not kept)."""

    kind = "graphql"


class WarmError(AggregatorError):
    """`aggregator warm` cannot run as asked (exit 2); nothing was warmed."""


class TargetError(WarmError):
    """Targets that cannot be warmed; the message names each file, line or entry and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(self._message())

    def _message(self) -> str:
        if len(self.problems) == 1:
            return f"{self.problems[0]} (nothing was warmed)"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{len(self.problems)} problems with the targets (nothing was warmed):\n{lines}"

    def __repr__(self) -> str:
        return f"TargetError(problems={self.problems!r})"


class NotWarmableError(WarmError):
    """The deployment or cache cannot be warmed from here (per-process cache, token, address)."""


class StatusError(AggregatorError):
    """`aggregator status` got no metrics: unreachable, refused, or not Prometheus text."""


class CacheUnavailableError(AggregatorError):
    """The cache backend failed or is cooling down after a failure; serve uncached."""


def error_body(status: int, message: str, **fields: object) -> dict[str, object]:
    """The one JSON error shape: `{"error": <reason>, "message": ..., <fields>}`, for every
    failure whoever answers it (a view, the adapter, the request limits)."""
    return {"error": REASONS.get(status, "Error"), "message": message, **fields}


def error_json(status: int, message: str, **fields: object) -> bytes:
    """`error_body` encoded, for answers sent without Flask."""
    return json.dumps(error_body(status, message, **fields)).encode()
