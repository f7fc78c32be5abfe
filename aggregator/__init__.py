"""aggregator: one Flask endpoint that fans out to many slow upstreams concurrently.

The app factories live in `aggregator.app`; they are loaded on first use, so that importing a
light part of the package (the `status` command, the metrics listener, the engine) does not
import Flask and every blueprint with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.app import create_app, create_asgi_app, create_asgi_app_or_exit
    from aggregator.engine import Engine
    from aggregator.settings import Settings

#: Public name -> the module that defines it.
_LAZY = {
    "create_app": "aggregator.app",
    "create_asgi_app": "aggregator.app",
    "create_asgi_app_or_exit": "aggregator.app",
    "Engine": "aggregator.engine",
    "Settings": "aggregator.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aggregator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


__all__ = ["Engine", "Settings", "create_app", "create_asgi_app", "create_asgi_app_or_exit"]
