"""What operator commands print when an HTTP call to a deployment fails: one line, no traceback."""

from __future__ import annotations

import httpx


def describe_http_error(exc: httpx.HTTPError) -> str:
    """One line for a failed HTTP call (`aggregator warm --url`, `aggregator status`)."""
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({exc or type(exc).__name__})"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"
