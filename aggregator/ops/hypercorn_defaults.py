"""The Hypercorn settings `aggregator serve` and `check-config` apply, from any directory.

They live in the package so that the working directory changes nothing; the top-level
`hypercorn.toml` holds the same values for `hypercorn --config hypercorn.toml asgi:app`, and
tests/test_packaging.py keeps the two equal. Why each value: the comments in that file.
`serve --hypercorn-config FILE` reads a file of your own instead.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypercorn.config import Config

#: hypercorn.toml's keys and values, key for key.
HYPERCORN_DEFAULTS: dict[str, Any] = {
    "bind": ["127.0.0.1:8000"],
    "workers": 0,
    "worker_class": "uvloop",
    "errorlog": "-",
    "graceful_timeout": 10.0,
    "backlog": 2048,
    "keep_alive_timeout": 5.0,
    "h11_max_incomplete_size": 16 * 1024,
    "h2_max_header_list_size": 16 * 1024,
}


def hypercorn_config(path: Path | None = None) -> Config:
    """Hypercorn's Config from `path` when it is a file, else from HYPERCORN_DEFAULTS."""
    from hypercorn.config import Config

    if path is not None and path.is_file():
        return Config.from_toml(path)
    config = Config()
    for attribute, value in HYPERCORN_DEFAULTS.items():
        setattr(config, attribute, list(value) if isinstance(value, list) else value)
    if importlib.util.find_spec("uvloop") is None:
        config.worker_class = "asyncio"
    return config


def busy_binds(binds: list[str]) -> list[str]:
    """The `host:port` binds another process already listens on, with why (one line each).

    Tried before anything is printed or started, as Hypercorn will bind (SO_REUSEADDR: a port
    in TIME_WAIT is free, a listening one is not); unix sockets and fds are not checked.
    """
    busy = []
    for bind in binds:
        if bind.startswith(("unix:", "fd://")):
            continue
        host, _, port = bind.rpartition(":")
        host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
        if not port.isdigit() or int(port) == 0:
            continue
        reason = port_busy(host, int(port))
        if reason is not None:
            busy.append(f"{bind}: {reason}")
    return busy


def port_busy(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on now, or None when it can."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror or exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(1)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
