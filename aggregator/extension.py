"""`Aggregator`: the engine as a Flask extension, for any Flask app and its own views.

Sources come from a TOML file (the same `[upstreams.NAME]` tables, optionally `[aggregates]`
too) or are declared in Python with `source()`, with the same options and the same validation.
A view decorated with `aggregate()` is answered like a configured aggregate: cache, single-flight,
stale serving, ETag/304, purge, warm, metrics, Server-Timing and an OpenAPI entry; inside it,
`await agg.fetch("profile", user_id=7)` calls one source (its model, or None when an optional
one failed) and `agg.fetch_sync(...)` does the same from a plain `def` view::

    import asyncio
    from flask import Flask
    from aggregator import Aggregator, to_asgi

    app = Flask(__name__)
    agg = Aggregator(app)
    agg.source("profile", url="http://127.0.0.1:8001/profile/{user_id}", timeout=1.0)
    agg.source("weather", url="http://127.0.0.1:8001/weather/{city}", timeout=1.0)
    agg.source("news", url="http://127.0.0.1:8001/news?topic={topic}")

    @app.get("/api/home")
    @agg.aggregate(cache_ttl=30, deadline=1.5, required=["profile"])
    async def home(user_id: int, topic: str = "tech") -> dict[str, object]:
        profile = await agg.fetch("profile", user_id=user_id)
        weather, news = await asyncio.gather(  # B with A's answer, next to an independent C
            agg.fetch("weather", city=profile["city"]), agg.fetch("news", topic=topic)
        )
        return {"profile": profile, "weather": weather, "news": news}

    asgi_app = to_asgi(app)  # hypercorn module:asgi_app, or `aggregator serve --app module:app`

The engine is built on first use (the first request, or `to_asgi`), once every view is known;
declaring a source or a view after that is an error. The parameters of a view are its
keyword arguments, typed by their annotations (str, int, float, bool) and read from the query
string like a configured aggregate's; a default makes one optional.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app
from pydantic import BaseModel, ValidationError

from aggregator import engine as engine_module
from aggregator.config import (
    AggregateConfig,
    AppConfig,
    UpstreamConfig,
    check_config,
    load_config,
    pydantic_problems,
)
from aggregator.engine import Engine, LazyEngine, engine_of
from aggregator.errors import ConfigError
from aggregator.params import ParamSpec, ParamType, ParamValue
from aggregator.settings import Settings
from aggregator.viewfill import AggregateView, fetch, fetch_blocking
from aggregator.views import admin, aggregates, dashboard, docs, errors, health, status
from aggregator.views import metrics as metrics_view

_TYPES: dict[object, ParamType] = {str: "str", int: "int", float: "float", bool: "bool"}


class Aggregator:
    """The aggregator engine for a Flask app: `Aggregator(app)` or `Aggregator()` +
    `init_app(app)`.

    `sources`: a TOML file of `[upstreams.NAME]` (and optionally `[aggregates.NAME]`) tables;
    without one, AGGREGATOR_CONFIG's file if set, else none (declare them with `source()`).
    `config`: an `AppConfig` instead of a file. `settings`: process settings (default: from
    AGGREGATOR_* variables). `routes`: also serve the engine's own routes (`/healthz`,
    `/readyz`, `/metrics`, `/status`, `/openapi.json`, `/docs`, `/admin/*` and the dashboard
    when AGGREGATOR_DASHBOARD allows it) next to the app's.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        sources: str | Path | None = None,
        config: AppConfig | None = None,
        settings: Settings | None = None,
        routes: bool = True,
    ) -> None:
        self._sources_file = Path(sources) if sources is not None else None
        self._config = config
        self._settings = settings
        self._routes = routes
        self._declared: dict[str, UpstreamConfig] = {}
        #: name -> (the routed function, the view, its parameters, its `[aggregates]` keys)
        self._views: dict[
            str, tuple[Callable[..., Any], AggregateView, dict[str, ParamSpec], dict[str, Any]]
        ] = {}
        self._building: list[LazyEngine] = []
        if app is not None:
            self.init_app(app)

    # -- set-up ----------------------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Attach the engine (built on first use) and the routes of configured aggregates."""
        settings = self._settings or Settings()
        file_config = self._file_config(settings)
        lazy = LazyEngine(lambda: self._build(app, settings, file_config))
        self._building.append(lazy)
        engine_module.init_app(app, lazy)
        errors.init_app(app, every_error=False)
        if file_config.aggregates:
            aggregates.register(app, file_config)
        if self._routes:
            app.register_blueprint(health.bp)
            app.register_blueprint(metrics_view.bp)
            app.register_blueprint(admin.bp)
            docs.register(app, dashboard=settings.dashboard, twins=False)
            status.register(app)
            dashboard.register(app, enabled=settings.dashboard)

    def source(self, name: str, /, url: str, **options: Any) -> None:
        """Declare upstream `name`, with the keys of `[upstreams.NAME]` (`schema` may be the
        pydantic model itself); ConfigError says what is wrong, as for the file."""
        self._not_built(f"source({name!r})")
        model = options.get("schema")
        if isinstance(model, type) and issubclass(model, BaseModel):
            options["schema"] = f"{model.__module__}:{model.__qualname__}"
        where = f"source {name!r}"
        try:
            upstream = UpstreamConfig.model_validate({"url": url, **options})
        except ValidationError as exc:
            raise ConfigError(where, pydantic_problems(exc)) from None
        if isinstance(model, type) and issubclass(model, BaseModel):
            upstream.__dict__["model"] = model  # the class itself, even if not importable
        self._declared[name] = upstream

    def aggregate(
        self,
        *,
        name: str | None = None,
        required: Iterable[str] = (),
        sources: Iterable[str] | None = None,
        params: Mapping[str, ParamType | Mapping[str, object]] | None = None,
        deadline: float = 10.0,
        cache_ttl: float = 0.0,
        cache_partial_ttl: float | None = None,
        stale_ttl: float = 0.0,
        stale_if_error_ttl: float = 0.0,
        cache_vary: Iterable[str] = (),
        warm: Iterable[Mapping[str, ParamValue]] = (),
    ) -> Callable[[Callable[..., Any]], Callable[..., Coroutine[Any, Any, Response]]]:
        """Make an `async def` (or plain `def`) view an aggregate: its body calls sources with
        `fetch`, returns a dict or a pydantic model (the envelope's `data`), and is answered
        through the aggregate cache. Route it as usual, with this decorator under the route's.

        `name`: the aggregate's name (default: the function's); `required`: sources whose
        failure fails the answer (502/504); `sources`: the upstreams it may call (default:
        all; their forwarded headers are part of its cache key); `params`: parameter types
        when not from the signature; the others are those of `[aggregates.NAME]`.
        """
        options: dict[str, Any] = {
            "deadline": deadline,
            "cache_ttl": cache_ttl,
            "cache_partial_ttl": cache_partial_ttl,
            "stale_ttl": stale_ttl,
            "stale_if_error_ttl": stale_if_error_ttl,
            "cache_vary": list(cache_vary),
            "warm": [dict(w) for w in warm],
        }

        def decorate(func: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Response]]:
            view_name = name or func.__name__
            self._not_built(f"aggregate() of {view_name!r}")
            specs = _signature_params(func, params)
            spec = AggregateView(
                name=view_name,
                body=func,
                required=tuple(required),
                sources=tuple(sources) if sources is not None else None,
                data_model=_return_model(func),
            )

            @functools.wraps(func)
            async def answer(**_path: Any) -> Response:
                return await aggregates.answer(view_name)

            self._views[view_name] = (answer, spec, specs, options)
            return answer

        return decorate

    # -- inside a view -----------------------------------------------------------------------

    async def fetch(self, source: str, /, **values: ParamValue) -> Any:
        """One source's answer, validated (its model's instance, or the JSON without a
        `schema`); None when it failed and is optional (its error is in the envelope). A
        failed required source ends the view: the answer is the 502/504 envelope."""
        return await fetch(source, values)

    def fetch_sync(self, source: str, /, **values: ParamValue) -> Any:
        """`fetch` for a plain `def` view (it blocks its thread while the call runs on the
        server loop, with the same guards, cache and envelope)."""
        return fetch_blocking(source, values)

    @property
    def engine(self) -> Engine:
        """The engine of the app handling the current request (or app context)."""
        return engine_of(current_app._get_current_object())  # type: ignore[attr-defined]

    # -- building -------------------------------------------------------------------------

    def _file_config(self, settings: Settings) -> AppConfig:
        if self._config is not None:
            return self._config
        path = self._sources_file or settings.config
        if path is None:
            return AppConfig(upstreams={}, aggregates={})
        return load_config(path, sources_only=True)

    def _not_built(self, what: str) -> None:
        if any(lazy.built for lazy in self._building):
            raise RuntimeError(f"{what}: the engine is already built (it was used); declare first")

    def _build(self, app: Flask, settings: Settings, file_config: AppConfig) -> Engine:
        """The config with every declared source and view, checked as a file is, then the
        engine (blocking: called on first use, from a request thread or `to_asgi`)."""
        upstreams = {**file_config.upstreams}
        for name, upstream in self._declared.items():
            if name in upstreams:
                raise ConfigError(f"source {name!r}", ["already declared in the sources file"])
            upstreams[name] = upstream
        routes = _routes_of(app, {entry[0]: name for name, entry in self._views.items()})
        views: dict[str, AggregateView] = {}
        aggregate_configs = dict(file_config.aggregates)
        for name, (_, spec, specs, options) in self._views.items():
            where = f"view {name!r}"
            if name in aggregate_configs:
                raise ConfigError(where, ["an aggregate of that name is in the sources file"])
            path = routes.get(name)
            if path is None:
                raise ConfigError(where, ["decorated with aggregate() but not routed"])
            chosen = list(spec.sources) if spec.sources is not None else list(upstreams)
            try:
                aggregate_configs[name] = AggregateConfig.model_validate(
                    {
                        "path": path,
                        "sources": chosen,
                        "required": list(spec.required),
                        "params": {k: v.model_dump(exclude_none=True) for k, v in specs.items()},
                        **{k: v for k, v in options.items() if v is not None},
                    }
                )
            except ValidationError as exc:
                raise ConfigError(where, pydantic_problems(exc)) from None
            views[name] = spec
        try:
            config = AppConfig(upstreams=upstreams, aggregates=aggregate_configs)
        except ValidationError as exc:
            raise ConfigError("aggregator config", pydantic_problems(exc)) from None
        check_config(config, "aggregator config", views=views)
        return Engine.build(settings, config, app=app, views=views)


def _routes_of(app: Flask, answers: Mapping[Callable[..., Any], str]) -> dict[str, str]:
    """Each decorated view's path: the first URL rule the app routes to it."""
    found: dict[str, str] = {}
    for rule in app.url_map.iter_rules():
        name = answers.get(app.view_functions.get(rule.endpoint))  # type: ignore[arg-type]
        if name is not None and name not in found:
            if rule.arguments:
                raise ConfigError(
                    f"view {name!r}",
                    [
                        f"route {rule.rule}: aggregate views take their parameters from the "
                        "query string, not the path"
                    ],
                )
            found[name] = rule.rule
    return found


def _signature_params(
    func: Callable[..., Any], declared: Mapping[str, ParamType | Mapping[str, object]] | None
) -> dict[str, ParamSpec]:
    """The view's parameters: `declared`, else its keyword arguments, typed by annotation."""
    where = f"view {func.__name__!r}"
    if declared is not None:
        try:
            return {
                k: ParamSpec.model_validate({"type": v} if isinstance(v, str) else dict(v))
                for k, v in declared.items()
            }
        except ValidationError as exc:
            raise ConfigError(where, pydantic_problems(exc)) from None
    try:
        hints = typing.get_type_hints(func)
    except NameError as exc:
        raise ConfigError(where, [f"cannot read its annotations: {exc}"]) from None
    specs: dict[str, ParamSpec] = {}
    for param in inspect.signature(func).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigError(where, [f"*{param.name}: parameters must be named"])
        kind = _TYPES.get(hints.get(param.name, str))
        if kind is None:
            raise ConfigError(
                where, [f"{param.name}: annotate it as str, int, float or bool (or pass params=)"]
            )
        default = None if param.default is inspect.Parameter.empty else param.default
        try:
            specs[param.name] = ParamSpec(type=kind, default=default)
        except ValidationError as exc:
            raise ConfigError(
                where, [f"{param.name}: {p}" for p in pydantic_problems(exc)]
            ) from None
    return specs


def _return_model(func: Callable[..., Any]) -> type[BaseModel] | None:
    try:
        returned = typing.get_type_hints(func).get("return")
    except NameError:
        return None
    return returned if isinstance(returned, type) and issubclass(returned, BaseModel) else None
