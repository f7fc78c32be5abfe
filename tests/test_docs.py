"""README and docs/ as a newcomer reads them: every relative link resolves (file and heading),
nothing links outside the repository, the README stays short, and its example answer is the
answer the demo gives (its shape and the strings it quotes)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from aggregator import create_app
from aggregator.demo.process import DemoProcess
from aggregator.settings import Settings
from tests.support.paths import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def _links(page: Path) -> list[str]:
    return _LINK.findall(_FENCE.sub("", page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z]+:", link):  # http(s)://, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.is_relative_to(ROOT):
            broken.append(f"{link}: outside the repository")
        elif not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {path.name}")
    assert broken == []


def test_the_readme_is_short_and_names_no_file_outside_the_clone() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for page in PAGES:
        assert "../shared" not in page.read_text(), page


def _readme_answer() -> dict[str, Any]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Example answer\s+```json\n(.*?)\n```", text, re.S)
    assert block, "README has no example answer"
    answer: dict[str, Any] = json.loads(block.group(1))
    return answer


@pytest.mark.integration
def test_the_readme_example_answer_is_what_the_demo_answers(
    demo: DemoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGGREGATOR_DEMO_URL", demo.url)
    app = create_app(Settings(metrics="off"))
    shown = _readme_answer()

    r = app.test_client().get("/api/dashboard?city=Paris&user_id=7&reco_delay=2")
    real = r.get_json()

    assert r.status_code == 200
    assert list(real) == list(shown)
    assert real["complete"] is shown["complete"] is False
    assert real["errors"] == shown["errors"]  # the kind and the detail it quotes
    assert list(real["sources"]) == list(shown["sources"])
    for name, info in shown["sources"].items():
        assert set(real["sources"][name]) == set(info), name
        assert real["sources"][name]["status"] == info["status"], name
    assert set(real["data"]) == set(shown["data"])
    assert real["data"]["profile"] == shown["data"]["profile"]
    assert set(real["data"]["weather"]) == set(shown["data"]["weather"])
    assert real["data"]["weather"]["city"] == "Paris"
