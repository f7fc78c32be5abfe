"""What the commands do on the demo defaults (no config, no AGGREGATOR_CACHE_TYPE): the Quick start.

A newcomer runs `aggregator serve` with nothing configured, and then, from another shell,
`aggregator warm`, `aggregator cache purge` and `aggregator status`. For those to reach what the
server holds, the demo defaults are a filesystem cache in a directory private to this user
(`$TMPDIR/aggregator-demo-<uid>/cache`, mode 0700), which every command finds without being
told, and `serve` generates an admin token for its run (unless AGGREGATOR_ADMIN_TOKEN is set)
and prints how to pass it: `/metrics`, `status` and the admin endpoints then work, behind it.

Nothing here applies once a config (`--config`, AGGREGATOR_CONFIG, `--app`) or a cache type is
given: production settings are never guessed, and the per-process `simple` cache stays the
default of a configured deployment. No admin endpoint and no `/metrics` is ever open without a
token.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from aggregator.errors import ConfigError

CONFIG_ENV = "AGGREGATOR_CONFIG"
CACHE_TYPE_ENV = "AGGREGATOR_CACHE_TYPE"
CACHE_DIR_ENV = "AGGREGATOR_CACHE_DIR"
TOKEN_ENV = "AGGREGATOR_ADMIN_TOKEN"


def on_demo_defaults(config_file: Path | None, app_ref: str | None = None) -> bool:
    """Whether this run is the Quick start's: no config of any kind, no cache type."""
    return (
        config_file is None
        and app_ref is None
        and not os.environ.get(CONFIG_ENV)
        and not os.environ.get(CACHE_TYPE_ENV)
    )


def demo_cache_dir() -> Path:
    """The demo defaults' cache directory, private to this user."""
    return Path(tempfile.gettempdir()) / f"aggregator-demo-{os.getuid()}" / "cache"


def use_demo_cache(
    config_file: Path | None, app_ref: str | None = None, *, fresh: bool = False
) -> Path | None:
    """On the demo defaults, point AGGREGATOR_CACHE_* at the shared demo cache (for this process
    and the ones it starts); the directory, or None when settings of one's own apply.

    `fresh` (serve): empty the demo cache first, so each run starts cold as the Quick start
    says (only the default directory; one named by AGGREGATOR_CACHE_DIR is never emptied).
    """
    if not on_demo_defaults(config_file, app_ref):
        return None
    path = Path(os.environ.get(CACHE_DIR_ENV) or demo_cache_dir())
    if not os.environ.get(CACHE_DIR_ENV):
        parent = path.parent
        parent.mkdir(mode=0o700, exist_ok=True)
        if parent.stat().st_uid != os.getuid():  # another user's: never share a cache with it
            raise ConfigError(
                CACHE_DIR_ENV,
                [f"{parent} belongs to another user; set {CACHE_DIR_ENV} to a directory of yours"],
            )
        if fresh:
            shutil.rmtree(path, ignore_errors=True)
    os.environ[CACHE_TYPE_ENV] = "filesystem"
    os.environ[CACHE_DIR_ENV] = str(path)
    return path


def run_token() -> str | None:
    """On the demo defaults without AGGREGATOR_ADMIN_TOKEN, a new admin token for this run
    (exported for the workers); None when the operator set one (theirs is never printed)."""
    if os.environ.get(TOKEN_ENV):
        return None
    token = secrets.token_urlsafe(24)
    os.environ[TOKEN_ENV] = token
    return token
