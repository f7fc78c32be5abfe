"""What a result was measured on: cores, CPU, OS, Python and the version of every compared part.

Recorded with every bench and soak result: figures from different machines or versions are not
comparable, and a report must say which ones it holds.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from aggregator.bench.load_tools import Tool
from aggregator.bench.servers import passed_settings

_VERSIONS = (
    "flask",
    "hypercorn",
    "asgiref",
    "httpx",
    "httpx-aiohttp",
    "aiohttp",
    "pydantic",
    "fastapi",
    "uvicorn",
    "uvloop",
    "gunicorn",
)


def machine_info(tool: Tool, *, app: bool = False) -> dict[str, Any]:
    """Cores, CPU model, OS, Python and the versions of every part in the comparison."""
    versions: dict[str, str] = {}
    for name in _VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if shutil.which("wrk"):
        probe = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        versions["wrk"] = (probe.stdout or probe.stderr).split(" [")[0].removeprefix("wrk ")
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": model or platform.processor(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_generator": tool,
        "versions": versions,
        "settings": passed_settings(app=app),
    }
