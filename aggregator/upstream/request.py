"""One upstream call's request, built from what is fixed per source, sent straight to the engine.

httpx's `AsyncClient.stream` parses the URL string again, merges every client default, runs an
auth flow, event hooks, its redirect bookkeeping and a cookie jar for each call. We use none of
those per call: redirects are `checks.Redirects`' job, OAuth2 is ours (`oauth`), the jar is off
(`engines._NoCookies`), no hooks or mounts are set. So a call builds its `httpx.Request` here and
hands it to the client's transport (the engine) itself, which is the public transport API; the
Request and Response are httpx's own, so everything downstream reads them as before.

The URL is not parsed per call when it need not be: `aggregator.urltemplate` percent-encodes
every value with nothing left safe (and dots in the path), so a rendered URL differs from its
template only by characters httpx's parser leaves as they are. Its origin (scheme, host, port)
is parsed once per template and the rendered path and query are slotted in. That is checked,
once per template, against httpx's own parse of the template filled with sample values; a
template it does not match (a literal `é` or `/./`, an empty value that would make a dot
segment, a future httpx) is parsed per call as before.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import httpx

from aggregator.urltemplate import UrlTemplate

#: httpx's own limit (`httpx._urlparse.MAX_URL_LENGTH`): a longer URL goes to its parser to be
#: refused there, exactly as before.
_MAX_URL_LENGTH = 65_536
#: Values a template is checked with: a plain one, an empty one, an encoded one.
_SAMPLES = ("x", "", "%2E")


def upstream_url(template: UrlTemplate, rendered: str) -> httpx.URL:
    """`httpx.URL(rendered)` for a URL `template.render` produced, without parsing it again
    when the template allows (see the module docstring)."""
    origin = _origin(template)
    if origin is None or len(rendered) > _MAX_URL_LENGTH:
        return httpx.URL(rendered)
    return _slotted(origin, rendered[len(template.origin) :])


def build_request(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    headers: Mapping[str, str],
    timeout: httpx.Timeout,
    content: bytes | None = None,
) -> httpx.Request:
    """What `client.build_request` would build for this call (the client's default headers
    under the call's own), minus the parts we never use: cookies, params, a base URL."""
    merged = httpx.Headers(client.headers)
    merged.update(headers)
    return httpx.Request(
        method, url, headers=merged, content=content, extensions={"timeout": timeout.as_dict()}
    )


async def send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """Send `request` on the client's transport; the caller reads the body, then `aclose`s it."""
    if client.is_closed:
        raise RuntimeError("Cannot send a request, as the client has been closed.")
    response = await client._transport_for_url(request.url).handle_async_request(request)
    response.request = request
    return response


@functools.lru_cache(maxsize=1024)
def _origin(template: UrlTemplate) -> httpx.URL | None:
    """The template's parsed origin, if slotting values into it gives what httpx would parse."""
    try:
        origin = httpx.URL(template.origin)
        for sample in _SAMPLES:
            rendered = template.render(
                dict.fromkeys([*template.names, *(ref.text for ref in template.fields)], sample)
            )
            slotted = _slotted(origin, rendered[len(template.origin) :])
            if slotted._uri_reference != httpx.URL(rendered)._uri_reference:
                return None
    except (AttributeError, TypeError, ValueError, httpx.InvalidURL):
        return None  # an httpx without the parts used here, or a URL its parser refuses
    return origin


def _slotted(origin: httpx.URL, rest: str) -> httpx.URL:
    """`origin` with `rest` (`/path?query`, already encoded) as its path and query."""
    path, mark, query = rest.partition("?")
    url = httpx.URL.__new__(httpx.URL)
    url._uri_reference = origin._uri_reference._replace(path=path, query=query if mark else None)
    return url
