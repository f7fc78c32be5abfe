"""Where the repository is (hypercorn.toml, asgi.py, the Dockerfile, the package)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
