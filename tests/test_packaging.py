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
    assert cmd, "CMD must use the exec form so signals reach the server"
    argv = json.loads(cmd.group(1))
    # `aggregator serve`, not `hypercorn asgi:app`: with no config it starts the demo upstreams
    # (tests/test_container.py runs it), with hypercorn.toml's server settings.
    assert argv[:2] == ["aggregator", "serve"]
    assert argv[argv.index("--hypercorn-config") + 1] == "hypercorn.toml"
    assert argv[argv.index("--bind") + 1] == "0.0.0.0:8000"
    # dependency metadata is copied (and installed) before the source, for layer caching
    assert text.index("COPY pyproject.toml") < text.index("COPY aggregator")


def test_the_build_context_is_only_what_the_dockerfile_copies():
    """No .venv, .git, caches or build output in the context: .dockerignore is an allowlist."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "ignore everything first, then allow what is copied"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    text = (ROOT / "Dockerfile").read_text()
    copied = {name for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for name in line.split()}
    assert copied == allowed
    for generated in ("**/__pycache__", "**/*.egg-info"):
        assert generated in rules


def test_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e . && .venv/bin/aggregator serve" in readme
    assert "bash .ci/run" in readme
    assert "-m pytest" in (ROOT / ".ci" / "run").read_text()


def test_the_packaged_hypercorn_settings_are_hypercorn_toml():
    # `serve` and `check-config` apply the packaged ones from any directory; the file is for
    # `hypercorn --config hypercorn.toml asgi:app`. The two must not drift apart.
    from aggregator.ops.hypercorn_defaults import HYPERCORN_DEFAULTS

    assert tomllib.loads((ROOT / "hypercorn.toml").read_text()) == HYPERCORN_DEFAULTS
