"""What `/status` and the dashboard page report, and its OpenAPI description (pure: no Flask).

`/status` answers for the worker process that serves the request: breakers, retry budgets and
bulkheads live in each worker (see `resilience`), so with several workers two answers may
differ, and the body names its worker (the pid) and says so. The aggregates' metadata (paths,
sources, parameters with their types and defaults) is the same list the dashboard page renders
into its HTML, so a script and the page see one shape. The schemas live next to the code that
builds the bodies so the two cannot drift; `openapi.build_openapi` includes them.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from aggregator.models import JSONDict
from aggregator.routes import DASHBOARD, STATUS
from aggregator.settings import Http1Parser

if TYPE_CHECKING:
    from aggregator.config import AppConfig
    from aggregator.resilience import Guards

SCOPE_NOTE = (
    "state of this worker process only: each worker keeps its own circuit breakers and "
    "concurrency counts (with shared resilience state, the fleet's circuits as this worker "
    "last read them), so another worker may answer differently"
)
#: The dashboard page's Content-Security-Policy: its own scripts, styles and fetches only.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def aggregates_meta(config: AppConfig) -> list[JSONDict]:
    """Each aggregate as a client needs it to build a request (and the page a form)."""
    return [
        {
            "name": name,
            "path": agg.path,
            "sources": list(agg.sources),
            "required": list(agg.required),
            "cached": agg.cache_ttl > 0,
            "params": {
                param: {
                    "type": spec.type,
                    "default": spec.default,
                    "required": spec.default is None,
                }
                for param, spec in agg.params.items()
            },
            # The first `warm` parameter set: a ready-made example the page fills in.
            "example": dict(agg.warm[0]) if agg.warm else {},
        }
        for name, agg in config.aggregates.items()
    ]


def parser_in_use() -> Http1Parser:
    """What Hypercorn's HTTP/1 protocol parses with in this process (`ops.http1` chooses; h11
    when Hypercorn is not what serves it)."""
    protocol = sys.modules.get("hypercorn.protocol.h11")
    module = getattr(protocol, "h11", None)
    return "h11-mypyc" if getattr(module, "__name__", "") == "h11_mypyc" else "h11"


def worker_status(guards: Guards, aggregates: list[JSONDict], pid: int) -> JSONDict:
    """This worker's view: every upstream's breaker and in-flight calls, and the aggregates."""
    sources = {
        name: {
            "circuit": guard.breaker.state,
            "consecutive_failures": guard.breaker.consecutive_failures,
            "breaker_failures": guard.breaker.failures,
            "in_flight": guard.bulkhead.in_flight,
            "max_concurrency": guard.bulkhead.limit,
        }
        for name, guard in guards.items()
    }
    shared = guards.shared
    return {
        "worker": pid,
        "http1_parser": parser_in_use(),
        "scope": "worker",
        "note": SCOPE_NOTE,
        "shared": shared.status() if shared is not None else {"mode": "off", "healthy": False},
        "sources": sources,
        "aggregates": aggregates,
    }


# -- OpenAPI ---------------------------------------------------------------------------------

_SCALAR: JSONDict = {"type": ["string", "number", "boolean"]}


def status_schemas() -> JSONDict:
    """`components.schemas` entries for `/status`."""
    source = {
        "type": "object",
        "required": ["circuit", "consecutive_failures", "breaker_failures", "in_flight"],
        "properties": {
            "circuit": {
                "enum": ["closed", "open", "half_open"],
                "description": "`open`: calls are refused as `circuit_open`; it stays `open` "
                "after the cool-down until the next call, which becomes the probe.",
            },
            "consecutive_failures": {"type": "integer", "minimum": 0},
            "breaker_failures": {
                "type": "integer",
                "minimum": 0,
                "description": "Consecutive failures that open the breaker (0: no breaker).",
            },
            "in_flight": {"type": "integer", "minimum": 0},
            "max_concurrency": {"type": ["integer", "null"], "minimum": 1},
        },
    }
    shared = {
        "type": "object",
        "description": "The shared resilience state (AGGREGATOR_SHARED_RESILIENCE): while "
        "`healthy`, circuits and limits are fleet-wide (then `circuit` and "
        "`consecutive_failures` are the fleet's as this worker last read them); otherwise "
        "this worker decides alone.",
        "required": ["mode", "healthy"],
        "properties": {
            "mode": {"enum": ["off", "redis"]},
            "state": {"enum": ["starting", "up", "down"]},
            "healthy": {"type": "boolean"},
            "failures": {"type": "integer", "minimum": 0},
        },
    }
    param = {
        "type": "object",
        "required": ["type", "default", "required"],
        "properties": {
            "type": {"enum": ["str", "int", "float", "bool"]},
            "default": {"type": ["string", "number", "boolean", "null"]},
            "required": {"type": "boolean"},
        },
    }
    aggregate = {
        "type": "object",
        "required": ["name", "path", "sources", "required", "cached", "params", "example"],
        "properties": {
            "name": {"type": "string"},
            "path": {"type": "string"},
            "sources": {"type": "array", "items": {"type": "string"}},
            "required": {"type": "array", "items": {"type": "string"}},
            "cached": {"type": "boolean"},
            "params": {"type": "object", "additionalProperties": param},
            "example": {"type": "object", "additionalProperties": _SCALAR},
        },
    }
    return {
        "WorkerStatus": {
            "type": "object",
            "description": SCOPE_NOTE,
            "required": ["worker", "scope", "note", "sources", "aggregates"],
            "properties": {
                "worker": {"type": "integer", "description": "The worker's process id."},
                "http1_parser": {
                    "enum": ["h11", "h11-mypyc"],
                    "description": "What Hypercorn parses HTTP/1.1 with in this worker "
                    "(AGGREGATOR_HTTP1_PARSER; h11 when served by another server).",
                },
                "scope": {"const": "worker"},
                "note": {"type": "string"},
                "shared": shared,
                "sources": {"type": "object", "additionalProperties": source},
                "aggregates": {"type": "array", "items": aggregate},
            },
        }
    }


def status_paths(*, dashboard: bool) -> JSONDict:
    """`paths` entries: `/status`, and the page at `/` when it is enabled."""
    paths: JSONDict = {
        STATUS: {
            "get": {
                "tags": ["status"],
                "operationId": "status",
                "summary": "This worker's circuit breakers and in-flight calls, and the aggregates",
                "description": SCOPE_NOTE.capitalize() + ".",
                "responses": {
                    "200": {
                        "description": "The answering worker's state.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/WorkerStatus"}
                            }
                        },
                    }
                },
            }
        }
    }
    if dashboard:
        paths[DASHBOARD] = {
            "get": {
                "tags": ["status"],
                "operationId": "dashboard",
                "summary": "The live dashboard page (HTML; AGGREGATOR_DASHBOARD=off removes it)",
                "responses": {
                    "200": {
                        "description": "The page; its scripts fetch the aggregates and /status.",
                        "headers": {
                            "Content-Security-Policy": {
                                "required": True,
                                "schema": {"type": "string"},
                            }
                        },
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        }
    return paths
