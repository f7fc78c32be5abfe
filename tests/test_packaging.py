"""What ships besides the package: Dockerfile and hypercorn.toml stay what the README promises."""

from __future__ import annotations

import json
import re
import tomllib

from hypercorn.config import Config

from tests.support.paths import ROOT


def test_hypercorn_toml_holds_only_real_config_keys():
    data = tomllib.loads((ROOT / "hypercorn.toml").read_text())
    assert data, "hypercorn.toml is empty"
    unknown = [key for key in data if not hasattr(Config(), key)]
    assert unknown == []  # hypercorn ignores unknown keys silently


def test_dockerfile_is_slim_pinned_non_root_with_healthcheck_and_exec_cmd():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1))
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd, "CMD must use the exec form so signals reach hypercorn"
    argv = json.loads(cmd.group(1))
    assert argv[:3] == ["hypercorn", "--config", "hypercorn.toml"] and argv[-1] == "asgi:app"
    # dependency metadata is copied (and installed) before the source, for layer caching
    assert text.index("COPY pyproject.toml") < text.index("COPY aggregator")


def test_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e . && .venv/bin/aggregator serve" in readme
    assert "bash .ci/run" in readme
    assert "-m pytest" in (ROOT / ".ci" / "run").read_text()
