"""Reading `Cache-Control` and `Age` response headers: text in, `CacheControl` out (pure).

What the upstream *said*; how long to keep a payload is decided by the cache package.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aggregator.models import CacheControl

_ELEMENT = re.compile(r'(?:"(?:[^"\\]|\\.)*"?|[^,"])+')
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_QUOTED_PAIR = re.compile(r"\\(.)")
#: RFC 9111 §1.2.2: a larger delta-seconds is taken as 2^31.
_MAX_DELTA = 2**31


def parse_cache_control(header: str | None, age: str | None = None) -> CacheControl:
    """What `Cache-Control` (and `Age`) headers say, read leniently as RFC 9111 asks.

    Directive names are case-insensitive; arguments may be tokens or quoted strings; a repeated
    directive counts once (its first value); qualified `no-cache="field"` and `private="field"`
    count as the plain directives; an unreadable number of seconds reads as 0 (stale).
    """
    found: dict[str, str | None] = {}
    for element in _ELEMENT.findall(header or ""):
        raw_name, eq, raw_value = element.partition("=")
        name = raw_name.strip().lower()
        if not _TOKEN.fullmatch(name):
            continue
        value = raw_value.strip()
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1] if value.endswith('"') else value[1:])
        found.setdefault(name, value if eq else None)
    return CacheControl(
        max_age=_seconds(found, "max-age"),
        s_maxage=_seconds(found, "s-maxage"),
        no_store="no-store" in found,
        no_cache="no-cache" in found,
        private="private" in found,
        age=_first_delta(age),
    )


def _seconds(found: Mapping[str, str | None], directive: str) -> float | None:
    if directive not in found:
        return None
    return _delta(found[directive]) or 0.0  # present but unreadable: stale


def _first_delta(header: str | None) -> float:
    """Age: its first list member (RFC 9111 §5.1); ignored (0) when unreadable."""
    if header is None:
        return 0.0
    return _delta(header.split(",")[0].strip()) or 0.0


def _delta(value: str | None) -> float | None:
    """delta-seconds (digits only), capped at 2^31; None when it is not one."""
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return float(min(int(value), _MAX_DELTA))
