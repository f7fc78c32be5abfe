"""aggregator: one Flask endpoint that fans out to many slow upstreams concurrently."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from aggregator import metrics
from aggregator.adapter import AggregatorFlask, ASGIAdapter
from aggregator.config import AppConfig, load_config
from aggregator.errors import ConfigError
from aggregator.settings import Settings
from aggregator.views import admin, aggregates, dashboard, docs, errors, health, status, sync
from aggregator.views import metrics as metrics_view


def create_app(
    settings: Settings | None = None, config: AppConfig | None = None
) -> AggregatorFlask:
    """Build the Flask app; settings and config are read once here (tests pass their own)."""
    settings = settings or Settings()
    config = config or load_config(settings.config)
    # No app-wide static route: the dashboard serves its own assets, only when it is enabled.
    app = AggregatorFlask(__name__, view_threads=settings.threads, static_folder=None)
    # Flask turns debug on from FLASK_DEBUG in the environment; a served app never runs with it
    # (it is for `flask run`'s reloader and debugger), whatever the operator's shell exports.
    app.debug = False
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep config order of sources
    app.extensions["aggregator.settings"] = settings
    app.extensions["aggregator.config"] = config
    errors.init_app(app)
    metrics.init_app(app, settings, config)  # first: the cache, guards and adapter record into it
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics_view.bp)
    app.register_blueprint(admin.bp)
    aggregates.register(app, settings, config)
    sync.register(app, settings, config)
    docs.register(app, config, dashboard=settings.dashboard)
    status.register(app, config)
    dashboard.register(app, enabled=settings.dashboard)
    return app


def create_asgi_app(
    settings: Settings | None = None, config: AppConfig | None = None
) -> ASGIAdapter:
    """The ASGI application Hypercorn serves."""
    settings = settings or Settings()
    return ASGIAdapter(create_app(settings, config), settings)


def create_asgi_app_or_exit() -> ASGIAdapter:
    """For server entry points: a bad config stops start-up with its message, not a traceback."""
    try:
        return create_asgi_app()
    except (ConfigError, ValidationError) as exc:
        print(f"aggregator: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


__all__ = ["Settings", "create_app", "create_asgi_app", "create_asgi_app_or_exit"]
