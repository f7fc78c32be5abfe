"""The package's layout, checked statically: imports point one way (ops -> app -> views -> core).

The core (engine, fill, fan-out, upstream, cache, merge, config…) never imports the views, the
serving layer, the operator commands, the sync twins, the bench or the demo, so it can become a
public API without dragging them along; the operator commands other than `serve` never build the
Flask app; and the app-wide state is reached through the engine's accessor, not string keys.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aggregator"

#: Top-level parts of `aggregator` that are not the core, and what may import each.
VIEWS = "aggregator.views"
SERVING = "aggregator.serving"
TWINS = "aggregator.twins"
BENCH = "aggregator.bench"
DEMO = "aggregator.demo"
OPS = "aggregator.ops"
APP = "aggregator.app"
EXTENSION = "aggregator.extension"  # the Flask extension composes the core and the views, as app
MAIN = "aggregator.__main__"  # `python -m aggregator`: an entry point, like asgi.py
NOT_CORE = (VIEWS, SERVING, TWINS, BENCH, DEMO, OPS, APP, EXTENSION, MAIN)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute (`from aggregator import x` counts as both)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
CORE = sorted(
    name
    for name in MODULES
    if name != "aggregator" and not any(_within(name, part) for part in NOT_CORE)
)


def _offending(
    modules: list[str], forbidden: tuple[str, ...], also: tuple[str, ...] = ()
) -> dict[str, list[str]]:
    """Per module, what it imports of the forbidden parts (or the exact names in `also`)."""
    found = {
        module: sorted(
            name
            for name in _imports(MODULES[module])
            if name in also or any(_within(name, part) for part in forbidden)
        )
        for module in modules
    }
    return {module: names for module, names in found.items() if names}


def test_the_layout_has_a_core_and_each_outer_part() -> None:
    assert {"aggregator.engine", "aggregator.aggregate", "aggregator.fanout"} <= set(CORE)
    for part in (VIEWS, SERVING, TWINS, BENCH, DEMO, OPS, APP, EXTENSION):
        assert any(_within(name, part) for name in MODULES), f"{part} is missing"


def test_the_core_imports_nothing_outside_it() -> None:
    builders = ("aggregator.create_app", "aggregator.create_asgi_app")
    assert _offending(CORE, NOT_CORE, builders) == {}


def test_views_import_neither_ops_nor_serving_nor_the_app() -> None:
    views = [m for m in MODULES if _within(m, VIEWS)]
    assert len(views) > 5
    assert _offending(views, (OPS, SERVING, APP, EXTENSION, TWINS, BENCH)) == {}


def test_nothing_but_the_entry_points_imports_the_operator_commands() -> None:
    assert _offending([m for m in MODULES if not _within(m, OPS) and m != MAIN], (OPS,)) == {}


def test_operator_commands_other_than_serve_never_build_the_app() -> None:
    commands = [m for m in MODULES if _within(m, OPS) and m != "aggregator.ops.serve"]
    assert len(commands) > 5
    builders = ("aggregator.create_app", "aggregator.create_asgi_app")
    found = _offending(commands, (APP, VIEWS, SERVING), builders)
    # `--app` (warm) loads the developer's own app, on request only: never ours.
    allowed = ["aggregator.serving.appref", "aggregator.serving.appref.wsgi_app"]
    assert found.pop("aggregator.ops.options", None) in (None, allowed)
    assert found == {}


def test_the_checks_see_imports_wherever_they_are(tmp_path: Path) -> None:
    # The checks are only as good as _imports: a lazy import inside a function counts.
    module = tmp_path / "lazy.py"
    module.write_text(
        "def f():\n    from aggregator import create_app\n    import aggregator.ops.cli\n"
    )
    assert {"aggregator.create_app", "aggregator.ops.cli"} <= _imports(module)


def test_app_state_is_read_through_the_engine_accessor_only() -> None:
    readers = sorted(
        name
        for name, path in MODULES.items()
        if 'extensions["aggregator' in path.read_text()
        or 'extensions.get("aggregator' in path.read_text()
    )
    assert readers == [], f"string keys into app.extensions outside the accessors: {readers}"


#: Run in a fresh interpreter (this one has Flask loaded by other tests): `aggregator status`
#: against a port where nothing listens, then the metrics listener serving a scrape.
_STATUS = """
import socket, sys
from aggregator.ops.cli import main
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
try:
    main(["status", "--url", f"http://127.0.0.1:{port}"])
except SystemExit as exc:
    print("exit", exc.code)
"""
_LISTENER = """
import socket, urllib.request
from aggregator.ops import metrics_server
from aggregator.settings import Settings
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
settings = Settings(metrics_bind=f"127.0.0.1:{port}")
with metrics_server.prepared(settings, workers=2) as shared:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        print("scraped", answer.status, shared is not None)
"""
_LOADED = "import sys; print(sorted(m for m in sys.modules if m in ('flask', 'aggregator.app')))"


@pytest.mark.parametrize(
    ("code", "says"),
    [(_STATUS, "exit 1"), (_LISTENER, "scraped 200 True")],
    ids=["status", "listener"],
)
def test_status_and_the_metrics_listener_load_no_flask(code: str, says: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", code + _LOADED], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [says, "[]"], out.stdout + out.stderr
