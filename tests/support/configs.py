"""TOML config builders shared by several test modules (each module keeps its own one-offs)."""

from __future__ import annotations

#: The five demo services of `five_sources_config`, and the query its /api/five needs.
SERVICES = ("weather", "stocks", "news", "profile", "recommendations")
QUERY = "city=Paris&user_id=7"


def five_sources_config(demo_url: str, *, delay: float = 0.2, deadline: float = 5.0) -> str:
    """An aggregate of five demo sources of `delay` seconds each, plus one of each failure."""
    services = {
        "weather": "/weather/{city}",
        "stocks": "/stocks/{user_id}",
        "news": "/news?topic=general",
        "profile": "/profile/{user_id}",
        "recommendations": "/recommendations/{user_id}",
    }
    lines = []
    for name, path in services.items():
        sep = "&" if "?" in path else "?"
        model = name.capitalize()
        lines += [
            f"[upstreams.{name}]",
            f'url = "{demo_url}{path}{sep}delay={delay}"',
            "timeout = 3.0",
            f'schema = "aggregator.demo.models:{model}"',
            "",
        ]
    lines += [
        "[aggregates.five]",
        'path = "/api/five"',
        f"sources = {list(services)!r}".replace("'", '"'),
        'required = ["profile"]',
        f"deadline = {deadline}",
        'params = { city = "str", user_id = "int" }',
        "",
    ]
    return "\n".join(lines)


def cached_config(demo_url: str, *, delay: float = 0.3, ttl: float = 30) -> str:
    """Five demo sources of `delay` seconds each, aggregated as /api/five and cached `ttl` s."""
    return five_sources_config(demo_url, delay=delay) + f"cache_ttl = {ttl}\n"


def url_for(i: int) -> str:
    """/api/five with a distinct key per `i`, so no in-process (near) cache answers for another."""
    return f"/api/five?city=Paris&user_id={i}"


def one_source_config(demo_url: str, *, delay: float = 0.05, ttl: float = 30) -> str:
    """/api/one: one demo source, cached; little CPU per request, for loop-lag measurements."""
    return f"""
[upstreams.weather]
url = "{demo_url}/weather/{{city}}?delay={delay}"
timeout = 3.0

[aggregates.one]
path = "/api/one"
sources = ["weather"]
params = {{ city = "str" }}
cache_ttl = {ttl}
"""


TRACED_CONFIG = """
[upstreams.echo]
url = "{demo}/echo/traced?delay={delay}"
timeout = 3.0

[upstreams.weather]
url = "{demo}/weather/{{city}}?delay=0.02"
timeout = 3.0
schema = "aggregator.demo.models:Weather"

[upstreams.flaky]
url = "{demo}/profile/7?status=503"
timeout = 3.0
retries = 2
retry_backoff = 0.01
breaker_failures = 0

[aggregates.traced]
path = "/api/traced"
sources = ["echo", "weather"]
params = {{ city = "str" }}
cache_ttl = 30

[aggregates.flaky]
path = "/api/flaky"
sources = ["flaky"]
"""


def traced_config(demo_url: str, *, delay: float = 0.0) -> str:
    """/api/traced (echo after `delay` s, weather after 0.02 s; cached) and /api/flaky (503s)."""
    return TRACED_CONFIG.format(demo=demo_url, delay=delay)


#: The metrics token of the servers that serve `shop_config`.
METRICS_TOKEN = "metrics-test-token-" + "x" * 24


def shop_config(demo_url: str, *, delay: float = 0.0) -> str:
    """`good` answers, `broken` always 503s and opens its breaker after two failures."""
    return f"""
[upstreams.good]
url = "{demo_url}/profile/{{user_id}}?delay={delay}"
timeout = 5.0
cache_ttl = 0

[upstreams.broken]
url = "{demo_url}/weather/{{city}}?delay=0&status=503"
timeout = 5.0
cache_ttl = 0
retries = 0
breaker_failures = 2
breaker_cooldown = 600

[aggregates.shop]
path = "/api/shop"
sources = ["good", "broken"]
required = ["good"]
params = {{ city = "str", user_id = "int" }}
cache_ttl = 60
cache_partial_ttl = 60
"""
