"""compose.yaml, the local deployment (Redis + the demo upstreams + 2 replicas), is well formed.

Not started here (it needs a registry for the Redis image and a compose tool); what is checked is
what would make `docker compose up` come up wrong: the image and its commands, the settings'
names and values, the ports, the health checks the replicas wait for.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from aggregator.settings import Settings
from tests.support.paths import ROOT

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
REPLICAS = ["aggregator-1", "aggregator-2"]


#: Variables that are not Settings fields: `aggregator serve` and the demo config read it.
NOT_SETTINGS = {"AGGREGATOR_DEMO_URL"}


def _settings_of(service: dict[str, Any]) -> Settings:
    env = {
        k.removeprefix("AGGREGATOR_").lower(): v
        for k, v in service["environment"].items()
        if k not in NOT_SETTINGS
    }
    given = {k: v for k, v in env.items() if v is not None}  # null: from the shell, if set
    unknown = set(env) - set(Settings.model_fields)
    assert unknown == set(), f"not settings: {unknown}"
    return Settings(**given)


def test_redis_the_demo_and_two_replicas_of_the_image():
    assert set(SERVICES) == {"redis", "demo", *REPLICAS}
    image = SERVICES["demo"]["image"]
    for name in ["demo", *REPLICAS]:
        assert SERVICES[name]["build"] == "." and SERVICES[name]["image"] == image
    assert "command" not in SERVICES["aggregator-1"], "the replicas run the image's own CMD"
    assert SERVICES["redis"]["image"].startswith("docker.io/library/redis:")


def test_the_replicas_share_redis_and_use_the_demo_service():
    for name in REPLICAS:
        settings = _settings_of(SERVICES[name])
        assert settings.cache_type == "redis"
        assert re.fullmatch(r"redis://redis:6379/\d+", settings.cache_redis_url)
        demo_url = SERVICES[name]["environment"]["AGGREGATOR_DEMO_URL"]
        assert demo_url == "http://demo:8101"
        assert SERVICES[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "demo": {"condition": "service_healthy"},
        }
    assert SERVICES["aggregator-1"]["environment"] == SERVICES["aggregator-2"]["environment"]


def test_the_demo_listens_where_the_replicas_look_and_says_when_it_is_up():
    command = SERVICES["demo"]["command"]
    assert command[:2] == ["aggregator", "demo"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8101"
    check = " ".join(SERVICES["demo"]["healthcheck"]["test"])
    assert "127.0.0.1:8101/healthz" in check
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_ports_are_published_on_loopback_only_one_per_replica():
    published = [port for name in REPLICAS for port in SERVICES[name]["ports"]]
    assert published == ["127.0.0.1:8001:8000", "127.0.0.1:8002:8000"]
    assert all("ports" not in SERVICES[name] for name in ("redis", "demo"))


def test_replicas_get_longer_than_the_graceful_timeout_to_stop():
    for name in REPLICAS:
        grace = SERVICES[name]["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > 10.0  # hypercorn.toml's graceful_timeout
