"""`aggregator status`: the numbers it derives, and the command against a live server."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from aggregator.demo.process import DemoProcess, free_port
from aggregator.errors import StatusError
from aggregator.ops import cli
from aggregator.ops.status.client import Buckets, metrics_url, parse
from tests.support.configs import METRICS_TOKEN as TOKEN
from tests.support.configs import shop_config
from tests.support.servers import Server

TEXT = """\
# TYPE aggregator_requests counter
aggregator_requests_total{aggregate="shop",status="200"} 8.0
aggregator_requests_total{aggregate="shop",status="502"} 2.0
# TYPE aggregator_cache_results counter
aggregator_cache_results_total{aggregate="shop",result="hit"} 6.0
aggregator_cache_results_total{aggregate="shop",result="miss"} 4.0
# TYPE aggregator_source_duration_seconds histogram
aggregator_source_duration_seconds_bucket{le="0.1",source="s"} 2.0
aggregator_source_duration_seconds_bucket{le="0.2",source="s"} 6.0
aggregator_source_duration_seconds_bucket{le="+Inf",source="s"} 6.0
aggregator_source_duration_seconds_count{source="s"} 6.0
# TYPE aggregator_source_errors counter
aggregator_source_errors_total{kind="timeout",source="s"} 1.0
aggregator_source_errors_total{kind="circuit_open",source="s"} 2.0
# TYPE aggregator_circuit_state gauge
aggregator_circuit_state{source="s",state="closed"} 1.0
aggregator_circuit_state{source="s",state="half_open"} 1.0
aggregator_circuit_state{source="s",state="open"} 0.0
# TYPE aggregator_requests_in_flight gauge
aggregator_requests_in_flight 3.0
"""


def test_parse_reduces_the_text_to_what_the_view_shows():
    snap = parse(TEXT, taken=0.0)
    assert snap.in_flight == 3
    source = snap.sources["s"]
    assert source.requests == 8  # 6 calls + 2 refused by the breaker
    assert source.errors == {"timeout": 1, "circuit_open": 2}
    assert source.circuit == "half_open"  # two workers: one closed, one half-open; the worst
    # rank 3 of 6 lies in (0.1, 0.2] holding 4 observations: 0.1 + 0.1 x (3 - 2) / 4
    median = source.calls.quantile(0.5)
    assert median is not None and math.isclose(median, 0.125)
    shop = snap.aggregates["shop"]
    assert shop.requests == 10 and shop.cache == {"hit": 6, "miss": 4}


def test_the_circuit_is_the_worst_state_a_series_says_one_for_and_old_numbers_still_read():
    lines = [
        "# TYPE aggregator_circuit_state gauge",
        'aggregator_circuit_state{source="a",state="closed"} 1.0',
        'aggregator_circuit_state{source="a",state="half_open"} 0.0',
        'aggregator_circuit_state{source="a",state="open"} 1.0',
        'aggregator_circuit_state{source="b",state="closed"} 1.0',
        'aggregator_circuit_state{source="b",state="open"} 0.0',
        'aggregator_circuit_state{source="old"} 2.0',
    ]
    snap = parse("\n".join(lines) + "\n", taken=0.0)
    assert {name: s.circuit for name, s in snap.sources.items()} == {
        "a": "open",
        "b": "closed",
        "old": "open",
    }


def test_quantiles_beyond_the_last_bucket_and_without_data():
    assert Buckets().quantile(0.5) is None
    assert Buckets({1.0: 1.0, math.inf: 4.0}, 4.0).quantile(0.9) == 1.0  # "at least 1 s"


def test_a_later_snapshot_minus_an_earlier_one_is_the_interval():
    earlier = parse(TEXT, taken=0.0)
    later = parse(TEXT.replace("} 8.0", "} 11.0").replace("} 6.0\n", "} 9.0\n", 1), taken=2.0)
    window = later.since(earlier)
    assert window is not None
    assert window.aggregates["shop"].statuses == {"200": 3, "502": 0}
    assert window.aggregates["shop"].cache == {"hit": 3, "miss": 0}
    restarted = earlier.since(later)  # counters went back: a restart, no interval
    assert restarted is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("# TYPE x counter\nx_total 1\n", "no aggregator metrics", id="other-app"),
        pytest.param("<html>sign in</html>", "not Prometheus text", id="html"),
    ],
)
def test_text_without_our_metrics_is_a_status_error(text, reason):
    with pytest.raises(StatusError, match=reason):
        parse(text)


@pytest.mark.parametrize(
    ("given", "scraped"),
    [
        ("http://h:8000", "http://h:8000/metrics"),
        ("http://h:8000/", "http://h:8000/metrics"),
        ("http://h:9100/metrics", "http://h:9100/metrics"),
        ("https://h/prefix/metrics", "https://h/prefix/metrics"),
    ],
)
def test_the_scrape_url(given, scraped):
    assert metrics_url(given) == scraped


# -- the command against a live server ------------------------------------------------------


def _row(output: str, first_cell: str) -> str:
    """The table row whose first cell is `first_cell`."""
    rows = [line for line in output.splitlines() if re.match(rf"│ {first_cell}\s+│", line)]
    assert len(rows) == 1, output
    return rows[0]


@pytest.mark.integration
def test_status_shows_sources_aggregates_and_circuits(
    runner: CliRunner,
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
) -> None:
    server = serve(write_config(shop_config(demo.url)), admin_token=TOKEN)
    with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as http:
        for user_id in (1, 1, 2, 3):  # miss, hit, miss (opens broken's breaker), refused
            assert http.get("/api/shop", params={"city": "X", "user_id": user_id}).is_success
    result = runner.invoke(cli.main, ["status", "--url", server.url, "--token", TOKEN])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"{server.url}/metrics" in out and "totals since the workers started" in out
    assert "in flight: 0" in out
    broken = _row(out, "broken")
    assert re.search(r"│ open\s+│\s+3 │", broken), broken  # 2 calls + 1 refused
    assert "3 (100.0%)" in broken and "circuit_open 1, http_status 2" in broken
    good = _row(out, "good")
    assert re.search(r"│ closed\s+│\s+3 │", good) and "0 (0.0%)" in good
    assert re.search(r"\d+ ms", good)  # a median from the histogram
    shop = _row(out, "shop")
    assert re.search(r"│\s+4 │", shop) and "200: 4" in shop
    assert "25.0%" in shop and "hit 1, miss 3" in shop


@pytest.mark.integration
def test_status_watch_shows_intervals_and_stops_after_count(
    runner: CliRunner,
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
) -> None:
    server = serve(write_config(shop_config(demo.url)), metrics="public")
    args = ["status", "--url", server.url, "--watch", "0.5", "--count", "2"]
    result = runner.invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("aggregates") == 2
    assert "totals since the workers started" in result.output
    assert re.search(r"last \d+\.\d s", result.output)


@pytest.mark.integration
def test_status_without_the_token_says_so_and_exits_1(
    runner: CliRunner,
    serve: Callable[..., Server],
    demo: DemoProcess,
    write_config: Callable[[str], Path],
) -> None:
    server = serve(write_config(shop_config(demo.url)), admin_token=TOKEN)
    result = runner.invoke(cli.main, ["status", "--url", server.url])
    assert result.exit_code == 1
    assert "answered 401 (no token given)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_status_against_nothing_exits_1_with_one_line(runner):
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(cli.main, ["status", "--url", url, "--token", "t"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"aggregator status: cannot reach {url}/metrics")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="no-url"),
        pytest.param(["--url", "ftp://host"], id="not-http"),
        pytest.param(["--url", "http://h", "--count", "2"], id="count-without-watch"),
        pytest.param(["--url", "http://h", "--watch", "0"], id="watch-too-short"),
    ],
)
def test_status_usage_errors_exit_2(runner, args):
    result = runner.invoke(cli.main, ["status", *args])
    assert result.exit_code == 2, result.output
