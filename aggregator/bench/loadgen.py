"""The built-in load generator, for machines without wrk: `python -m aggregator.bench.loadgen`.

It runs in its own process (so its CPU never hides inside the server's or the orchestrator's),
keeps exactly `concurrency` requests in flight on keep-alive connections, stops at the first of
`duration` or `requests`, and prints one JSON line: counts, latency percentiles and the CPU it
used itself. A generator that is busy most of the wall time is the bottleneck, not the server;
the result says so (`saturated`) and the report flags it. aiohttp's client is used because it is
already installed (httpx-aiohttp) and costs about half of httpx's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from ipaddress import ip_address
from urllib.parse import urlsplit

import aiohttp

#: CPU over wall time above which the generator, not the server, limits the numbers.
SATURATED = 0.9


class NotLoopbackError(ValueError):
    """Load is only ever sent to this machine: a guard against pointing a bench elsewhere."""


def check_loopback(url: str) -> None:
    """Refuse any URL whose host is not a loopback address (names are not resolved)."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise NotLoopbackError(f"refusing to send load to {host or url!r}: loopback only")


@dataclass(slots=True)
class LoadResult:
    """One load run as both generators report it (wrk's numbers are parsed into the same shape)."""

    tool: str
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    status_errors: int
    socket_errors: int
    timeouts: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    generator_cpu_s: float
    #: 2xx answers flagged `X-Aggregate-Complete: false` (a source failed): upstream trouble
    #: served as designed, so counted apart from errors.
    partial: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    #: 502/504 answers whose body names a `required` source as the failure (`--required`):
    #: what the config designs when such a source fails, so counted apart from other 5xx.
    designed_5xx: int = 0

    @property
    def unexpected(self) -> int:
        """Answers that are neither 2xx nor a designed 502/504, plus requests that got none."""
        return self.errors - self.designed_5xx

    @property
    def errors(self) -> int:
        """Every request that did not get a 2xx answer in time."""
        return self.status_errors + self.socket_errors + self.timeouts

    @property
    def rps(self) -> float:
        """Completed requests per second (errors included, as wrk counts them)."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def saturated(self) -> bool:
        """Whether the generator was CPU-bound (it is one process on one core)."""
        return self.duration_s > 0 and self.generator_cpu_s / self.duration_s > SATURATED

    def to_json(self) -> str:
        """The line the child prints for the parent to read."""
        return json.dumps(asdict(self))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (as wrk reports), so both generators agree on the definition."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def designed_failure(status: int, body: bytes, required: tuple[str, ...]) -> bool:
    """Whether a 502/504 is the designed answer to a failed required source (merge's rule).

    502: a required source failed and none by the deadline; 504: the deadline took one. The
    body (the envelope) must name that source in `errors`.
    """
    if status not in (502, 504) or not required:
        return False
    try:
        errors = json.loads(body).get("errors") or {}
        kinds = [errors[name]["kind"] for name in required if name in errors]
    except (ValueError, AttributeError, KeyError, TypeError):
        return False
    return bool(kinds) and (status == 504) == ("deadline" in kinds)


async def generate(
    url: str,
    concurrency: int,
    duration: float,
    requests: int | None,
    timeout: float,
    required: tuple[str, ...] = (),
) -> LoadResult:
    """Drive `url` with `concurrency` workers until the time or request budget runs out."""
    check_loopback(url)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counts = {"requests": 0, "ok": 0, "status": 0, "socket": 0, "timeout": 0, "partial": 0}
    counts["designed"] = 0
    budget = [requests if requests is not None else math.inf]
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    per_request = aiohttp.ClientTimeout(total=timeout)
    cpu_start = time.process_time()
    started = time.perf_counter()
    stop_at = started + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            sent = time.perf_counter()
            try:
                async with session.get(url, timeout=per_request) as response:
                    body = await response.read()
                    status = response.status
                    complete = response.headers.get("X-Aggregate-Complete") != "false"
            except TimeoutError:
                counts["timeout"] += 1
                continue
            except aiohttp.ClientError:
                counts["socket"] += 1
                continue
            latencies.append((time.perf_counter() - sent) * 1000)
            counts["requests"] += 1
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            counts["ok" if 200 <= status < 300 else "status"] += 1
            if not complete:
                counts["partial"] += 1
            if status >= 500 and designed_failure(status, body, required):
                counts["designed"] += 1

    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(
        tool="builtin",
        concurrency=concurrency,
        duration_s=elapsed,
        requests=counts["requests"],
        ok=counts["ok"],
        status_errors=counts["status"],
        socket_errors=counts["socket"],
        timeouts=counts["timeout"],
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        generator_cpu_s=time.process_time() - cpu_start,
        partial=counts["partial"],
        statuses=statuses,
        designed_5xx=counts["designed"],
    )


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run once, print the JSON result line; exit 2 on bad flags or a remote URL."""
    parser = argparse.ArgumentParser(prog="python -m aggregator.bench.loadgen")
    parser.add_argument("url")
    parser.add_argument("--concurrency", "-c", type=int, default=16)
    parser.add_argument("--duration", "-d", type=float, default=5.0, help="seconds, at most")
    parser.add_argument("--requests", "-n", type=int, default=None, help="stop after this many")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument(
        "--required",
        action="append",
        default=[],
        metavar="SOURCE",
        help="a required source: 502/504 naming it count as designed (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.timeout <= 0:
        parser.error("--concurrency must be >= 1, --duration and --timeout > 0")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be >= 1")
    try:
        check_loopback(args.url)
    except NotLoopbackError as exc:
        parser.error(str(exc))
    result = asyncio.run(
        generate(
            args.url,
            args.concurrency,
            args.duration,
            args.requests,
            args.timeout,
            tuple(args.required),
        )
    )
    print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
