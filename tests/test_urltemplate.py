"""URL templates: a parameter value fills data inside its own segment and never moves the target."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, unquote

import httpx
import pytest

from aggregator import create_app
from aggregator.demo.process import DemoProcess
from aggregator.settings import Engine, Settings
from aggregator.urltemplate import UrlTemplate, format_value

TEMPLATE = "https://api.example.com:8443/v1/{city}/forecast?q={topic}&units=metric"

HOSTILE = [
    pytest.param("..", id="dot-dot"),
    pytest.param(".", id="dot"),
    pytest.param("../", id="dot-dot-slash"),
    pytest.param("../../admin", id="traversal"),
    pytest.param("%2F", id="encoded-slash"),
    pytest.param("%2E%2E", id="encoded-dot-dot"),
    pytest.param("a/b", id="slash"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("@evil.com", id="userinfo"),
    pytest.param("//evil.com/x", id="network-path"),
    pytest.param("#frag", id="fragment"),
    pytest.param("?x=1", id="query"),
    pytest.param("a&units=imperial", id="extra-query-param"),
    pytest.param("a=b;c", id="equals-semicolon"),
    pytest.param("a\r\nX-Injected: 1", id="crlf"),
    pytest.param(":8080", id="port"),
    pytest.param("a b+c", id="space-plus"),
    pytest.param("Zürich 東京 🙂", id="unicode"),
    pytest.param("%", id="percent"),
    pytest.param("{topic}", id="placeholder-syntax"),
]


def path_segments(url: httpx.URL) -> list[str]:
    """Raw (still encoded) path segments, so an encoded `/` does not split one."""
    raw_path = url.raw_path.decode("ascii").partition("?")[0]
    return raw_path.split("/")[1:]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_stays_in_its_segment(value: str) -> None:
    rendered = UrlTemplate.parse(TEMPLATE).render({"city": value, "topic": value})

    url = httpx.URL(rendered)
    assert (url.scheme, url.host, url.port) == ("https", "api.example.com", 8443)
    assert url.userinfo == b""
    assert url.fragment == ""
    segments = path_segments(url)
    assert len(segments) == 3
    assert segments[0] == "v1"
    assert segments[2] == "forecast"
    assert segments[1] not in (".", "..")
    assert unquote(segments[1]) == value
    assert list(url.params.keys()) == ["q", "units"]
    assert url.params["q"] == value
    assert url.params["units"] == "metric"
    assert not any(c in rendered for c in " \r\n\t\\")
    assert rendered.isascii()


DOTTED = "https://api.example.com:8443/v1/{profile.city}/forecast?q={profile.team.id}&units=metric"


def test_dotted_placeholders_name_fields_of_answers_not_parameters() -> None:
    template = UrlTemplate.parse(
        "http://h/v1/{profile.city}/{user_id}?team={profile.team.id}&x={my-src.0}&c={profile.city}"
    )

    assert template.names == {"user_id"}
    assert [(f.text, f.source, f.path) for f in template.fields] == [
        ("profile.city", "profile", ("city",)),
        ("profile.team.id", "profile", ("team", "id")),
        ("my-src.0", "my-src", ("0",)),
    ]
    assert template.sources == {"profile", "my-src"}
    # A hyphen is only part of a source name: `{x-y}` is no placeholder, as before.
    assert UrlTemplate.parse("http://h/{x-y}").names == frozenset()


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_value_of_a_field_stays_in_its_segment(value: str) -> None:
    rendered = UrlTemplate.parse(DOTTED).render({"profile.city": value, "profile.team.id": value})

    url = httpx.URL(rendered)
    assert (url.scheme, url.host, url.port) == ("https", "api.example.com", 8443)
    assert url.userinfo == b""
    assert url.fragment == ""
    segments = path_segments(url)
    assert segments[0] == "v1"
    assert segments[2] == "forecast"
    assert len(segments) == 3
    assert segments[1] not in (".", "..")
    assert unquote(segments[1]) == value
    assert list(url.params.keys()) == ["q", "units"]
    assert url.params["q"] == value
    assert url.params["units"] == "metric"
    assert not any(c in rendered for c in " \r\n\t\\")
    assert rendered.isascii()


@pytest.mark.parametrize("value", ["..", ".", "a.b", "..."])
def test_dots_are_encoded_in_the_path_but_not_the_query(value: str) -> None:
    rendered = UrlTemplate.parse(TEMPLATE).render({"city": value, "topic": value})

    assert f"/v1/{value.replace('.', '%2E')}/forecast" in rendered
    assert rendered.endswith(f"?q={value}&units=metric")


def test_placeholder_inside_a_segment() -> None:
    template = UrlTemplate.parse("http://h/files/pre-{name}.json?x={a}{b}")

    rendered = template.render({"name": "../etc/passwd", "a": "1&y=", "b": "2"})

    assert rendered == "http://h/files/pre-%2E%2E%2Fetc%2Fpasswd.json?x=1%26y%3D2"
    assert template.names == {"name", "a", "b"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(True, "true", id="true"),
        pytest.param(False, "false", id="false"),
        pytest.param(7, "7", id="int"),
        pytest.param(-2.5, "-2.5", id="float"),
        pytest.param("Paris", "Paris", id="str"),
    ],
)
def test_typed_values_render(value: object, expected: str) -> None:
    template = UrlTemplate.parse("http://h/x/{v}?flag={v}")

    assert format_value(value) == expected
    assert template.render({"v": value}) == (
        f"http://h/x/{expected.replace('.', '%2E')}?flag={expected}"
    )


def test_template_without_placeholders_is_unchanged() -> None:
    template = UrlTemplate.parse("http://127.0.0.1:8101/news?topic=general&delay=0.2")

    assert template.names == frozenset()
    assert template.render({}) == "http://127.0.0.1:8101/news?topic=general&delay=0.2"


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        pytest.param("http://{host}/x", "scheme or host", id="host"),
        pytest.param("http://api.{env}.example.com/x", "scheme or host", id="host-part"),
        pytest.param("http://h:{port}/x", "scheme or host", id="port"),
        pytest.param("http://{user}@h/x", "scheme or host", id="userinfo"),
        pytest.param("{scheme}://h/x", "http:// or https://", id="scheme"),
        pytest.param("ftp://h/x", "http:// or https://", id="ftp"),
        pytest.param("h/x", "http:// or https://", id="no-scheme"),
        pytest.param("http:/h/x", "http:// or https://", id="one-slash"),
        pytest.param("http:///x", "scheme or host", id="no-host"),
        pytest.param("http://h/x#{frag}", "#fragment", id="fragment"),
        pytest.param("http://h/x y", "whitespace", id="space"),
        pytest.param("http://h/x\r\nHost: evil", "whitespace", id="crlf"),
    ],
)
def test_parse_rejects(template: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        UrlTemplate.parse(template)


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["aiohttp", "httpx"])
@pytest.mark.parametrize(
    ("city", "topic"),
    [
        pytest.param("..", "..", id="dot-dot"),
        pytest.param(".", ".", id="dot"),
        pytest.param("../../_stats", "../_stats", id="traversal"),
        pytest.param("a/b", "a&delay=5", id="slash"),
        pytest.param("%2F..%2F", "%26x%3D1", id="pre-encoded"),
        pytest.param("@evil.com", "@evil.com", id="userinfo"),
        pytest.param("#frag", "#frag", id="fragment"),
        pytest.param("?x=1", "?x=1", id="query"),
        pytest.param(":8080", ":8080", id="port"),
        # The demo's router cannot match a path with a line break, so CR/LF goes in the query.
        pytest.param("crlf", "a\r\nX-Injected: 1", id="crlf"),
        pytest.param("Zürich 東京", "ça+va ✓", id="unicode"),
    ],
)
def test_hostile_values_reach_the_echo_upstream_intact(
    demo: DemoProcess,
    write_config: Callable[[str], Path],
    engine: Engine,
    city: str,
    topic: str,
) -> None:
    path = write_config(
        f"""
[upstreams.echo]
url = "{demo.url}/echo/{{city}}?q={{topic}}"
timeout = 5.0

[aggregates.echo]
path = "/api/echo"
sources = ["echo"]
params = {{ city = "str", topic = "str" }}
"""
    )
    client = create_app(Settings(config=path, engine=engine)).test_client()

    response = client.get("/api/echo", query_string={"city": city, "topic": topic})

    assert response.status_code == 200, response.json
    body = response.json
    assert body is not None
    assert body["sources"]["echo"]["status"] == "ok", body
    seen = body["data"]["echo"]
    assert seen["headers"]["host"] == f"{demo.host}:{demo.port}"
    assert "x-injected" not in seen["headers"]
    prefix, _, rest = seen["path"].partition("/echo/")
    assert prefix == ""
    assert "/" not in rest
    assert unquote(rest) == city
    assert parse_qs(seen["query"], keep_blank_values=True) == {"q": [topic]}
