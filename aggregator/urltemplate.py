"""Upstream URL templates whose placeholders can only ever fill data, never change the target.

A parameter value is percent-encoded with nothing left safe, so `/`, `?`, `#`, `@`, `%` and CR/LF
stay inside the segment they were placed in; in the path, dots are encoded too so a value of
`..` cannot become a dot-segment that a client or server would normalize away. Placeholders in
the scheme or host part are rejected when the config loads.

`{name}` is an aggregate parameter; a dotted `{profile.city}` is a field of another source's
answer (`aggregator.graph` resolves it). Both are filled the same way, by the placeholder's text:
`render({"city": ..., "profile.city": ...})`, so a value from an upstream's answer is exactly as
unable to move the target as a client's parameter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

#: `{param}`, or `{source.key[.key...]}`: a source name (which may hold `-`) and at least one key
#: into its answer (a digit key indexes a list).
_PLACEHOLDER = re.compile(
    r"\{([A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)+)\}"
)


@dataclass(frozen=True, slots=True)
class FieldRef:
    """A dotted placeholder: `source`'s answer, then the keys of `path` (`{profile.team.id}`)."""

    text: str
    source: str
    path: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> FieldRef:
        source, *path = text.split(".")
        return cls(text, source, tuple(path))


@dataclass(frozen=True, slots=True)
class UrlTemplate:
    """A parsed `scheme://host[:port]/path?query` template with `{name}` placeholders."""

    origin: str
    rest: str
    #: The aggregate parameters it names (`{city}`).
    names: frozenset[str]
    _query_start: int
    #: The fields of other sources' answers it names (`{profile.city}`), in order, once each.
    fields: tuple[FieldRef, ...] = ()

    @property
    def sources(self) -> frozenset[str]:
        """The sources whose answers this template needs before it can be rendered."""
        return frozenset(ref.source for ref in self.fields)

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
        found = _PLACEHOLDER.findall(rest)
        names = frozenset(text for text in found if "." not in text)
        fields = tuple(FieldRef.parse(text) for text in dict.fromkeys(found) if "." in text)
        q = rest.find("?")
        return cls(origin, rest, names, q if q >= 0 else len(rest), fields)

    def render(self, values: Mapping[str, object]) -> str:
        """Fill every placeholder with its percent-encoded value (keyed by the placeholder's
        text: `city`, `profile.city`)."""

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
