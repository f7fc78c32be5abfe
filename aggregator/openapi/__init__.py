"""The OpenAPI 3.1 document served at /openapi.json, generated from the config (pure: no I/O).

`document` assembles it; `aggregates` builds the config's operations, `fixed_paths` the others,
`schemas` the components, `parameters` the parameter schemas and `responses` the pieces they
share.
"""

from __future__ import annotations

from aggregator.openapi.document import build_openapi

__all__ = ["build_openapi"]
