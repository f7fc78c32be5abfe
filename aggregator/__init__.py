"""aggregator: one Flask endpoint that fans out to many slow upstreams concurrently.

The app factories live in `aggregator.app` and `to_asgi` (any Flask app served by our adapter)
in `aggregator.serving.wrap`; they are loaded on first use, so that importing a light part of
the package (the `status` command, the metrics listener, the engine) does not import Flask and
every blueprint with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.app import create_app, create_asgi_app, create_asgi_app_or_exit
    from aggregator.engine import Engine
    from aggregator.extension import Aggregator
    from aggregator.serving.wrap import to_asgi
    from aggregator.settings import Settings

#: Public name -> the module that defines it.
_LAZY = {
    "Aggregator": "aggregator.extension",
    "create_app": "aggregator.app",
    "create_asgi_app": "aggregator.app",
    "create_asgi_app_or_exit": "aggregator.app",
    "Engine": "aggregator.engine",
    "Settings": "aggregator.settings",
    "to_asgi": "aggregator.serving.wrap",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aggregator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


__all__ = [
    "Aggregator",
    "Engine",
    "Settings",
    "create_app",
    "create_asgi_app",
    "create_asgi_app_or_exit",
    "to_asgi",
]
