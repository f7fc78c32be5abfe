"""Upstream URL templates whose placeholders can only ever fill data, never change the target.

A parameter value is percent-encoded with nothing left safe, so `/`, `?`, `#`, `@`, `%` and CR/LF
stay inside the segment they were placed in; in the path, dots are encoded too so a value of
`..` cannot become a dot-segment that a client or server would normalize away. Placeholders in
the scheme or host part are rejected when the config loads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class UrlTemplate:
    """A parsed `scheme://host[:port]/path?query` template with `{name}` placeholders."""

    origin: str
    rest: str
    names: frozenset[str]
    _query_start: int

    @classmethod
    def parse(cls, template: str) -> UrlTemplate:
        """Split and check a template; ValueError says what is wrong with it."""
        if any(c in template for c in "\r\n\t "):
            raise ValueError("must not contain whitespace or line breaks")
        parts = urlsplit(template)
        if parts.scheme not in ("http", "https") or not template.lower().startswith(
            f"{parts.scheme}://"
        ):
            raise ValueError("must start with http:// or https://")
        if not parts.netloc or _PLACEHOLDER.search(parts.netloc) or "{" in parts.netloc:
            raise ValueError(
                "placeholders may not appear in the scheme or host part; "
                "use them in the path or query"
            )
        if parts.fragment:
            raise ValueError("must not contain a #fragment")
        origin = f"{parts.scheme}://{parts.netloc}"
        rest = template[len(origin) :]
        if rest and not rest.startswith(("/", "?")):
            raise ValueError("the host must be followed by / or ?")
        names = frozenset(_PLACEHOLDER.findall(rest))
        q = rest.find("?")
        return cls(origin, rest, names, q if q >= 0 else len(rest))

    def render(self, values: Mapping[str, object]) -> str:
        """Fill every placeholder with its percent-encoded value."""

        def fill(match: re.Match[str]) -> str:
            encoded = quote(format_value(values[match.group(1)]), safe="")
            if match.start() < self._query_start:
                encoded = encoded.replace(".", "%2E")
            return encoded

        return self.origin + _PLACEHOLDER.sub(fill, self.rest)


def format_value(value: object) -> str:
    """Spell a typed parameter the way upstreams expect it in a URL."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
