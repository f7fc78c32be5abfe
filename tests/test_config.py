"""The TOML config: the bundled demo loads, every mistake is one readable error, env expansion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from aggregator.config import (
    AggregateConfig,
    AppConfig,
    check_config,
    load_config,
    parse_config,
)
from aggregator.errors import ConfigError, InvalidRequestError
from aggregator.ops.cli import main

WriteConfig = Callable[[str], Path]

SECRET = "s3cr3t-T0KEN-value"
SECOND_AGGREGATE = """
[aggregates.b]
path = "/api/b"
sources = ["x"]
params = { item = "str" }
"""

#: A second upstream `y`, its URL ending with the given text.
UPSTREAM_Y = """
[upstreams.y]
url = "http://127.0.0.1:9/y/{}"
"""


def toml(
    *,
    url: str = "http://127.0.0.1:9/items/{item}",
    upstream: str = "",
    params: str = '{ item = "str" }',
    aggregate: str = "",
    extra: str = "",
) -> str:
    """A small valid config (one upstream `x`, one aggregate `a`) with pieces swapped in."""
    return f"""
[upstreams.x]
url = "{url}"
{upstream}

[aggregates.a]
path = "/api/a"
sources = ["x"]
params = {params}
{aggregate}

{extra}
"""


def config_error(write_config: WriteConfig, text: str) -> tuple[ConfigError, Path]:
    path = write_config(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value, path


def test_bundled_demo_config_loads() -> None:
    config = load_config(None)

    assert list(config.upstreams) == ["weather", "stocks", "news", "profile", "recommendations"]
    dashboard = config.aggregates["dashboard"]
    assert dashboard.path == "/api/dashboard"
    assert dashboard.required == ["profile"]
    # The default of ${AGGREGATOR_DEMO_URL:-...} applies because clean_environ removed it.
    assert config.upstreams["weather"].url.startswith("http://127.0.0.1:8101/weather/")
    for upstream in config.upstreams.values():
        assert upstream.model is not None
        assert issubclass(upstream.model, BaseModel)
    params = dashboard.parse_params({"city": ["Paris"], "user_id": ["7"]})
    assert params == {"city": "Paris", "user_id": 7, "topic": "general", "reco_delay": 0.25}


def test_bundled_demo_config_follows_demo_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGGREGATOR_DEMO_URL", "http://10.1.2.3:9999")

    config = load_config(None)

    assert all(u.url.startswith("http://10.1.2.3:9999/") for u in config.upstreams.values())


def test_a_valid_config_file_loads(write_config: WriteConfig) -> None:
    config = load_config(write_config(toml(upstream="timeout = 2.5\nconnect_timeout = 0.5")))

    up = config.upstreams["x"]
    assert (up.timeout, up.connect_timeout, up.model) == (2.5, 0.5, None)
    assert up.template.names == {"item"}
    assert config.aggregates["a"].deadline == 10.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            toml(upstream="timout = 1.0"), "upstreams.x.timout: unknown key", id="unknown-key"
        ),
        pytest.param(
            toml(aggregate="dedline = 1.0"),
            "aggregates.a.dedline: unknown key",
            id="unknown-aggregate-key",
        ),
        pytest.param(
            toml(extra="[cache]\nttl = 1"), "cache: unknown key", id="unknown-top-level-key"
        ),
        pytest.param(
            toml(url="http://{host}/x", params="{ host = 'str' }"),
            "upstreams.x.url: placeholders may not appear in the scheme or host part",
            id="placeholder-in-host",
        ),
        pytest.param(
            toml(url="http://127.0.0.1:{port}/x", params="{ port = 'int' }"),
            "upstreams.x.url: placeholders may not appear in the scheme or host part",
            id="placeholder-in-port",
        ),
        pytest.param(
            toml(url="{scheme}://127.0.0.1/x", params="{ scheme = 'str' }"),
            "upstreams.x.url: must start with http:// or https://",
            id="placeholder-in-scheme",
        ),
        pytest.param(
            toml(url="ftp://127.0.0.1/items/{item}"),
            "upstreams.x.url: must start with http:// or https://",
            id="non-http-scheme",
        ),
        pytest.param(
            toml(url="http://127.0.0.1/items/{item}#top"),
            "upstreams.x.url: must not contain a #fragment",
            id="fragment",
        ),
        pytest.param(
            toml().replace('sources = ["x"]', 'sources = ["x", "nope"]'),
            "aggregates.a.sources: unknown upstream 'nope' (known: x)",
            id="unknown-source",
        ),
        pytest.param(
            toml().replace('sources = ["x"]', 'sources = ["x", "x"]'),
            "aggregates.a.sources: lists a source twice",
            id="source-twice",
        ),
        pytest.param(
            toml(aggregate='required = ["y"]'),
            "aggregates.a.required: 'y' is not one of its sources",
            id="required-not-a-source",
        ),
        pytest.param(
            toml(params="{ other = 'str' }"),
            "aggregates.a.params: upstream 'x' needs item but the aggregate has no such parameter",
            id="placeholder-without-param",
        ),
        pytest.param(
            toml(
                url="http://127.0.0.1:9/items/{item}/{y.id}", extra=UPSTREAM_Y.format("{x.id}")
            ).replace('sources = ["x"]', 'sources = ["x", "y"]'),
            "upstreams.x.url: its placeholders need each other in a cycle: x -> y -> x",
            id="dependency-cycle",
        ),
        pytest.param(
            toml(url="http://127.0.0.1:9/items/{item}/{x.id}"),
            "upstreams.x.url: its placeholders need each other in a cycle: x -> x",
            id="dependency-on-itself",
        ),
        pytest.param(
            toml(url="http://127.0.0.1:9/items/{item}?city={nope.city}"),
            "upstreams.x.url: {nope.city} names an unknown upstream 'nope' (known: x)",
            id="dependency-unknown-source",
        ),
        pytest.param(
            toml(url="http://127.0.0.1:9/items/{item}?city={y.city}", extra=UPSTREAM_Y.format("")),
            "aggregates.a.sources: upstream 'x' needs y.city but 'y' is not one of its sources",
            id="dependency-outside-the-aggregate",
        ),
        pytest.param(
            toml(upstream='schema = "no_such_module_for_tests:Model"'),
            "upstreams.x.schema: cannot load no_such_module_for_tests:Model: "
            "No module named 'no_such_module_for_tests'",
            id="schema-module-missing",
        ),
        pytest.param(
            toml(upstream='schema = "aggregator.demo.models:NoSuchModel"'),
            "upstreams.x.schema: cannot load aggregator.demo.models:NoSuchModel",
            id="schema-attribute-missing",
        ),
        pytest.param(
            toml(upstream='schema = "aggregator.config:parse_config"'),
            "upstreams.x.schema: cannot load aggregator.config:parse_config: "
            "aggregator.config:parse_config is not a pydantic model",
            id="schema-not-a-model",
        ),
        pytest.param(
            toml(upstream='schema = "Weather"'),
            "upstreams.x.schema: String should match pattern",
            id="schema-without-colon",
        ),
        pytest.param(
            toml(extra=SECOND_AGGREGATE.replace("/api/b", "/api/a")),
            "aggregates.b.path: /api/a is already used by a",
            id="duplicate-path",
        ),
        pytest.param(
            toml().replace('path = "/api/a"', 'path = "/healthz"'),
            "aggregates.a.path: /healthz is reserved",
            id="reserved-path",
        ),
        pytest.param(
            toml().replace('path = "/api/a"', 'path = "/admin/purge"'),
            "aggregates.a.path: /admin/purge is reserved",
            id="reserved-admin-path",
        ),
        pytest.param(
            toml().replace('path = "/api/a"', 'path = "/sync/api/a"'),
            "aggregates.a.path: /sync/api/a is reserved",
            id="reserved-sync-twin-path",
        ),
        pytest.param(
            toml().replace('path = "/api/a"', 'path = "/sync-pool/x"'),
            "aggregates.a.path: /sync-pool/x is reserved",
            id="reserved-sync-pool-twin-path",
        ),
        pytest.param(
            toml().replace('path = "/api/a"', 'path = "/sync"'),
            "aggregates.a.path: /sync is reserved",
            id="reserved-sync-root",
        ),
        pytest.param(
            toml().replace('path = "/api/a"', 'path = "/"'),
            "aggregates.a.path: / is reserved",
            id="reserved-dashboard-page",
        ),
        pytest.param(
            toml().replace('path = "/api/a"', 'path = "/status"'),
            "aggregates.a.path: /status is reserved",
            id="reserved-status",
        ),
        pytest.param(
            toml().replace('path = "/api/a"', 'path = "/static/app.js"'),
            "aggregates.a.path: /static/app.js is reserved",
            id="reserved-dashboard-assets",
        ),
        pytest.param(
            toml().replace('path = "/api/a"', 'path = "api/a"'),
            "aggregates.a.path: String should match pattern",
            id="path-without-slash",
        ),
        pytest.param(
            toml(params='{ item = "string" }'),
            "aggregates.a.params.item.type: Input should be 'str', 'int', 'float' or 'bool'",
            id="bad-param-type",
        ),
        pytest.param(
            toml(params='{ item = "str", n = { type = "int", default = "ten" } }'),
            "aggregates.a.params.n: must be an integer",
            id="default-not-int",
        ),
        pytest.param(
            toml(params='{ item = "str", on = { type = "bool", default = "maybe" } }'),
            "aggregates.a.params.on: must be a boolean",
            id="default-not-bool",
        ),
        pytest.param(
            toml(params='{ item = { type = "str", default = 3 } }'),
            "aggregates.a.params.item: must be a string",
            id="default-not-str",
        ),
        pytest.param(
            toml(params='{ item = "str", f = { type = "float", default = nan } }'),
            "aggregates.a.params.f: must be a finite number",
            id="default-nan",
        ),
        pytest.param(
            toml(params='{ "bad-name" = "str", item = "str" }'),
            "aggregates.a.params: 'bad-name' is not a valid parameter name",
            id="bad-param-name",
        ),
        pytest.param(
            toml(upstream="timeout = 0"),
            "upstreams.x.timeout: Input should be greater than 0",
            id="timeout-zero",
        ),
        pytest.param(
            toml(upstream="timeout = -1.5"),
            "upstreams.x.timeout: Input should be greater than 0",
            id="timeout-negative",
        ),
        pytest.param(
            toml(upstream="connect_timeout = 0"),
            "upstreams.x.connect_timeout: Input should be greater than 0",
            id="connect-timeout-zero",
        ),
        pytest.param(
            toml(aggregate="deadline = 0"),
            "aggregates.a.deadline: Input should be greater than 0",
            id="deadline-zero",
        ),
        pytest.param(
            toml(upstream='timeout = "5"'),
            "upstreams.x.timeout: Input should be a valid number",
            id="timeout-numeric-string-is-not-coerced",
        ),
        pytest.param(
            toml(upstream='timeout = "soon"'),
            "upstreams.x.timeout: Input should be a valid number",
            id="timeout-string",
        ),
        pytest.param(
            toml().replace("[upstreams.x]", "[upstreams.'x y']").replace('["x"]', "['x y']"),
            "upstreams: 'x y' is not a valid name",
            id="bad-upstream-name",
        ),
        pytest.param(
            toml(upstream='headers = { "Bad Header" = "1" }'),
            "upstreams.x.headers: 'Bad Header' is not a valid header name",
            id="bad-header-name",
        ),
        pytest.param(
            '[upstreams.x]\nurl = = "http://h/"\n',
            "not valid TOML: Invalid value (at line 2, column 7)",
            id="invalid-toml",
        ),
    ],
)
def test_each_mistake_is_one_readable_error(
    write_config: WriteConfig, text: str, expected: str
) -> None:
    error, path = config_error(write_config, text)

    assert len(error.problems) == 1, error.problems
    assert error.source == str(path)
    message = str(error)
    assert message.startswith(f"invalid config {path}: ")
    assert expected in message
    assert "\n" not in message
    assert "Value error" not in message
    assert "https://errors.pydantic.dev" not in message


def test_dependent_sources_load(write_config: WriteConfig) -> None:
    config = load_config(
        write_config(
            """
[upstreams.x]
url = "http://127.0.0.1:9/items/{y.city}?team={y.team.id}&n={y.teams.0.id}"

[upstreams.y]
url = "http://127.0.0.1:9/y/{item}"

[aggregates.a]
path = "/api/a"
sources = ["x", "y"]
params = { item = "str" }
"""
        )
    )

    template = config.upstreams["x"].template
    assert template.names == frozenset()  # a field of an answer is no parameter
    assert template.sources == {"y"}
    assert [ref.text for ref in template.fields] == ["y.city", "y.team.id", "y.teams.0.id"]


def test_a_shared_dependent_upstream_needs_its_source_in_every_aggregate(
    write_config: WriteConfig,
) -> None:
    # x needs y: fine in `a` (both) and `b` (both), not in `c` (x alone).
    third = SECOND_AGGREGATE.replace("[aggregates.b]", "[aggregates.c]").replace("/api/b", "/api/c")
    text = toml(
        url="http://127.0.0.1:9/items/{item}?city={y.city}",
        extra=UPSTREAM_Y.format("") + SECOND_AGGREGATE.replace('["x"]', '["y", "x"]') + third,
    ).replace('sources = ["x"]', 'sources = ["x", "y"]', 1)

    error, _ = config_error(write_config, text)

    assert error.problems == [
        "aggregates.c.sources: upstream 'x' needs y.city but 'y' is not one of its sources"
    ]


def test_a_view_may_use_a_dependent_upstream_without_the_source_it_names() -> None:
    # A view passes its sources' URL values itself (`profile.city` included): only the file's
    # aggregates must hold the sources their dotted placeholders name.
    config = AppConfig.model_validate(
        {
            "upstreams": {"x": {"url": "http://127.0.0.1:9/w/{y.city}"}, "y": {"url": "http://h/"}},
            "aggregates": {"a": {"path": "/api/a", "sources": ["x"]}},
        }
    )

    check_config(config, "views", views={"a"})
    with pytest.raises(ConfigError, match="'y' is not one of its sources"):
        check_config(config, "aggregates")


def test_every_dependency_problem_is_one_line(write_config: WriteConfig) -> None:
    text = toml(
        url="http://127.0.0.1:9/items/{item}/{y.id}?z={zz.a}&w={w.a}",
        extra=UPSTREAM_Y.format("{x.id}") + UPSTREAM_Y.replace("y", "w").format("{w.b.c}"),
    )

    error, path = config_error(write_config, text)

    assert str(error).splitlines() == [
        f"invalid config {path}:",
        "  - upstreams.x.url: {zz.a} names an unknown upstream 'zz' (known: w, x, y)",
        "  - upstreams.x.url: its placeholders need each other in a cycle: x -> y -> x",
        "  - upstreams.w.url: its placeholders need each other in a cycle: w -> w",
        "  - aggregates.a.sources: upstream 'x' needs y.id but 'y' is not one of its sources",
        "  - aggregates.a.sources: upstream 'x' needs w.a but 'w' is not one of its sources",
    ]


def test_several_mistakes_are_listed_one_per_line(write_config: WriteConfig) -> None:
    error, path = config_error(
        write_config, toml(upstream="timout = 1\ntimeout = 0", aggregate="dedline = 1")
    )

    assert str(error).splitlines() == [
        f"invalid config {path}:",
        "  - upstreams.x.timeout: Input should be greater than 0",
        "  - upstreams.x.timout: unknown key",
        "  - aggregates.a.dedline: unknown key",
    ]


def test_empty_file_names_both_sections(write_config: WriteConfig) -> None:
    error, _ = config_error(write_config, "")

    assert error.problems == ["upstreams: Field required", "aggregates: Field required"]


def test_invalid_toml_names_the_line(write_config: WriteConfig) -> None:
    error, _ = config_error(write_config, 'a = 1\n\n[upstreams.x\nurl = "http://h/"\n')

    assert "not valid TOML" in str(error)
    assert "line 3" in str(error)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert str(info.value) == (
        f"invalid config {path}: cannot read the file: No such file or directory"
    )


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path)


def test_file_that_is_not_utf8(write_config: WriteConfig) -> None:
    path = write_config("")
    path.write_bytes(b"\xff\xfe[upstreams]")

    with pytest.raises(ConfigError, match=r"cannot read the file: 'utf-8' codec"):
        load_config(path)


def test_config_error_repr_names_source_and_problems() -> None:
    error = ConfigError("f.toml", ["upstreams.x.timout: unknown key"])

    assert repr(error) == (
        "ConfigError(source='f.toml', problems=['upstreams.x.timout: unknown key'])"
    )


# --- ${VAR} expansion --------------------------------------------------------------------------


def test_env_var_in_url_and_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_BASE", "https://api.example.com:8443/v2")
    monkeypatch.setenv("TEST_UPSTREAM_TOKEN", SECRET)

    config = parse_config(
        toml(
            url="${TEST_UPSTREAM_BASE}/items/{item}",
            upstream='headers = { Authorization = "Bearer ${TEST_UPSTREAM_TOKEN}", X-Fixed = "1" }',
        ),
        "t.toml",
    )

    up = config.upstreams["x"]
    assert up.url == "https://api.example.com:8443/v2/items/{item}"
    assert up.template.origin == "https://api.example.com:8443"
    assert up.headers == {"Authorization": f"Bearer {SECRET}", "X-Fixed": "1"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param(None, "http://default.test:1", id="unset-uses-default"),
        pytest.param("http://set.test:2", "http://set.test:2", id="set-wins"),
        pytest.param("", "http://default.test:1", id="empty-uses-default"),
    ],
)
def test_env_var_default(monkeypatch: pytest.MonkeyPatch, env: str | None, expected: str) -> None:
    if env is not None:
        monkeypatch.setenv("TEST_UPSTREAM_BASE", env)

    config = parse_config(toml(url="${TEST_UPSTREAM_BASE:-http://default.test:1}/{item}"), "t")

    assert config.upstreams["x"].url == f"{expected}/{{item}}"


def test_env_var_with_empty_default(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(toml(upstream='headers = { X-Tenant = "${TEST_TENANT:-}" }'), "t")

    assert config.upstreams["x"].headers == {"X-Tenant": ""}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param(toml(url="${TEST_MISSING_BASE}/{item}"), "upstreams.x.url", id="url"),
        pytest.param(
            toml(upstream='headers = { Authorization = "Bearer ${TEST_MISSING_BASE}" }'),
            "upstreams.x.headers",
            id="header",
        ),
    ],
)
def test_missing_env_var_is_named(write_config: WriteConfig, text: str, key: str) -> None:
    error, path = config_error(write_config, text)

    assert error.problems == [f"{key}: environment variable TEST_MISSING_BASE is not set"]
    assert str(path) in str(error)


@pytest.mark.parametrize(
    ("secret", "text", "expected"),
    [
        pytest.param(
            SECRET,
            toml(
                upstream='timout = 1\nheaders = { Authorization = "Bearer ${TEST_UPSTREAM_TOKEN}" }'
            ),
            "upstreams.x.timout: unknown key",
            id="other-key-invalid",
        ),
        pytest.param(
            SECRET,
            toml(
                upstream='headers = { Authorization = "Bearer ${TEST_UPSTREAM_TOKEN}" }',
                extra='[upstreams.y]\nurl = "http://h/${TEST_MISSING_BASE}"',
            ),
            "upstreams.y.url: environment variable TEST_MISSING_BASE is not set",
            id="other-upstream-invalid",
        ),
        pytest.param(
            SECRET,
            toml(
                upstream='headers = { Authorization = "Bearer ${TEST_UPSTREAM_TOKEN}" }',
                params="{}",
            ),
            "aggregates.a.params: upstream 'x' needs item",
            id="cross-check-invalid",
        ),
        pytest.param(
            f"{SECRET}\r\nX-Injected: 1",
            toml(upstream='headers = { Authorization = "${TEST_UPSTREAM_TOKEN}" }'),
            "upstreams.x.headers: value of header Authorization contains a line break",
            id="secret-itself-invalid",
        ),
    ],
)
def test_secret_header_never_in_config_error(
    monkeypatch: pytest.MonkeyPatch,
    write_config: WriteConfig,
    secret: str,
    text: str,
    expected: str,
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_TOKEN", secret)

    error, _ = config_error(write_config, text)

    assert expected in str(error)
    for shown in (str(error), repr(error), *error.problems, *map(str, error.args)):
        assert SECRET not in shown
    # A chained pydantic ValidationError would print the input values in a traceback.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


# --- AggregateConfig.parse_params --------------------------------------------------------------


@pytest.fixture
def aggregate() -> AggregateConfig:
    return AggregateConfig.model_validate(
        {
            "path": "/api/a",
            "sources": ["x"],
            "params": {
                "city": "str",
                "user_id": "int",
                "ratio": {"type": "float", "default": 1},
                "verbose": {"type": "bool", "default": "off"},
                "topic": {"type": "str", "default": "general"},
                "limit": {"type": "int", "default": 10},
            },
        }
    )


def test_parse_params_applies_typed_defaults(aggregate: AggregateConfig) -> None:
    params = aggregate.parse_params({"city": ["Paris"], "user_id": ["7"]})

    assert params == {
        "city": "Paris",
        "user_id": 7,
        "ratio": 1.0,
        "verbose": False,
        "topic": "general",
        "limit": 10,
    }
    assert type(params["ratio"]) is float
    assert type(params["user_id"]) is int
    assert type(params["verbose"]) is bool


def test_parse_params_empty_value_of_an_optional_param_means_its_default(
    aggregate: AggregateConfig,
) -> None:
    # `?topic=&ratio=` is what a dashboard sends for unset filters: not an error
    values = aggregate.parse_params({"city": ["a"], "user_id": ["1"], "topic": [""], "ratio": [""]})
    assert values["topic"] == "general"
    assert values["ratio"] == 1.0


def test_parse_params_converts_given_values(aggregate: AggregateConfig) -> None:
    params = aggregate.parse_params(
        {
            "city": ["Zürich ../"],
            "user_id": ["-42"],
            "ratio": ["2.5e1"],
            "verbose": ["YES"],
            "topic": ["x"],
            "limit": ["+3"],
            "unknown": ["ignored"],
        }
    )

    assert params == {
        "city": "Zürich ../",
        "user_id": -42,
        "ratio": 25.0,
        "verbose": True,
        "topic": "x",
        "limit": 3,
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("true", True, id="true"),
        pytest.param("1", True, id="one"),
        pytest.param("On", True, id="on"),
        pytest.param("false", False, id="false"),
        pytest.param("0", False, id="zero"),
        pytest.param("no", False, id="no"),
    ],
)
def test_parse_params_booleans(aggregate: AggregateConfig, value: str, expected: bool) -> None:
    params = aggregate.parse_params({"city": ["c"], "user_id": ["1"], "verbose": [value]})

    assert params["verbose"] is expected


@pytest.mark.parametrize(
    ("args", "field", "reason"),
    [
        pytest.param({"user_id": ["7"]}, "city", "required str parameter is missing", id="missing"),
        pytest.param({"city": [], "user_id": ["7"]}, "city", "missing", id="missing-empty-list"),
        pytest.param({"city": ["Paris"]}, "user_id", "required int parameter", id="missing-int"),
        pytest.param({"city": [""], "user_id": ["7"]}, "city", "must not be empty", id="empty"),
        pytest.param(
            {"city": ["x" * 1025], "user_id": ["7"]}, "city", "at most 1024", id="too-long"
        ),
        pytest.param(
            {"city": ["a", "b"], "user_id": ["7"]}, "city", "given more than once", id="twice"
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["7", "7"]},
            "user_id",
            "given more than once",
            id="twice-int",
        ),
        pytest.param({"city": ["a"], "user_id": ["seven"]}, "user_id", "integer", id="int-word"),
        pytest.param({"city": ["a"], "user_id": ["7.5"]}, "user_id", "integer", id="int-decimal"),
        pytest.param({"city": ["a"], "user_id": [""]}, "user_id", "integer", id="int-empty"),
        pytest.param({"city": ["a"], "user_id": ["1e3"]}, "user_id", "integer", id="int-exponent"),
        pytest.param({"city": ["a"], "user_id": ["9" * 19]}, "user_id", "integer", id="int-huge"),
        pytest.param(
            {"city": ["a"], "user_id": ["1"], "ratio": ["abc"]}, "ratio", "number", id="float-word"
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["1"], "ratio": ["nan"]}, "ratio", "finite", id="float-nan"
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["1"], "ratio": ["inf"]}, "ratio", "finite", id="float-inf"
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["1"], "ratio": ["-Infinity"]},
            "ratio",
            "finite",
            id="float-minus-inf",
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["\u0661\u0662"]}, "user_id", "integer", id="int-non-ascii"
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["1"], "ratio": ["1_000"]},
            "ratio",
            "number",
            id="float-underscore",
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["1"], "ratio": ["\u0661.5"]},
            "ratio",
            "number",
            id="float-non-ascii",
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["1"], "ratio": ["1e400"]},
            "ratio",
            "finite",
            id="float-overflow",
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["1"], "verbose": ["maybe"]},
            "verbose",
            "must be a boolean",
            id="bool-word",
        ),
        pytest.param(
            {"city": ["a"], "user_id": ["1"], "verbose": ["2"]},
            "verbose",
            "must be a boolean",
            id="bool-two",
        ),
        pytest.param(
            {"city": [""], "user_id": ["1"]}, "city", "must not be empty", id="empty-required"
        ),
    ],
)
def test_parse_params_rejects(
    aggregate: AggregateConfig, args: dict[str, list[str]], field: str, reason: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        aggregate.parse_params(args)

    assert info.value.field == field
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.status == 400


# --- check-config --------------------------------------------------------------------------------


def test_check_config_ok(runner: CliRunner, write_config: WriteConfig) -> None:
    path = write_config(toml())

    result = runner.invoke(main, ["check-config", str(path)])

    assert result.exit_code == 0, result.output
    assert result.output == f"{path}: ok (1 upstreams, 1 aggregates: /api/a)\n"


def test_check_config_bundled_demo_file(runner: CliRunner) -> None:
    path = Path(__file__).resolve().parent.parent / "aggregator" / "demo" / "config.toml"

    result = runner.invoke(main, ["check-config", str(path)])

    assert result.exit_code == 0, result.output
    assert "ok (5 upstreams, 1 aggregates: /api/dashboard)" in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(toml(upstream="timout = 1"), "upstreams.x.timout: unknown key", id="key"),
        pytest.param("[upstreams", "not valid TOML", id="toml"),
        pytest.param(
            toml(upstream='schema = "no_such_module_for_tests:M"'),
            "cannot load no_such_module_for_tests:M",
            id="schema",
        ),
    ],
)
def test_check_config_bad_file(
    runner: CliRunner, write_config: WriteConfig, text: str, expected: str
) -> None:
    path = write_config(text)

    result = runner.invoke(main, ["check-config", str(path)])

    assert result.exit_code == 1
    assert result.output.startswith(f"invalid config {path}: ")
    assert expected in result.output
    assert "ok (" not in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_check_config_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["check-config", str(tmp_path / "missing.toml")])

    assert result.exit_code == 1
    assert "cannot read the file: No such file or directory" in result.output
    assert "Traceback" not in result.output
