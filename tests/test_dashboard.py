"""The live dashboard page at `/`: served self-contained under a strict CSP, and working in a real
headless Chromium against real Hypercorn and the demo upstreams."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask.testing import FlaskClient

from aggregator import create_app
from aggregator.demo.process import DemoProcess, start_demo_process
from aggregator.settings import Settings
from tests.support.chromium import find_chromium, open_page
from tests.support.paths import ROOT
from tests.support.servers import Server

#: Any absolute or scheme-relative URL: the page must load and call nothing outside its origin.
EXTERNAL_URL = re.compile(r"(?:[a-z][a-z0-9+.-]*:)?//[A-Za-z0-9\[]", re.I)
#: An XML namespace name (an identifier, never fetched), allowed in the SVG icon only.
SVG_NAMESPACE = 'xmlns="http://www.w3.org/2000/svg"'
DEMO_SOURCES = ["weather", "stocks", "news", "profile", "recommendations"]
ERROR_RED = "rgb(207, 34, 46)"  # --error in dashboard.css
OK_GREEN = "rgb(26, 127, 55)"  # --ok


class _Page(HTMLParser):
    """Every tag with its attributes, and the text of each <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._script: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None


def parse_page(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def test_the_page_is_served_under_a_strict_content_security_policy(client: FlaskClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    csp = {
        part.split()[0]: part.split()[1:]
        for part in r.headers["Content-Security-Policy"].split(";")
        if part.strip()
    }
    assert csp["default-src"] == ["'none'"]
    for directive in ("script-src", "style-src", "connect-src", "img-src"):
        assert csp[directive] == ["'self'"], directive  # no 'unsafe-inline', no hosts
    assert csp["frame-ancestors"] == ["'none'"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"

    page = parse_page(r.get_data(as_text=True))
    for tag, attrs in page.tags:
        # Inline handlers and style attributes are what such a CSP blocks: none are used.
        assert not [a for a in attrs if a.startswith("on") or a == "style"], (tag, attrs)
    executable = [attrs for attrs, _ in page.scripts if attrs.get("type") != "application/json"]
    assert executable == [{"src": "/static/dashboard.js", "defer": None}]
    assert all(not text.strip() for attrs, text in page.scripts if "src" in attrs)


def test_the_page_carries_the_aggregates_in_a_data_block(client: FlaskClient) -> None:
    page = parse_page(client.get("/").get_data(as_text=True))
    (block,) = [text for attrs, text in page.scripts if attrs.get("type") == "application/json"]
    meta = json.loads(block)
    assert meta["root"] == ""
    (five,) = meta["aggregates"]
    assert five["name"] == "five" and five["path"] == "/api/five"
    assert five["sources"] == DEMO_SOURCES and five["required"] == ["profile"]
    assert list(five["params"]) == ["city", "user_id"]  # config order, not sorted
    assert five["params"]["user_id"] == {"type": "int", "default": None, "required": True}


def test_the_page_and_its_assets_reference_nothing_outside_the_origin(
    client: FlaskClient,
) -> None:
    html = client.get("/").get_data(as_text=True)
    assert not EXTERNAL_URL.search(html), EXTERNAL_URL.search(html)
    links = [
        value
        for _, attrs in parse_page(html).tags
        for name, value in attrs.items()
        if name in ("src", "href") and value
    ]
    assets = [link for link in links if link.startswith("/static/")]
    assert sorted(assets) == [
        "/static/dashboard.css",
        "/static/dashboard.js",
        "/static/favicon.svg",
    ]
    assert set(links) - set(assets) == {"/docs", "/openapi.json", "/status"}
    for asset in assets:
        with client.get(asset) as r:
            assert r.status_code == 200, asset
            text = r.get_data(as_text=True)
        if asset.endswith(".svg"):
            assert text.count(SVG_NAMESPACE) == 1
            text = text.replace(SVG_NAMESPACE, "")
        assert not EXTERNAL_URL.search(text), (asset, EXTERNAL_URL.search(text))
        assert "@import" not in text and "url(" not in text, asset
    with client.get("/static/dashboard.js") as r:
        script = r.get_data(as_text=True)
    # Every request the script makes goes to this origin: the aggregates and /status.
    assert re.findall(r"\bfetch\(([^,]+),", script) == ["url"]  # in getJson only
    assert re.findall(r"new EventSource\(([^)]+)\)", script) == ["url"]  # the same address
    assert re.findall(r"await getJson\(([^,]+),", script) == ["url", "`${meta.root}/status`"]
    assert "const url = `${meta.root}${agg.path}" in script
    assert "innerHTML" not in script  # response text is never parsed as HTML


def test_the_page_is_404_when_the_dashboard_is_off(config_path: Path) -> None:
    client = create_app(Settings(config=config_path, dashboard=False)).test_client()
    for path in ("/", "/static/dashboard.js"):
        r = client.get(path)
        assert r.status_code == 404 and r.get_json()["error"] == "Not Found", path


@pytest.mark.parametrize(
    ("value", "enabled"), [("off", False), ("on", True), ("0", False), ("true", True)]
)
def test_the_setting_reads_on_and_off(
    monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool
) -> None:
    monkeypatch.setenv("AGGREGATOR_DASHBOARD", value)
    assert Settings().dashboard is enabled


# -- in a real browser -----------------------------------------------------------------------

ROWS_JS = """
Array.from(document.querySelectorAll("#rows tr")).map((tr) => ({
  name: tr.dataset.source,
  state: tr.dataset.state,
  status: tr.dataset.status,
  badge: getComputedStyle(tr.querySelector(".status .badge")).backgroundColor,
  latency: tr.querySelector(".latency .ms").textContent,
  bar: tr.querySelector(".latency .fill").getBoundingClientRect().width,
  cache: tr.querySelector(".cache").textContent,
  circuit: tr.querySelector(".circuit").textContent,
}))
"""
SUMMARY_JS = """
Object.fromEntries(Array.from(document.querySelectorAll("#summary .chip")).map(
  (c) => [c.querySelector(".label").textContent, c.querySelector(".value").textContent]))
"""


@pytest.fixture
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip(
            "no chromium browser found: install Debian's `chromium` package (`.ci/run` does "
            "when it runs as root with apt-get), or set CHROMIUM to a Chrome/Chromium binary"
        )
    return found


@pytest.mark.integration
@pytest.mark.timeout(150)
async def test_the_page_shows_every_source_and_a_failing_one_in_red(
    chromium: str, serve: Callable[..., Server], demo: DemoProcess, tmp_path: Path
) -> None:
    server = serve(None, demo_url=demo.url)  # the bundled demo config, as `aggregator serve`
    # reco_delay=2 keeps the optional recommendations source past its 0.8 s timeout.
    url = f"{server.url}/?aggregate=dashboard&city=Paris&user_id=7&reco_delay=2&refresh=1"

    async with open_page(chromium, tmp_path) as page:
        await page.navigate(url)
        await page.wait_for(
            "Number(document.body.dataset.refreshes) >= 1 && "
            "document.querySelectorAll('#rows tr').length === 5",
            timeout=30,
        )
        rows: list[dict[str, Any]] = await page.evaluate(ROWS_JS)
        summary: dict[str, str] = await page.evaluate(SUMMARY_JS)
        answer = json.loads(await page.evaluate("document.getElementById('answer').textContent"))
        shot = await page.screenshot(tmp_path / "dashboard.png")
        first_problems = page.problems()
        via = await page.evaluate("document.body.dataset.via")

        assert [row["name"] for row in rows] == DEMO_SOURCES
        by_name = {row["name"]: row for row in rows}
        failed = by_name.pop("recommendations")
        assert (failed["state"], failed["status"]) == ("error", "timeout")
        assert failed["badge"] == ERROR_RED  # the stylesheet loaded and drew it red
        for row in [failed, *by_name.values()]:
            assert re.fullmatch(r"\d+\.\d ms|\d\.\d\d s", row["latency"]), row
            assert row["bar"] > 0, row
            assert row["cache"].startswith("MISS"), row  # partial answers are not cached
            assert row["circuit"].startswith("closed"), row
        assert failed["circuit"] == "closed 1/5 failures"
        for row in by_name.values():
            assert (row["state"], row["status"], row["badge"]) == ("ok", "ok", OK_GREEN), row
            assert re.search(r"source (hit|miss|not looked up)$", row["cache"]), row
        # The bar is scaled from Server-Timing: the 0.8 s timeout dwarfs the 50 ms profile.
        assert failed["bar"] > by_name["profile"]["bar"]
        assert summary["HTTP"] == "200" and summary["answer"] == "partial"
        assert summary["X-Cache"] == "MISS" and summary["worker"].isdigit()
        assert summary["total"].endswith(("ms", "s")) and summary["cache"].endswith("miss")
        assert answer["complete"] is False
        assert answer["errors"]["recommendations"]["kind"] == "timeout"
        assert set(answer["data"]) == set(DEMO_SOURCES) - {"recommendations"}
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"
        assert first_problems == [], first_problems
        assert via == "stream"  # Server-Sent Events, rendered on `done` as a JSON answer is

        # It keeps refreshing; after breaker_failures (5) timeouts this worker's breaker opens
        # and the page says so, the source now refused at once.
        await page.wait_for(
            "Array.from(document.querySelectorAll('#rows tr')).some((tr) => "
            "tr.dataset.source === 'recommendations' && "
            "tr.dataset.status === 'circuit_open' && "
            "tr.querySelector('.circuit').textContent.startsWith('open'))",
            timeout=60,
        )
        assert await page.evaluate("Number(document.body.dataset.refreshes)") >= 6
        later = {row["name"]: row for row in await page.evaluate(ROWS_JS)}
        # Weather says max-age=60: by now its payload comes from the source cache; stocks
        # sends no Cache-Control, so its cache is never consulted.
        assert later["weather"]["cache"] == "MISS source hit"
        assert later["stocks"]["cache"] == "MISS source not looked up"
        assert later["recommendations"]["circuit"].startswith("open")
        assert page.problems() == []

        # A bad parameter: the server's 400 names the field, the page marks it and carries on.
        bad = f"{server.url}/?aggregate=dashboard&city=Paris&user_id=seven&auto=off"
        await page.navigate(bad)
        await page.wait_for("Number(document.body.dataset.refreshes) >= 1", timeout=20)
        banner = await page.evaluate("document.getElementById('banner').textContent")
        invalid = await page.evaluate(
            "document.querySelector('[data-param=user_id]').getAttribute('aria-invalid')"
        )
        assert "400" in banner and "user_id: must be an integer" in banner
        assert invalid == "true"
        # Chrome logs the 400 itself as a failed resource; nothing else may have gone wrong.
        assert page.problems(ignore_network=True) == []

    if os.environ.get("UPDATE_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")


def two_aggregates_config(demo_url: str) -> str:
    """A required bool, a parameter named like a page control, and a source on its fallback."""
    return f"""
[upstreams.echo]
url = "{demo_url}/echo/second?flag={{flag}}&refresh={{refresh}}"

[upstreams.echo_on]
url = "{demo_url}/echo/first?on={{on}}"

[upstreams.broken]
url = "{demo_url}/echo/broken?status=503"
retries = 0
fallback = {{ note = "static" }}

[aggregates.first]
path = "/api/first"
sources = ["echo_on"]
params = {{ on = "bool" }}

[aggregates.second]
path = "/api/second"
sources = ["echo", "broken"]
params = {{ flag = "bool", refresh = {{ type = "int", default = 3 }} }}
"""


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_the_form_follows_each_aggregates_parameters(
    chromium: str,
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    server = serve(write_config(two_aggregates_config(demo.url)))
    # `refresh` is a page control and this aggregate's parameter: the page writes it `param:`.
    url = f"{server.url}/?aggregate=second&flag=yes&param%3Arefresh=9&auto=off"

    async with open_page(chromium, tmp_path) as page:
        await page.navigate(url)
        # Rows are painted as sources land; the whole answer is drawn once it is done.
        await page.wait_for(
            "Number(document.body.dataset.refreshes) >= 1 && "
            "document.querySelectorAll('#rows tr').length === 2",
            timeout=20,
        )
        rows = {row["name"]: row for row in await page.evaluate(ROWS_JS)}
        answer = json.loads(await page.evaluate("document.getElementById('answer').textContent"))
        kept = await page.evaluate("Object.fromEntries(new URLSearchParams(location.search))")

        assert answer["data"]["echo"]["query"] == "flag=true&refresh=9"
        assert (rows["echo"]["state"], rows["echo"]["status"]) == ("ok", "ok")
        broken = rows["broken"]
        assert (broken["state"], broken["status"]) == ("fallback", "http_status")
        assert broken["badge"] == "rgb(154, 103, 0)"  # --warn: amber, not red
        assert answer["data"]["broken"] == {"note": "static"}
        assert kept == {
            "aggregate": "second",
            "flag": "true",  # `yes` in the link: the form's spelling from now on
            "param:refresh": "9",
            "refresh": "5",
            "auto": "off",
        }

        # Another aggregate: its own form; a required bool starts unset, so nothing is fetched
        # until it is chosen.
        await page.evaluate(
            "const s = document.getElementById('aggregate'); s.value = 'first';"
            "s.dispatchEvent(new Event('change'))"
        )
        choices = await page.evaluate(
            "Array.from(document.querySelectorAll('#params select option')).map(o => o.text)"
        )
        banner = await page.evaluate("document.getElementById('banner').textContent")
        assert choices == ["choose", "true", "false"]
        assert "Fill in on" in banner
        await page.evaluate(
            "document.querySelector('[data-param=on]').value = 'false';"
            "document.getElementById('query').requestSubmit()"
        )
        await page.wait_for(
            "document.querySelectorAll('#rows tr').length === 1 && "
            "document.getElementById('answer').textContent.includes('on=false')",
            timeout=20,
        )
        assert await page.evaluate("document.getElementById('banner').hidden") is True
        assert page.problems() == []


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_a_dependent_sources_bar_starts_where_what_it_needs_ended(
    chromium: str,
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    server = serve(
        write_config(
            f"""
[upstreams.profile]
url = "{demo.url}/profile/{{user_id}}?delay=0.2"

[upstreams.weather]
url = "{demo.url}/weather/{{profile.city}}?delay=0.1"

[upstreams.news]
url = "{demo.url}/news?delay=0.1"

[aggregates.home]
path = "/api/home"
sources = ["profile", "weather", "news"]
params = {{ user_id = "int" }}
"""
        )
    )

    async with open_page(chromium, tmp_path) as page:
        await page.navigate(f"{server.url}/?aggregate=home&user_id=7&auto=off")
        # Rows are painted as sources land; the whole answer is drawn once it is done.
        await page.wait_for(
            "Number(document.body.dataset.refreshes) >= 1 && "
            "document.querySelectorAll('#rows tr').length === 3",
            timeout=20,
        )
        bars: dict[str, dict[str, float]] = await page.evaluate(
            """Object.fromEntries(Array.from(document.querySelectorAll("#rows tr")).map((tr) => {
              const bar = tr.querySelector(".latency .bar").getBoundingClientRect();
              const fill = tr.querySelector(".latency .fill").getBoundingClientRect();
              return [tr.dataset.source, {left: fill.left - bar.left, right: fill.right - bar.left,
                                          width: bar.width}];
            }))"""
        )

        profile, weather, news = bars["profile"], bars["weather"], bars["news"]
        assert profile["left"] < 0.05 * profile["width"] and news["left"] < 0.05 * news["width"]
        # weather waited for profile's answer: its bar starts where profile's ends, never
        # before it; after it by the loop's delay in starting the call, which a busy machine
        # stretched to 18 ms (5% of the scale) in one CI run, so the bound is 15% of the scale.
        width = weather["width"]
        assert profile["right"] - 0.02 * width <= weather["left"], bars
        assert weather["left"] <= profile["right"] + 0.15 * width, bars
        assert weather["right"] > profile["right"] and page.problems() == []


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_a_stale_answer_shows_how_old_it_is_and_why(
    chromium: str,
    serve: Callable[..., Server],
    write_config: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    # The source lives in a demo of its own, stopped once the answer is cached: every refresh
    # after cache_ttl then fails, and stale-if-error serves the last good answer instead.
    with start_demo_process(latency=0.0) as own:
        config = write_config(
            f"""
[upstreams.only]
url = "{own.url}/profile/{{user_id}}"
retries = 0

[aggregates.board]
path = "/api/board"
sources = ["only"]
params = {{ user_id = "int" }}
cache_ttl = 1
stale_if_error_ttl = 600
"""
        )
        server = serve(config)
        first = await asyncio.to_thread(
            httpx.get, f"{server.url}/api/board?user_id=7", trust_env=False
        )
        assert first.headers["X-Cache"] == "MISS"
    # `own` is stopped: the upstream is gone.

    async with open_page(chromium, tmp_path) as page:
        await page.navigate(f"{server.url}/?aggregate=board&user_id=7&refresh=1")
        await page.wait_for(
            "document.querySelector('#banner') && "
            "document.getElementById('banner').textContent.includes('refresh failed')",
            timeout=30,
        )
        banner = await page.evaluate("document.getElementById('banner').textContent")
        summary: dict[str, str] = await page.evaluate(SUMMARY_JS)

    assert re.fullmatch(
        r'stale answer, \d+ s old: its refresh failed \(status=502; failed="only"\)', banner
    ), banner
    assert re.fullmatch(r"\d+ s, refresh failed", summary["stale"]), summary
    assert summary["X-Cache"] == "STALE" and summary["HTTP"] == "200"


def pair_config(demo_url: str) -> str:
    """A fast source and one that takes 1.5 s: the page should not wait for it to paint."""
    return f"""
[upstreams.fast]
url = "{demo_url}/profile/{{user_id}}?delay=0.05"

[upstreams.slow]
url = "{demo_url}/weather/{{city}}?delay=1.5"
timeout = 3.0

[aggregates.pair]
path = "/api/pair"
sources = ["slow", "fast"]
deadline = 4
params = {{ city = "str", user_id = "int" }}
"""


LANDED_JS = """
Object.fromEntries(Array.from(document.querySelectorAll("#rows tr")).map(
  (tr) => [tr.dataset.source, tr.dataset.state]))
"""


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_the_page_paints_each_source_as_it_lands(
    chromium: str,
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    server = serve(write_config(pair_config(demo.url)))

    async with open_page(chromium, tmp_path) as page:
        await page.navigate(f"{server.url}/?aggregate=pair&city=Paris&user_id=7&auto=off")
        # The fast row is drawn while the slow source is still out (it takes 1.5 s).
        early = await page.wait_for(
            f"(() => {{ const rows = {LANDED_JS}; "
            "return rows.fast === 'ok' && rows.slow === 'pending' && rows; })()",
            timeout=10,
        )
        await page.wait_for("Number(document.body.dataset.refreshes) >= 1", timeout=20)
        final = await page.evaluate(LANDED_JS)
        via = await page.evaluate("document.body.dataset.via")

        assert early == {"slow": "pending", "fast": "ok"}
        assert final == {"slow": "ok", "fast": "ok"} and via == "stream"
        assert page.problems() == []


#: Installed before the page's own script: an EventSource that fails at once, or (with
#: `es=silent` in the page's address) one that never says anything, as behind a proxy that
#: holds the stream.
BROKEN_EVENT_SOURCE = """
window.EventSource = class extends EventTarget {
  static CLOSED = 2;
  constructor(url) {
    super();
    this.url = url;
    this.readyState = 0;
    window.__eventSources = (window.__eventSources || 0) + 1;
    if (!location.search.includes("es=silent")) {
      setTimeout(() => this.dispatchEvent(new Event("error")), 10);
    }
  }
  close() { this.readyState = 2; }
};
"""


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["fails", "silent"])
async def test_the_page_falls_back_to_the_json_answer_when_the_stream_does_not_work(
    chromium: str,
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
    tmp_path: Path,
    mode: str,
) -> None:
    server = serve(write_config(pair_config(demo.url)))

    async with open_page(chromium, tmp_path) as page:
        await page.send("Page.addScriptToEvaluateOnNewDocument", source=BROKEN_EVENT_SOURCE)
        silent = "&es=silent" if mode == "silent" else ""
        await page.navigate(f"{server.url}/?aggregate=pair&city=Oslo&user_id=3&refresh=1{silent}")
        await page.wait_for("Number(document.body.dataset.refreshes) >= 3", timeout=40)
        rows = await page.evaluate(LANDED_JS)
        via = await page.evaluate("document.body.dataset.via")
        tried = await page.evaluate("window.__eventSources")

        assert rows == {"slow": "ok", "fast": "ok"} and via == "json"
        assert tried == 2  # after two failures in a row it stops trying to stream
        assert page.problems() == []
