"""The demo's knobs: server-wide defaults, and their per-request values from the query string."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

#: Largest payload the demo grows to, in kilobytes.
MAX_PAYLOAD_KB = 1024


@dataclass(frozen=True)
class Knobs:
    """Server-wide defaults for the per-request knobs, so one flag slows every upstream."""

    latency: float = 0.1
    jitter: float = 0.0
    failure_rate: float = 0.0
    #: Chance that a call stalls until its caller times out (the `stall` knob's default).
    stall_rate: float = 0.0
    #: Kilobytes of JSON per answer (the `kb` knob's default); 0: the small default payloads.
    payload_kb: float = 0.0

    def __post_init__(self) -> None:
        """Reject nonsense early so a misconfigured demo fails at startup, not per request."""
        if not (math.isfinite(self.payload_kb) and 0 <= self.payload_kb <= MAX_PAYLOAD_KB):
            raise ValueError(
                f"payload_kb must be within 0..{MAX_PAYLOAD_KB}, got {self.payload_kb!r}"
            )
        for name in ("latency", "jitter"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("failure_rate", "stall_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value!r}")


@dataclass(frozen=True)
class RequestKnobs:
    """Knobs resolved for one request, so handlers read typed values."""

    delay: float
    jitter: float
    fail: float
    stall: float = 0.0
    #: Kilobytes of JSON the payload is grown to (0: the default payload).
    kb: float = 0.0
    #: The heavy tail: the chance that a call takes `tail_delay` seconds more ...
    tail: float = 0.0
    tail_delay: float = 1.0
    #: ... or, deterministically, every Nth call to this service (the 1st, N+1th, ...; 0: off).
    tail_every: int = 0
    status: int | None = None
    drip: float = 0.0
    size: int = 0
    invalid: bool = False
    html: bool = False
    wrong_shape: bool = False
    cache_control: str | None = None
    redirect: str | None = None
    gzip: bool = False
    content_type: str = "application/json"
    depth: int = 0


class BadKnobError(ValueError):
    """A knob value that cannot be parsed, so the 400 body can name it."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(f"bad value for knob {knob!r}: {message}")
        self.knob = knob


def _number(query: Mapping[str, str], knob: str, default: float, hi: float) -> float:
    """Parse a float knob within 0..hi."""
    raw = query.get(knob)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadKnobError(knob, f"{raw!r} is not a number") from None
    if not 0.0 <= value <= hi:  # also rejects nan
        raise BadKnobError(knob, f"{raw!r} is outside 0..{hi:g}")
    return value


def _integer(query: Mapping[str, str], knob: str, lo: int, hi: int) -> int | None:
    """Parse an integer knob within lo..hi."""
    raw = query.get(knob)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadKnobError(knob, f"{raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise BadKnobError(knob, f"{raw!r} is outside {lo}..{hi}")
    return value


def _flag(query: Mapping[str, str], knob: str) -> bool:
    """Parse a boolean knob such as invalid=1."""
    raw = query.get(knob)
    if raw is None:
        return False
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on", ""):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise BadKnobError(knob, f"{raw!r} is not a boolean")


def _header_value(query: Mapping[str, str], knob: str) -> str | None:
    """Parse a knob sent verbatim as a header value (no line breaks, no NUL)."""
    raw = query.get(knob)
    if raw is not None and any(c in raw for c in "\r\n\0"):
        raise BadKnobError(knob, "a header value cannot contain line breaks or NUL")
    return raw


def parse_knobs(query: Mapping[str, str], defaults: Knobs) -> RequestKnobs:
    """Resolve the per-request knobs over the server-wide defaults."""
    delay = _number(query, "delay", defaults.latency, 3600.0)
    jitter = _number(query, "jitter", defaults.jitter, 3600.0)
    fail = _number(query, "fail", defaults.failure_rate, 1.0)
    stall = _number(query, "stall", defaults.stall_rate, 1.0)
    kb = _number(query, "kb", defaults.payload_kb, MAX_PAYLOAD_KB)
    if len(query) == 0:
        return RequestKnobs(delay=delay, jitter=jitter, fail=fail, stall=stall, kb=kb)
    shape = query.get("shape")
    if shape not in (None, "wrong", "ok"):
        raise BadKnobError("shape", f"{shape!r} is not 'wrong' or 'ok'")
    status = _integer(query, "status", 200, 599)
    redirect = _header_value(query, "redirect")
    if redirect is not None and status is not None and not 300 <= status <= 399:
        raise BadKnobError("status", f"{status} is not a redirect status (with redirect=)")
    return RequestKnobs(
        delay=delay,
        jitter=jitter,
        fail=fail,
        stall=stall,
        kb=kb,
        tail=_number(query, "tail", 0.0, 1.0),
        tail_delay=_number(query, "tail_delay", 1.0, 3600.0),
        tail_every=_integer(query, "tail_every", 1, 1_000_000) or 0,
        status=status,
        drip=_number(query, "drip", 0.0, 3600.0),
        size=_integer(query, "size", 0, 2**31) or 0,
        invalid=_flag(query, "invalid"),
        html=_flag(query, "html"),
        wrong_shape=shape == "wrong",
        cache_control=_header_value(query, "cc"),
        redirect=redirect,
        gzip=_flag(query, "gzip"),
        content_type=_header_value(query, "ctype") or "application/json",
        depth=_integer(query, "depth", 1, 1_000_000) or 0,
    )
