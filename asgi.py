"""The ASGI entry point: `hypercorn --config hypercorn.toml asgi:app`."""

from __future__ import annotations

from aggregator import create_asgi_app_or_exit
from aggregator.log import configure_logging
from aggregator.ops.http1 import use_configured_parser

configure_logging()
app = create_asgi_app_or_exit()
use_configured_parser(report=True)  # AGGREGATOR_HTTP1_PARSER
