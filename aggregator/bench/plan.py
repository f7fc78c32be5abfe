"""What a bench run compares: server configurations ("targets") and the upstream workload.

A target is written `SERVER:VIEW[:ENGINE][+FLAG...]`, e.g. `loop:async:aiohttp`,
`gunicorn:sync-pool`, `fastapi:async:httpx`, `loop:async:aiohttp+cached+asyncio`:

- SERVER: `loop`, `threads`, `serial` (our Hypercorn serving modes; `serial` is the stock asgiref
  recipe), `gunicorn` (a classic WSGI server with threads, for the sync twins) or `fastapi`
  (the FastAPI + uvicorn reference, async only);
- VIEW: `async` (the real views), `sync` (sources one after another on a shared `httpx.Client`)
  or `sync-pool` (the same client from a thread pool);
- ENGINE: the async views' connection engine, `aiohttp` (default) or `httpx`; the sync twins
  always use httpx's blocking client, so they take none;
- `+cached`: the aggregate is cached for an hour, so after the warm-up every request is a hit;
- `+metrics`: Prometheus metrics recorded (AGGREGATOR_METRICS=public); without it they are off,
  so `loop:async+cached` against `loop:async+cached+metrics` is their cost on the hit path;
- `+asyncio` / `+uvloop`: the event loop of an async server (Hypercorn's worker class, uvicorn's
  `--loop`); without it each server runs on its own default (uvloop when installed);
- `+gc` / `+pygc`: the garbage collector. Our Hypercorn servers ship aggregator's GC tuning
  (`AGGREGATOR_GC_THRESHOLD`, see `aggregator.gc_tuning`); `+pygc` runs them on Python's defaults
  to show what it is worth. The FastAPI reference runs on Python's defaults, as its users would;
  `+gc` gives it the same tuning, so a comparison can separate framework from GC.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

Server = Literal["loop", "threads", "serial", "gunicorn", "fastapi"]
View = Literal["async", "sync", "sync-pool"]
SERVERS: tuple[Server, ...] = ("loop", "threads", "serial", "gunicorn", "fastapi")
VIEWS: tuple[View, ...] = ("async", "sync", "sync-pool")
ENGINES = ("aiohttp", "httpx")
EVENT_LOOPS = ("asyncio", "uvloop")
GC_FLAGS = {"gc": "tuned", "pygc": "python"}
GcMode = Literal["tuned", "python"]
HYPERCORN_SERVERS = frozenset({"loop", "threads", "serial"})
#: The package an optional server needs, and the extra that brings it.
_OPTIONAL = {"gunicorn": "gunicorn", "fastapi": "fastapi", "uvloop": "uvloop"}

UNCACHED_PATH = "/bench"
CACHED_PATH = "/bench-cached"
QUERY = "city=Paris&user_id=7"
DEMO_SERVICES = ("weather", "stocks", "news", "profile", "recommendations")


class PlanError(ValueError):
    """A target or workload the bench cannot run; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Target:
    """One server configuration under test."""

    server: Server
    view: View
    engine: str | None = None
    cached: bool = False
    event_loop: str | None = None
    #: None: the server's own default (ours tuned, FastAPI and gunicorn Python's).
    gc: GcMode | None = None
    metrics: bool = False

    @property
    def name(self) -> str:
        """The spelling the user gave (normalized), used in tables, files and charts."""
        engine = f":{self.engine}" if self.engine else ""
        flags = (
            ("+cached" if self.cached else "")
            + (f"+{self.event_loop}" if self.event_loop else "")
            + ("+metrics" if self.metrics else "")
        )
        if self.gc is not None:
            flags += "+gc" if self.gc == "tuned" else "+pygc"
        return f"{self.server}:{self.view}{engine}{flags}"

    @property
    def path(self) -> str:
        """The request path (with query) this target is loaded on."""
        base = CACHED_PATH if self.cached else UNCACHED_PATH
        prefix = {"async": "", "sync": "/sync", "sync-pool": "/sync-pool"}[self.view]
        return f"{prefix}{base}?{QUERY}"

    def missing_package(self) -> str | None:
        """The optional package this target needs and is not installed, if any."""
        for need in (self.server, self.event_loop):
            package = _OPTIONAL.get(need or "")
            if package and importlib.util.find_spec(package) is None:
                return package
        return None


def parse_target(text: str) -> Target:
    """Parse `SERVER:VIEW[:ENGINE][+FLAG...]`, refusing combinations that do not exist."""
    base, *flags = text.strip().split("+")
    unknown = set(flags) - {"cached", "metrics", *EVENT_LOOPS, *GC_FLAGS}
    if unknown or len(flags) != len(set(flags)):
        raise PlanError(
            f"target {text!r}: flags are +cached, +metrics, +asyncio, +uvloop, +gc or +pygc, "
            "once each"
        )
    cached, metrics = "cached" in flags, "metrics" in flags
    loops = [f for f in flags if f in EVENT_LOOPS]
    if len(loops) > 1:
        raise PlanError(f"target {text!r}: one event loop at most")
    event_loop = loops[0] if loops else None
    gcs = [GC_FLAGS[f] for f in flags if f in GC_FLAGS]
    if len(gcs) > 1:
        raise PlanError(f"target {text!r}: +gc or +pygc, not both")
    gc: GcMode | None = gcs[0] if gcs else None  # type: ignore[assignment]
    parts = base.split(":")
    if len(parts) not in (2, 3):
        raise PlanError(f"target {text!r}: expected SERVER:VIEW[:ENGINE][+FLAG...]")
    server, view = parts[0], parts[1]
    engine = parts[2] if len(parts) == 3 else None
    if server not in SERVERS:
        raise PlanError(f"target {text!r}: server must be one of {', '.join(SERVERS)}")
    if view not in VIEWS:
        raise PlanError(f"target {text!r}: view must be one of {', '.join(VIEWS)}")
    if view == "async":
        engine = engine or "aiohttp"
        if engine not in ENGINES:
            raise PlanError(f"target {text!r}: engine must be one of {', '.join(ENGINES)}")
    elif engine is not None:
        raise PlanError(f"target {text!r}: sync views use httpx's blocking client; drop the engine")
    if server == "gunicorn" and view == "async":
        raise PlanError(f"target {text!r}: gunicorn serves the sync twins (sync or sync-pool)")
    if server == "fastapi" and view != "async":
        raise PlanError(f"target {text!r}: the FastAPI reference is async only")
    if cached and (view != "async" or server == "fastapi"):
        raise PlanError(f"target {text!r}: only our async views are cached")
    if event_loop and server == "gunicorn":
        raise PlanError(f"target {text!r}: gunicorn's threads have no event loop to choose")
    if gc is not None and server == "gunicorn":
        raise PlanError(f"target {text!r}: GC tuning applies to the ASGI servers only")
    if metrics and server == "fastapi":
        raise PlanError(f"target {text!r}: the FastAPI reference records no metrics")
    return Target(server, view, engine, cached, event_loop, gc, metrics)


#: Everything the issue asks to compare; optional servers are dropped when not installed.
DEFAULT_TARGETS = (
    "loop:async:aiohttp",
    "loop:async:aiohttp+pygc",
    "threads:async:aiohttp",
    "serial:async:aiohttp",
    "loop:async:httpx",
    "loop:sync",
    "loop:sync-pool",
    "gunicorn:sync-pool",
    "fastapi:async:aiohttp",
    "fastapi:async:aiohttp+gc",
    "fastapi:async:httpx",
    "loop:async:aiohttp+cached",
)


@dataclass(frozen=True, slots=True)
class Workload:
    """The upstreams every target aggregates: K demo sources with the same latency profile."""

    sources: int = 5
    latency: float = 0.1
    jitter: float = 0.0
    failure_rate: float = 0.0
    #: Chance that an upstream call stalls until the caller times out (the demo's `stall`).
    stall_rate: float = 0.0

    def __post_init__(self) -> None:
        """Keep the bench inside what the demo can serve."""
        if not 1 <= self.sources <= 50:
            raise PlanError(f"sources must be 1..50, got {self.sources}")
        if not (0 <= self.latency <= 10 and 0 <= self.jitter <= 10):
            raise PlanError("latency and jitter must be within 0..10 s")
        if not 0 <= self.failure_rate <= 1:
            raise PlanError(f"failure rate must be within 0..1, got {self.failure_rate}")
        if not 0 <= self.stall_rate <= 1:
            raise PlanError(f"stall rate must be within 0..1, got {self.stall_rate}")

    @property
    def floor_s(self) -> float:
        """Expected slowest of K sources: latency plus the expected max of K uniform jitters."""
        return self.latency + self.jitter * self.sources / (self.sources + 1)

    def ideal_rps(self, concurrency: int, target: Target) -> float | None:
        """rps = C / L for a fan-out (C / (K x mean latency) one after another); none for hits."""
        if target.cached:
            return None
        if target.view == "sync":
            per_request = self.sources * (self.latency + self.jitter / 2)
        else:
            per_request = self.floor_s
        return concurrency / per_request if per_request > 0 else None

    def config_toml(
        self,
        demo_url: str,
        *,
        timeout: float = 30,
        deadline: float = 60,
        required: tuple[str, ...] = (),
    ) -> str:
        """The aggregator config: K upstreams on the demo, one uncached and one cached aggregate.

        Each source is validated by its demo model, so every stack does the same pydantic work.
        The defaults never cut a call short (speed is measured, not failure handling); the soak
        sets real timeouts, a deadline and `required` sources.
        """
        lines: list[str] = []
        names: list[str] = []
        for index in range(self.sources):
            service = DEMO_SERVICES[index % len(DEMO_SERVICES)]
            name = service if index < len(DEMO_SERVICES) else f"{service}_{index}"
            names.append(name)
            path = {
                "weather": "/weather/{city}",
                "stocks": "/stocks/{user_id}",
                "news": "/news",
                "profile": "/profile/{user_id}",
                "recommendations": "/recommendations/{user_id}",
            }[service]
            model = service.capitalize()
            lines += [
                f"[upstreams.{name}]",
                f'url = "{demo_url}{path}"',
                f"timeout = {timeout:g}",
                f'schema = "aggregator.demo.models:{model}"',
                "",
            ]
        sources = ", ".join(f'"{n}"' for n in names)
        needed = ", ".join(f'"{n}"' for n in required)
        for agg, path, ttl in (("bench", UNCACHED_PATH, 0), ("bench_cached", CACHED_PATH, 3600)):
            lines += [
                f"[aggregates.{agg}]",
                f'path = "{path}"',
                f"sources = [{sources}]",
                f"required = [{needed}]",
                f"deadline = {deadline:g}",
                f"cache_ttl = {ttl}",
                'params = { city = "str", user_id = "int" }',
                "",
            ]
        return "\n".join(lines)
