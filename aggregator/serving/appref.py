"""`--app MODULE:NAME`: a developer's own app named on a command line, imported, checked, wrapped.

`aggregator serve --app` and `aggregator bench --app` name the app the way Hypercorn, gunicorn
and `flask --app` do: `MODULE:NAME` (a Flask app, or an `ASGIAdapter` already made by
`to_asgi`), `MODULE:FACTORY()` (called without arguments) or `MODULE` alone (its `app`). The
module is imported with the current directory on `sys.path`, as those tools do. Whatever is
wrong (no such module, an import that fails, no such attribute, a factory that raises, an
object that is not a Flask app) is one `AppRefError` whose message is one line.

Each Hypercorn worker process loads the app again from the `APP_ENV` variable (`aggregator
serve` sets it); in the process that checked it first the loaded app is reused, so a factory
is called once there. `python -m aggregator.serving.appref MODULE:NAME` checks a reference in a
process of its own (`bench --app` does, before starting anything).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from flask import Flask

from aggregator.errors import AppRefError
from aggregator.serving.adapter import ASGIAdapter
from aggregator.serving.wrap import MODES, to_asgi
from aggregator.settings import Mode

#: The variable through which `aggregator serve --app` hands the reference to its workers.
APP_ENV = "AGGREGATOR_APP"

_REF = re.compile(r"^(?P<module>[\w.]+)(?::(?P<name>[\w.]+)(?P<call>\(\))?)?$")

#: Apps this process loaded, by reference and mode: the checking process serves what it checked.
_loaded: dict[tuple[str, str | None], ASGIAdapter] = {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load(ref: str) -> Flask | ASGIAdapter:
    """The object `ref` names: a Flask app or an `ASGIAdapter`, else `AppRefError`."""
    found = _REF.match(ref.strip())
    if found is None:
        raise AppRefError(ref, "expected MODULE:NAME or MODULE:FACTORY() (e.g. myapp:app)")
    module_name, name = found["module"], found["name"] or "app"
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise AppRefError(ref, f"no module named {missing!r} (from {cwd})") from None
        raise AppRefError(ref, f"importing {module_name} failed: {_first_line(exc)}") from None
    except Exception as exc:
        raise AppRefError(ref, f"importing {module_name} failed: {_first_line(exc)}") from None
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise AppRefError(ref, f"module {module_name!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if found["call"]:
        if not callable(obj):
            raise AppRefError(ref, f"{name} is not callable (drop the parentheses)")
        try:
            obj = obj()
        except Exception as exc:
            raise AppRefError(ref, f"{name}() failed: {_first_line(exc)}") from None
        name = f"{name}()"
    if not isinstance(obj, Flask | ASGIAdapter):
        raise AppRefError(
            ref,
            f"{name} is of type {type(obj).__name__}, not a Flask app "
            "(nor an ASGIAdapter made by aggregator.to_asgi)",
        )
    return obj


def asgi_app(ref: str, *, mode: Mode | None = None) -> ASGIAdapter:
    """`ref` wrapped for ASGI (`to_asgi`) in `mode` (None: the app's own settings decide).

    An `ASGIAdapter` is served as it is, unless `mode` asks for another mode: then its app is
    wrapped again, with the same settings but that mode.
    """
    if mode is not None and mode not in MODES:
        raise AppRefError(ref, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    key = (ref, mode)
    adapter = _loaded.get(key)
    if adapter is None:
        obj = load(ref)
        if isinstance(obj, ASGIAdapter):
            adapter = obj
            if mode is not None and mode != obj.mode:
                adapter = to_asgi(obj.app, mode=mode, settings=obj.settings)
        else:
            adapter = to_asgi(obj, mode=mode)
        _loaded[key] = adapter
    return adapter


def wsgi_app(ref: str) -> Flask:
    """The Flask app `ref` names, for a WSGI server (gunicorn): an adapter's own app if wrapped."""
    obj = load(ref)
    return obj.app if isinstance(obj, ASGIAdapter) else obj


def wsgi_app_from_env() -> Flask:
    """What gunicorn imports (`aggregator.serving.appref:wsgi_app_from_env()`): `APP_ENV`'s app."""
    return wsgi_app(os.environ[APP_ENV])


def main(argv: list[str]) -> int:
    """`python -m aggregator.serving.appref MODULE:NAME`: 0 when servable, else 2 and one line."""
    if len(argv) != 1:
        print("usage: python -m aggregator.serving.appref MODULE:NAME", file=sys.stderr)
        return 2
    try:
        obj = load(argv[0])
    except AppRefError as exc:
        print(exc.reason, file=sys.stderr)
        return 2
    print(f"{argv[0]}: {type(obj).__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
