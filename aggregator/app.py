"""The composition root: `create_app` builds the engine and registers the blueprints that read it.

`create_asgi_app` wraps the app in the adapter Hypercorn serves. Only server entry points (and
`aggregator.ops.serve`) import this module: the engine, the cache and the operator commands stand
without Flask's app object, so `aggregator status` or a direct warm never build blueprints.
"""

from __future__ import annotations

import sys

from pydantic import ValidationError

from aggregator import engine as engine_module
from aggregator import twins
from aggregator.config import AppConfig, load_config
from aggregator.engine import Engine
from aggregator.errors import ConfigError
from aggregator.serving import AggregatorFlask, ASGIAdapter
from aggregator.settings import Settings, SettingsError
from aggregator.views import admin, aggregates, dashboard, docs, errors, health, status
from aggregator.views import metrics as metrics_view


def create_app(
    settings: Settings | None = None, config: AppConfig | None = None
) -> AggregatorFlask:
    """Build the Flask app; settings and config are read once here (tests pass their own)."""
    settings = settings or Settings()
    config = config or load_config(settings.config)
    # No app-wide static route: the dashboard serves its own assets, only when it is enabled.
    app = AggregatorFlask("aggregator", view_threads=settings.threads, static_folder=None)
    # Flask turns debug on from FLASK_DEBUG in the environment; a served app never runs with it
    # (it is for `flask run`'s reloader and debugger), whatever the operator's shell exports.
    app.debug = False
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep config order of sources
    engine = Engine.build(settings, config, app=app)
    engine_module.init_app(app, engine)
    errors.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics_view.bp)
    app.register_blueprint(admin.bp)
    aggregates.register(app, config)
    twins.register(app, engine)
    docs.register(app, dashboard=settings.dashboard)
    status.register(app)
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
    except SettingsError as exc:  # an AGGREGATOR_* variable: one line, as the command says it
        print(f"aggregator: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (ConfigError, ValidationError) as exc:
        print(f"aggregator: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


__all__ = ["Engine", "Settings", "create_app", "create_asgi_app", "create_asgi_app_or_exit"]
