"""The TOML config (upstreams and aggregates), validated once at start-up with readable errors.

Unknown keys are errors, not ignored: a typo such as `timout` would otherwise silently keep the
default. `${VAR}` and `${VAR:-default}` in URLs and header values are expanded from the
environment at load time; a missing variable stops start-up. Header values are secrets: no
message built here ever includes them.

One thing only, the file's shape and its validation (hence the length: one model per section,
each with its rules); what a parameter value may be is `aggregator.params`, and which client
headers may be forwarded is `aggregator.forwarding`, both applied here when the file loads.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from aggregator import forwarding, graph
from aggregator import params as parameters
from aggregator.bodytemplate import BodyTemplate
from aggregator.errors import ConfigError, InvalidRequestError
from aggregator.params import ParamSpec, ParamValue
from aggregator.resilience.hedge import parse_hedge_after
from aggregator.routes import RESERVED_PATHS, RESERVED_PREFIXES
from aggregator.shape import compile_shape, shape_problems
from aggregator.urltemplate import UrlTemplate

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def expand_env(value: str) -> str:
    """Replace `${VAR}` / `${VAR:-default}`; a missing variable without default is an error."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        # As in the shell, `:-` also replaces a variable that is set but empty.
        if found is None or (found == "" and default is not None):
            if default is None:
                raise ValueError(f"environment variable {name} is not set")
            return default
        return found

    return _ENV_REF.sub(sub, value)


class _Strict(BaseModel):
    # strict: `timeout = "5"` is a mistake in a TOML file, not something to coerce quietly
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


_ENV_ONLY = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


class OAuthConfig(_Strict):
    """OAuth2 client credentials of one source (`[upstreams.NAME.oauth]`; upstream.oauth).

    The secret must come from the environment (`client_secret = "${VAR}"`); it is never part of
    a message, a repr, a log line or an answer.
    """

    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: str = Field(repr=False)
    scopes: list[str] = Field(default_factory=list, max_length=64)
    audience: str | None = None
    #: How the client authenticates at the token endpoint (RFC 6749 2.3.1): HTTP Basic, or
    #: `client_id`/`client_secret` in the form.
    auth_method: Literal["basic", "post"] = "basic"
    #: Seconds a token request may take.
    timeout: float = Field(default=5.0, gt=0, le=60)

    @field_validator("token_url", "client_id", "audience", mode="after")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return None if value is None else expand_env(value)

    @field_validator("token_url", mode="after")
    @classmethod
    def _check_token_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or "{" in value:
            raise ValueError("must be an http:// or https:// URL without placeholders")
        return value

    @field_validator("client_secret", mode="after")
    @classmethod
    def _secret_from_env(cls, value: str) -> str:
        if not _ENV_ONLY.fullmatch(value):
            raise ValueError('must name an environment variable ("${VAR}"), not hold the secret')
        return expand_env(value)

    @field_validator("scopes", mode="after")
    @classmethod
    def _check_scopes(cls, value: list[str]) -> list[str]:
        for scope in value:
            if not scope or any(c in scope for c in ' "\\') or not scope.isprintable():
                raise ValueError(f"{scope!r} is not a valid scope")
        return value


class UpstreamConfig(_Strict):
    """One upstream service (`[upstreams.NAME]`)."""

    url: str
    #: Bounds the whole call, connect to last body byte.
    timeout: float = Field(default=5.0, gt=0, le=300)
    #: Connect phase alone; defaults to the whole timeout.
    connect_timeout: float | None = Field(default=None, gt=0, le=300)
    schema_: str | None = Field(default=None, alias="schema", pattern=r"^[\w.]+:\w+$")
    headers: dict[str, str] = Field(default_factory=dict)
    #: Client request headers passed on to this upstream (default: none). Their values are part
    #: of the cache keys, so answers never mix across different values (README, Headers).
    forward_headers: list[str] = Field(default_factory=list, max_length=32)
    #: Allows `Authorization` and `Cookie` in `forward_headers` (the client's credentials reach
    #: this upstream; cached answers are then kept per credential).
    forward_credentials: bool = False
    #: Seconds to reuse a successful answer. Unset: honour the upstream's Cache-Control
    #: (max-age; no-store and private mean never); set: this wins; 0: never cache.
    cache_ttl: float | None = Field(default=None, ge=0, le=86_400)
    #: Follow 3xx redirects (http/https only; the `headers` are dropped once a hop leaves this
    #: URL's origin). Off: a redirect is an `http_status` error naming its status.
    follow_redirects: bool = False
    #: Hops allowed when following redirects; one more is an `http_status` error.
    max_redirects: int = Field(default=5, ge=1, le=20)
    # -- resilience (aggregator.resilience; per worker process) --------------------------------
    #: Extra attempts after a connect error or HTTP 502/503/504, within `timeout`.
    retries: int = Field(default=2, ge=0, le=10)
    #: Seconds: retry k waits a random time in [0, retry_backoff x 2^(k-1)] (full jitter).
    retry_backoff: float = Field(default=0.05, gt=0, le=60)
    #: Retries may be at most this share of calls over 10 s (plus 3), so a dead upstream sees
    #: at most ~(1 + retry_budget) x its traffic.
    retry_budget: float = Field(default=0.2, ge=0, le=1)
    #: Consecutive failed calls that open the circuit breaker; 0 disables it.
    breaker_failures: int = Field(default=5, ge=0, le=10_000)
    #: Seconds the breaker stays open before one probe call is let through.
    breaker_cooldown: float = Field(default=5.0, gt=0, le=3_600)
    #: Calls in flight at once; more are refused at once as `overloaded`. Unset: no limit.
    max_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    #: Data answered in place of a failed call (flagged `fallback`); checked against `schema`.
    fallback: JsonValue = None
    # -- requests with a body, and credentials (aggregator.bodytemplate, upstream.oauth) -------
    #: `POST` sends `body` as JSON.
    method: Literal["GET", "POST"] = "GET"
    #: The JSON body of a POST; `{name}` placeholders in its string values are filled as data.
    body: JsonValue = None
    #: A GraphQL endpoint: `body` holds `query` (and `variables`); the answer's `data` is the
    #: payload; `errors` with no `data` is a `graphql` error.
    graphql: bool = False
    #: Whether calls may be repeated (retries): GET sources are; a POST only when this is set.
    idempotent: bool | None = None
    #: OAuth2 client credentials: each call carries a bearer token of this credential.
    oauth: OAuthConfig | None = None
    # -- hedged calls and shaped answers (aggregator.resilience.hedge, aggregator.shape) -------
    #: Send one more identical request if no answer came after this long: seconds (`0.25`) or
    #: a percentile of this source's recent latency (`"p95"`). Unset: never hedge.
    hedge_after: float | str | None = None
    #: A JMESPath expression applied to the validated payload before it is merged, e.g.
    #: `"{city: location.name, temp: current.temp_c}"`. Unset: the whole payload.
    shape: str | None = Field(default=None, min_length=1, max_length=2_000)

    @field_validator("hedge_after", mode="before")
    @classmethod
    def _check_hedge_after(cls, value: Any) -> float | str | None:
        return parse_hedge_after(value)  # ValueError: a one-line message

    @field_validator("shape", mode="after")
    @classmethod
    def _check_shape(cls, value: str | None) -> str | None:
        if value is not None:
            compile_shape(value)  # ValueError: a one-line message
        return value

    @model_validator(mode="after")
    def _hedge_within_timeout(self) -> UpstreamConfig:
        if isinstance(self.hedge_after, float | int) and self.hedge_after >= self.timeout:
            raise ValueError(
                f"hedge_after ({self.hedge_after:g} s) must be shorter than timeout "
                f"({self.timeout:g} s): a hedge is sent within the call's own time"
            )
        return self

    @property
    def is_idempotent(self) -> bool:
        """Repeating this call is harmless: a GET unless `idempotent` says not; a POST only when
        `idempotent` says so."""
        if self.idempotent is None:
            return self.method == "GET"
        return self.idempotent

    @field_validator("url", mode="after")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = expand_env(value)
        UrlTemplate.parse(value)
        return value

    @field_validator("headers", mode="after")
    @classmethod
    def _expand_headers(cls, value: dict[str, str]) -> dict[str, str]:
        expanded: dict[str, str] = {}
        for name, raw in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() == "x-request-id":
                raise ValueError("X-Request-ID is set per request (the request's id)")
            text = expand_env(raw)
            if any(c in text for c in "\r\n\0"):
                raise ValueError(f"value of header {name} contains a line break")
            expanded[name] = text
        return expanded

    @field_validator("forward_headers", mode="after")
    @classmethod
    def _check_forwarded(cls, value: list[str]) -> list[str]:
        forwarding.check_names(value)
        return value

    @model_validator(mode="after")
    def _check_forwarding(self) -> UpstreamConfig:
        forwarding.check_upstream(
            self.forward_headers, credentials=self.forward_credentials, static=self.headers
        )
        return self

    @model_validator(mode="after")
    def _check_body(self) -> UpstreamConfig:
        if self.method == "GET" and (self.body is not None or self.graphql):
            raise ValueError('body and graphql need method = "POST"')
        if self.method == "POST" and self.body is None:
            raise ValueError('method = "POST" needs a body')
        if self.graphql and not (
            isinstance(self.body, dict)
            and isinstance(self.body.get("query"), str)
            and set(self.body) <= {"query", "variables", "operationName"}
        ):
            raise ValueError("a graphql body is a table with a query string (and variables)")
        return self

    @cached_property
    def retriable(self) -> bool:
        """Whether a call may be sent again (retries): a GET, or a source marked idempotent."""
        return self.idempotent if self.idempotent is not None else self.method == "GET"

    @cached_property
    def body_template(self) -> BodyTemplate | None:
        if self.body is None:
            return None
        literal = frozenset({"query"}) if self.graphql else frozenset()
        return BodyTemplate.parse(self.body, literal=literal)

    @cached_property
    def forwarded(self) -> tuple[tuple[str, str], ...]:
        """`forward_headers` as (name as configured, lowercase name as ASGI gives it) pairs."""
        return tuple((name, name.lower()) for name in self.forward_headers)

    @cached_property
    def forwarded_keys(self) -> tuple[str, ...]:
        """The lowercase forwarded names, sorted: what this upstream's cache entries vary by."""
        return tuple(sorted(key for _, key in self.forwarded))

    @cached_property
    def template(self) -> UrlTemplate:
        """The URL template; its `names` and `fields` also cover the body's placeholders, so the
        graph, the load checks and views see what a call needs wherever it goes."""
        url = UrlTemplate.parse(self.url)
        body = self.body_template
        if body is None:
            return url
        return dataclasses.replace(
            url,
            names=url.names | body.names,
            fields=tuple(dict.fromkeys((*url.fields, *body.fields))),
        )

    @cached_property
    def model(self) -> type[BaseModel] | None:
        """The pydantic model the payload must satisfy, imported once at load."""
        if self.schema_ is None:
            return None
        module_name, _, attr = self.schema_.partition(":")
        module = importlib.import_module(module_name)
        model = getattr(module, attr)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"{self.schema_} is not a pydantic model")
        return model

    @cached_property
    def fallback_data(self) -> Any:
        """`fallback` as a live answer would be served: validated and dumped by `schema`.

        Raises pydantic's ValidationError when it does not match; the config load checks it.
        """
        model = self.model
        if model is None or self.fallback is None:
            return self.fallback
        return model.model_validate(self.fallback).model_dump(mode="json")


class AggregateConfig(_Strict):
    """One aggregated endpoint (`[aggregates.NAME]`)."""

    path: str = Field(pattern=r"^/[A-Za-z0-9_./-]*$")
    sources: list[str] = Field(min_length=1)
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    deadline: float = Field(default=10.0, gt=0, le=600)
    required: list[str] = Field(default_factory=list)
    #: Seconds a complete answer is served from the cache; 0 turns caching off.
    cache_ttl: float = Field(default=0.0, ge=0, le=86_400)
    #: Seconds a partial answer is cached; unset: partial answers are never cached.
    cache_partial_ttl: float | None = Field(default=None, gt=0, le=3_600)
    #: After cache_ttl, seconds an entry is still served (X-Cache: STALE) while one background
    #: refresh runs (stale-while-revalidate).
    stale_ttl: float = Field(default=0.0, ge=0, le=86_400)
    #: After cache_ttl, seconds an entry may replace an answer whose refresh failed
    #: (stale-if-error) instead of a 502/504.
    stale_if_error_ttl: float = Field(default=0.0, ge=0, le=604_800)
    #: Parameter sets `aggregator warm --all` fills before traffic arrives.
    warm: list[dict[str, ParamValue]] = Field(default_factory=list)
    #: Request headers the answer depends on (e.g. a tenant header an authenticating gateway
    #: sets): their values become part of the cache key, and requests with credentials may
    #: then share entries with requests of the same values (aggregator.cache.privacy).
    cache_vary: list[str] = Field(default_factory=list, max_length=8)

    @field_validator("params", mode="before")
    @classmethod
    def _short_params(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: {"type": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("params", mode="after")
    @classmethod
    def _param_names(cls, value: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not a valid parameter name")
        return value

    @field_validator("cache_vary", mode="after")
    @classmethod
    def _vary_names(cls, value: list[str]) -> list[str]:
        names = [name.lower() for name in value]
        for name in names:
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
                raise ValueError(f"{name!r} is not a header name (letters, digits and -)")
        if len(set(names)) != len(names):
            raise ValueError("lists a header twice")
        return names

    def typed_params(self, raw: Mapping[str, object]) -> dict[str, ParamValue]:
        """Values given outside a query string (JSON, TOML, `--param`); unknown names are errors."""
        return parameters.typed_params(self.params, raw)

    def parse_params(self, args: Mapping[str, list[str]]) -> dict[str, ParamValue]:
        """Typed parameters from a query string; unknown names are ignored."""
        return parameters.parse_params(self.params, args)


class AppConfig(_Strict):
    """The whole file: upstreams and the aggregates built from them."""

    upstreams: dict[str, UpstreamConfig]
    aggregates: dict[str, AggregateConfig]

    def forwarded_by(self, aggregate: str) -> tuple[str, ...]:
        """Lowercase client headers some source of `aggregate` forwards (its cache keys vary)."""
        sources = self.aggregates[aggregate].sources
        ups = self.upstreams
        return tuple(sorted({key for s in sources if s in ups for key in ups[s].forwarded_keys}))

    def vary_by(self, aggregate: str) -> tuple[str, ...]:
        """The headers `aggregate`'s cache entries vary by: its `cache_vary`, then every header
        its sources forward (an answer may depend on them, so they must be in the key)."""
        return self._vary_table[aggregate]

    @cached_property
    def _vary_table(self) -> dict[str, tuple[str, ...]]:
        table: dict[str, tuple[str, ...]] = {}
        for name, agg in self.aggregates.items():
            extra = (h for h in self.forwarded_by(name) if h not in agg.cache_vary)
            table[name] = (*agg.cache_vary, *extra)
        return table

    @cached_property
    def forwarded_anywhere(self) -> frozenset[bytes]:
        """Every forwarded header name as ASGI spells it (lowercase bytes), for the adapter."""
        return frozenset(
            key.encode("latin-1") for up in self.upstreams.values() for _, key in up.forwarded
        )

    @field_validator("upstreams", "aggregates", mode="after")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not re.fullmatch(_NAME, name):
                raise ValueError(f"{name!r} is not a valid name (letters, digits, _ and -)")
        return value


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def pydantic_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{_location(err['loc'])}: {msg.removeprefix('Value error, ')}")
    return problems


def check_config(config: AppConfig, source: str, *, views: Collection[str] = ()) -> None:
    """The checks across sections for a config assembled in code; ConfigError lists problems.

    `views` are aggregates written as views: they pass their sources' URL values themselves,
    so their parameters need not cover their sources' placeholders (nor their sources the
    sources a dotted placeholder names).
    """
    problems = _cross_problems(config, views=views)
    if problems:
        raise ConfigError(source, problems)


def _cross_problems(config: AppConfig, *, views: Collection[str] = ()) -> list[str]:
    """What single-field validation cannot see: references between sections."""
    problems: list[str] = []
    for name, up in config.upstreams.items():
        try:
            up.model  # noqa: B018 - imported once here so a bad schema stops start-up
        except Exception as exc:  # import errors of user code come in every shape
            problems.append(f"upstreams.{name}.schema: cannot load {up.schema_}: {exc}")
            continue
        try:
            up.fallback_data  # noqa: B018 - a fallback that would fail validation stops start-up
        except ValidationError as exc:
            for err in exc.errors(include_input=False, include_url=False):
                where = ".".join(str(p) for p in err["loc"])
                problems.append(
                    f"upstreams.{name}.fallback{'.' + where if where else ''}: {err['msg']} "
                    f"(it must match {up.schema_})"
                )
        problems += shape_problems(f"upstreams.{name}", up)
    problems += _graph_problems(config)
    paths: dict[str, str] = {}
    for name, agg in config.aggregates.items():
        where = f"aggregates.{name}"
        if agg.path in RESERVED_PATHS or agg.path.startswith(RESERVED_PREFIXES):
            problems.append(f"{where}.path: {agg.path} is reserved")
        elif agg.path in paths:
            problems.append(f"{where}.path: {agg.path} is already used by {paths[agg.path]}")
        paths.setdefault(agg.path, name)
        if len(set(agg.sources)) != len(agg.sources):
            problems.append(f"{where}.sources: lists a source twice")
        for source in agg.sources:
            up_cfg = config.upstreams.get(source)
            if up_cfg is None:
                known = ", ".join(sorted(config.upstreams)) or "none"
                problems.append(f"{where}.sources: unknown upstream {source!r} (known: {known})")
                continue
            missing = sorted(up_cfg.template.names - agg.params.keys())
            if missing and name not in views:
                problems.append(
                    f"{where}.params: upstream {source!r} needs "
                    f"{', '.join(missing)} but the aggregate has no such parameter"
                )
            for ref in [] if name in views else graph.outside(up_cfg, agg.sources):
                if ref.source in config.upstreams:  # (an unknown one is named once, above)
                    problems.append(
                        f"{where}.sources: upstream {source!r} needs {ref.text} but "
                        f"{ref.source!r} is not one of its sources"
                    )
        for source in agg.required:
            if source not in agg.sources:
                problems.append(f"{where}.required: {source!r} is not one of its sources")
        for i, target in enumerate(agg.warm):
            try:
                agg.typed_params(target)
            except InvalidRequestError as exc:
                problems.append(f"{where}.warm[{i}].{exc.field}: {exc.reason}")
    return problems


def _graph_problems(config: AppConfig) -> list[str]:
    """Dotted placeholders (`{profile.city}`) naming no upstream, and cycles among them."""
    problems: list[str] = []
    known = ", ".join(sorted(config.upstreams)) or "none"
    for name, up in config.upstreams.items():
        for ref in up.template.fields:
            if ref.source not in config.upstreams:
                problems.append(
                    f"upstreams.{name}.url: {{{ref.text}}} names an unknown upstream "
                    f"{ref.source!r} (known: {known})"
                )
    for cycle in graph.cycles(config):
        problems.append(
            f"upstreams.{cycle[0]}.url: its placeholders need each other in a cycle: "
            f"{' -> '.join(cycle)}"
        )
    return problems


def default_config_text() -> str:
    """The bundled demo config."""
    return resources.files("aggregator.demo").joinpath("config.toml").read_text("utf-8")


def parse_config(text: str, source: str, *, sources_only: bool = False) -> AppConfig:
    """Validate TOML text; ConfigError lists every problem with its key path.

    `sources_only`: the file may hold upstreams alone (the `Aggregator` extension's sources
    file, whose aggregates are views); a served config must have both sections.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    if sources_only:
        raw.setdefault("aggregates", {})
    try:
        config = AppConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(source, pydantic_problems(exc)) from None
    problems = _cross_problems(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: Path | None, *, sources_only: bool = False) -> AppConfig:
    """Load the file at `path`, or the bundled demo config when None."""
    if path is None:
        return parse_config(default_config_text(), "(bundled demo config)")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(str(path), [f"cannot read the file: {reason}"]) from None
    return parse_config(text, str(path), sources_only=sources_only)
