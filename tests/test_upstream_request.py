"""The request of an upstream call built without httpx's client machinery (upstream/request.py).

The URL of a call is slotted into its template's parsed origin instead of parsed again: these
check, for templates and values of every awkward kind, that the result is exactly what httpx's
own parser makes of the rendered string, and that templates the shortcut cannot serve safely
(dot segments, literal characters httpx encodes) are parsed as before.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.upstream import request as upstream_request
from aggregator.upstream.request import build_request, send, upstream_url
from aggregator.urltemplate import UrlTemplate

#: Literal pieces of templates: plain, reserved, dots, escapes, a lone `%`, non-ASCII.
PIECES = "/ a b-c . .. /./ % %41 ~ @ : ; = & + [ ] ! $ ' ( * , é | ^ ` { }".split()
VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", ".", "..", "%", "%2E", "a/b", "?", "#", "é", " ", "\x7f"]),
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False),
)


def _parsed(url: httpx.URL) -> object:
    return url._uri_reference


@st.composite
def templates(draw: st.DrawFn) -> str:
    origin = draw(
        st.sampled_from(
            [
                "http://127.0.0.1:8001",
                "https://example.com",
                "http://user:pw@h.example:80",
                "http://[::1]:9000",
                "HTTP://Example.COM",
            ]
        )
    )
    parts: list[str] = ["/"]
    for _ in range(draw(st.integers(0, 6))):
        parts.append(draw(st.sampled_from([*PIECES, "{a}", "{b}", "{p.x}"])))
    if draw(st.booleans()):
        parts.append("?")
        for _ in range(draw(st.integers(0, 4))):
            parts.append(draw(st.sampled_from([*PIECES, "?", "{a}", "{b}", "q={a}"])))
    return origin + "".join(parts)


@settings(max_examples=600, deadline=None)
@given(templates(), VALUES, VALUES, VALUES)
def test_a_slotted_url_is_what_httpx_parses(text: str, a: object, b: object, x: object) -> None:
    try:
        template = UrlTemplate.parse(text)
    except ValueError:
        return  # refused when the config loads: never rendered
    rendered = template.render({"a": a, "b": b, "p.x": x})
    try:
        expected = httpx.URL(rendered)
    except httpx.InvalidURL:
        with pytest.raises(httpx.InvalidURL):
            upstream_url(template, rendered)
        return
    got = upstream_url(template, rendered)
    assert _parsed(got) == _parsed(expected)
    assert str(got) == str(expected) and got.raw_path == expected.raw_path


@pytest.mark.parametrize(
    "text",
    [
        "http://127.0.0.1:8001/weather/{city}",
        "https://api.example.com/v1/users/{user_id}/quotes?limit=10&user={user_id}",
        "http://h.example/news",
        "http://h.example?q={city}",
        "http://h.example/profile/{profile.city}.json",
    ],
)
def test_ordinary_templates_take_the_shortcut(text: str) -> None:
    assert upstream_request._origin(UrlTemplate.parse(text)) is not None


@pytest.mark.parametrize(
    ("text", "values", "path"),
    [
        # an empty value would make a dot segment, which httpx removes
        ("http://h.example/a/.{a}/b", {"a": ""}, "/a/b"),
        ("http://h.example/a/{a}./b", {"a": ""}, "/a/b"),
        # literal characters httpx percent-encodes itself
        ("http://h.example/caf\u00e9/{a}", {"a": "x"}, "/caf\u00e9/x"),
        ("http://h.example/a`b/{a}", {"a": "x"}, "/a`b/x"),
        ("http://h.example/./{a}", {"a": "x"}, "/x"),
    ],
)
def test_templates_the_shortcut_cannot_serve_are_parsed_as_before(
    text: str, values: dict[str, object], path: str
) -> None:
    template = UrlTemplate.parse(text)
    assert upstream_request._origin(template) is None
    url = upstream_url(template, template.render(values))
    assert url.path == path and _parsed(url) == _parsed(httpx.URL(template.render(values)))


def test_a_url_past_httpxs_length_limit_is_refused_as_httpx_refuses_it() -> None:
    template = UrlTemplate.parse("http://h.example/q?v={a}")
    with pytest.raises(httpx.InvalidURL):
        upstream_url(template, template.render({"a": "x" * 70_000}))


def test_the_request_carries_the_clients_defaults_under_its_own_headers() -> None:
    client = httpx.AsyncClient(headers={"Accept-Encoding": "gzip", "X-Default": "1"})
    url = httpx.URL("http://h.example/a")
    timeout = httpx.Timeout(3.0, connect=1.0)
    request = build_request(
        client, "POST", url, {"x-default": "2", "X-Request-ID": "r1"}, timeout, b"{}"
    )
    assert request.headers["accept-encoding"] == "gzip"
    assert request.headers.get_list("x-default") == ["2"]
    assert request.headers["x-request-id"] == "r1"
    assert request.headers["content-length"] == "2" and request.headers["host"] == "h.example"
    assert request.extensions["timeout"] == {"connect": 1.0, "read": 3.0, "write": 3.0, "pool": 3.0}
    assert request.url == url and request.content == b"{}"


async def test_send_uses_the_clients_transport_and_binds_the_request() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"path": request.url.path})

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    request = httpx.Request("GET", "http://h.example/here")
    response = await send(client, request)
    await response.aread()
    assert response.request is request and response.json() == {"path": "/here"}
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await send(client, request)
