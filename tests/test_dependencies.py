"""What the package imports is what pyproject.toml declares, and constraints.txt pins all of it.

The service's code may import only its runtime dependencies; the bench's code (aggregator/bench)
may also import the bench extra's. A runtime dependency nothing imports must say why it is there
(`UNIMPORTED`), so a bench-only package cannot drift back into the runtime list.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.paths import ROOT

PACKAGE = ROOT / "aggregator"
BENCH = PACKAGE / "bench"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = ROOT / "constraints.txt"

#: Runtime dependencies that no module imports, and why they are there anyway.
UNIMPORTED = {
    "sniffio": "httpcore imports it on every call; without it that import fails slowly",
    "uvloop": "hypercorn.toml's worker_class, loaded by Hypercorn",
}
#: Modules imported only for type checking that no distribution provides (typeshed's own).
TYPING_ONLY = {"_typeshed"}
#: The packages whose internals aggregator/upstream/engines.py patches or reads.
PATCHED = ("httpx", "httpcore", "aiohttp", "httpx-aiohttp")


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _names(requirements: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements}


def _top_level_imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.partition(".")[0]


def _imported_distributions(paths: list[Path]) -> dict[str, set[str]]:
    """Distribution name -> the files importing it, for every third-party import in `paths`."""
    distributions = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in paths:
        for module in _top_level_imports(path):
            if module in sys.stdlib_module_names or module == "aggregator":
                continue
            if module in TYPING_ONLY:
                continue
            where = str(path.relative_to(ROOT))
            names = distributions.get(module)
            assert names, f"{where} imports {module!r}, which no installed distribution provides"
            for name in names:
                found.setdefault(canonicalize_name(name), set()).add(where)
    return found


def _service_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if BENCH not in p.parents]


def test_the_service_imports_only_its_runtime_dependencies():
    declared = _names(_requirements())
    imported = _imported_distributions(_service_files())
    undeclared = {name: sorted(files) for name, files in imported.items() if name not in declared}
    assert undeclared == {}, "add these to [project] dependencies in pyproject.toml"


def test_the_bench_imports_only_runtime_and_bench_extra_dependencies():
    declared = _names(_requirements()) | _names(_requirements("bench"))
    imported = _imported_distributions(sorted(BENCH.rglob("*.py")))
    undeclared = {name: sorted(files) for name, files in imported.items() if name not in declared}
    assert undeclared == {}, "add these to the bench extra in pyproject.toml"


def test_every_runtime_dependency_is_imported_by_the_service_or_says_why():
    imported = set(_imported_distributions(_service_files()))
    unused = _names(_requirements()) - imported - set(UNIMPORTED)
    assert unused == set(), "bench-only? move it to the bench extra; else say why in UNIMPORTED"
    assert set(UNIMPORTED) <= _names(_requirements())


def test_what_engines_py_patches_has_an_upper_bound():
    by_name: dict[str, Requirement] = {canonicalize_name(r.name): r for r in _requirements()}
    for name in PATCHED:
        assert name in by_name, f"{name} is patched in engines.py and must be declared"
        bounds = [spec for spec in by_name[name].specifier if spec.operator in ("<", "<=", "==")]
        assert bounds, f"{name}: give an upper bound (engines.py relies on its internals)"


def _lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        line = line.partition("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt: {line!r} is not NAME==VERSION"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def _closure() -> set[str]:
    """Every distribution `.[test,bench]` needs on this platform, from the installed metadata."""
    environment = {key: str(value) for key, value in default_environment().items()}
    visited: set[tuple[str, str]] = set()
    todo = [(r, "") for r in [*_requirements(), *_requirements("bench"), *_requirements("test")]]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({**environment, "extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name == "aggregator":
            continue
        for wanted in ("", *sorted(requirement.extras)):
            if (name, wanted) not in visited:
                visited.add((name, wanted))
                todo += [
                    (Requirement(line), wanted) for line in importlib.metadata.requires(name) or []
                ]
    return {name for name, _ in visited}


def test_the_lock_pins_every_requirement_within_its_declared_bounds():
    pins = _lock()
    assert "aggregator" not in pins, "the project itself is not locked"
    declared = [*_requirements(), *_requirements("bench"), *_requirements("test")]
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        if name == "aggregator":
            continue
        assert name in pins, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_the_lock_covers_everything_installed_for_the_tests():
    """Regenerate with the command at the top of constraints.txt when this fails."""
    pins = _lock()
    unpinned = sorted(_closure() - set(pins))
    assert unpinned == [], "constraints.txt misses these (transitive) requirements"


def test_the_tests_run_with_the_locked_versions_of_what_engines_py_patches():
    """Its fixes were verified against these versions; .ci/run installs with the lock."""
    pins = _lock()
    for name in PATCHED:
        assert importlib.metadata.version(name) == pins[name], (
            f"{name} {importlib.metadata.version(name)} is installed, the lock says {pins[name]}: "
            "pip install -c constraints.txt -e '.[test]'"
        )


def test_ci_and_the_dockerfile_install_with_the_lock():
    assert re.search(
        r"pip install .*-c constraints\.txt .*'\.\[test\]'", (ROOT / ".ci/run").read_text()
    )
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.index("COPY pyproject.toml constraints.txt") < dockerfile.index(
        "-c constraints.txt"
    )


@pytest.mark.parametrize("command", ["bench", "soak"])
def test_the_bench_without_its_extra_refuses_in_one_line(command):
    # psutil hidden: find_spec answers None for it and importing it fails, as when not installed.
    code = (
        "import sys; sys.modules['psutil'] = None; "
        f"sys.argv = ['aggregator', {command!r}]; "
        "from aggregator.ops.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"aggregator {command} needs the bench extra (psutil not installed): "
        "pip install 'aggregator[bench]'"
    ]


def test_the_command_works_without_the_bench_extra():
    code = (
        "import sys; sys.modules['psutil'] = None; sys.modules['matplotlib'] = None; "
        "sys.argv = ['aggregator', '--help']; "
        "from aggregator.ops.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "bench" in done.stdout
