"""What a bench run compares: server configurations ("targets") and the upstream workload.

A target is written `SERVER:VIEW[:ENGINE][+FLAG...]`, e.g. `loop:async:aiohttp`,
`gunicorn:sync-pool`, `fastapi:async:httpx`, `loop:async:aiohttp+cached+asyncio`:

- SERVER: `loop`, `threads`, `serial` (our Hypercorn serving modes; `serial` is the stock asgiref
  recipe), `gunicorn` (a classic WSGI server with threads, for the sync twins), `fastapi`
  (FastAPI + uvicorn running *our* fan-out engine: isolates the framework and server) or
  `fastapi-plain` (the peer: FastAPI + uvicorn as its users write the same aggregate, with no
  code of ours, `aggregator.bench.fastapi_plain`); both async only. `fastapi-plain:cached` is
  that peer answering from a dict of the envelope bytes it built once per query;
- VIEW: `async` (the real views), `sync` (sources one after another on a shared `httpx.Client`)
  or `sync-pool` (the same client from a thread pool);
- ENGINE: the async views' connection engine, `aiohttp` (default) or `httpx`; the sync twins
  always use httpx's blocking client, so they take none;
- `+cached`: the aggregate is cached for an hour, so after the warm-up every request is a hit;
- Every project target (ours: Hypercorn's modes, gunicorn) runs with the shipped settings
  (`Settings` defaults: INFO logging with its access line, metrics as shipped) unless a flag
  says otherwise, and the report labels each target "as shipped" or with its flags:
- `+quiet`: logging at WARNING (no access line), the bench's default before 2026-12-03;
- `+metrics`: Prometheus metrics recorded and served (AGGREGATOR_METRICS=public); as shipped
  they record only once something can read them (an admin token or a metrics listener, neither
  set by the bench), so `loop:async+cached` against `loop:async+cached+metrics` is their cost on
  the hit path; `+nometrics`: AGGREGATOR_METRICS=off;
- `+mypyc`: Hypercorn parses HTTP/1.1 with the compiled h11 fork (AGGREGATOR_HTTP1_PARSER,
  the `fast` extra), our Hypercorn modes only;
- `+hypercorn`: a FastAPI target served by Hypercorn (stock h11, the worker class of ours)
  instead of uvicorn: `fastapi-plain:cached+hypercorn` is the dict of envelope bytes behind the
  same server as ours, which separates what our code costs on a hit from what the server does;
- `+asyncio` / `+uvloop`: the event loop of an async server (Hypercorn's worker class, uvicorn's
  `--loop`); without it each server runs on its own default (uvloop when installed);
- `+gc` / `+pygc`: the garbage collector. Our Hypercorn servers ship aggregator's GC tuning
  (`AGGREGATOR_GC_THRESHOLD`, see `aggregator.gc_tuning`); `+pygc` runs them on Python's defaults
  to show what it is worth. The FastAPI reference runs on Python's defaults, as its users would;
  `+gc` gives it the same tuning, so a comparison can separate framework from GC.

`bench --app MODULE:NAME --path P [--path ...]` benches a developer's own app instead: the VIEW
is then `app` (their views, as their app routes them), written `SERVER:app[:ENGINE][+FLAG...]`
or just `SERVER[+FLAG...]`, with SERVER one of `loop`, `threads`, `serial` (`aggregator serve
--app` in that mode) or `gunicorn` (their WSGI app itself, threads). Our built-in views (`async`,
`sync`, `sync-pool`), `+cached` (our bench aggregate's cache) and the FastAPI reference (our
fan-out, rewritten) measure our code, not theirs, so they are refused with --app. Each path is
its own series: the target `loop:app` on two paths is two rows per level (`loop:app /a`,
`loop:app /b`) measured on one server, each path rotated like a target of its own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Literal

from aggregator.demo.knobs import MAX_PAYLOAD_KB

Server = Literal["loop", "threads", "serial", "gunicorn", "fastapi", "fastapi-plain"]
View = Literal["async", "sync", "sync-pool", "app"]
SERVERS: tuple[Server, ...] = ("loop", "threads", "serial", "gunicorn", "fastapi", "fastapi-plain")
#: The servers that run this project's own app (the others are FastAPI peers).
PROJECT_SERVERS = frozenset({"loop", "threads", "serial", "gunicorn"})
FASTAPI_SERVERS = frozenset({"fastapi", "fastapi-plain"})
VIEWS: tuple[View, ...] = ("async", "sync", "sync-pool")
#: The servers a developer's own app (`--app`) can be benched on.
APP_SERVERS: tuple[Server, ...] = ("loop", "threads", "serial", "gunicorn")
ENGINES = ("aiohttp", "httpx")
EVENT_LOOPS = ("asyncio", "uvloop")
GC_FLAGS = {"gc": "tuned", "pygc": "python"}
GcMode = Literal["tuned", "python"]
HYPERCORN_SERVERS = frozenset({"loop", "threads", "serial"})
#: The package an optional server needs, and the extra that brings it.
_OPTIONAL = {
    "gunicorn": "gunicorn",
    "fastapi": "fastapi",
    "fastapi-plain": "fastapi",
    "uvloop": "uvloop",
    "h11-mypyc": "h11_mypyc",
}

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
    #: The path (with query) of a developer's app loaded on this target (view `app` only).
    app_path: str | None = None
    #: `+quiet`: logging at WARNING instead of the shipped INFO (no access line).
    quiet: bool = False
    #: `+nometrics`: AGGREGATOR_METRICS=off instead of the shipped default.
    nometrics: bool = False
    #: `+mypyc`: AGGREGATOR_HTTP1_PARSER=h11-mypyc instead of the shipped stock h11.
    mypyc: bool = False
    #: `+hypercorn`: a FastAPI target served by Hypercorn instead of uvicorn.
    hypercorn: bool = False

    @property
    def name(self) -> str:
        """The spelling the user gave (normalized), used in tables, files and charts."""
        if self.app_path is not None:
            return f"{self.server_name} {self.app_path}"
        return self.server_name

    @property
    def server_name(self) -> str:
        """The server configuration's name: the targets of one `--app` on several paths share it."""
        engine = f":{self.engine}" if self.engine else ""
        plain_cached = self.server == "fastapi-plain" and self.cached
        flags = (
            ("+cached" if self.cached and not plain_cached else "")
            + (f"+{self.event_loop}" if self.event_loop else "")
            + ("+metrics" if self.metrics else "")
            + ("+nometrics" if self.nometrics else "")
            + ("+quiet" if self.quiet else "")
            + ("+mypyc" if self.mypyc else "")
            + ("+hypercorn" if self.hypercorn else "")
        )
        if self.gc is not None:
            flags += "+gc" if self.gc == "tuned" else "+pygc"
        if plain_cached:
            return f"{self.server}:cached{flags}"
        return f"{self.server}:{self.view}{engine}{flags}"

    @property
    def stack(self) -> str:
        """What serves this target, in words: who wrote the code that runs."""
        if self.server == "fastapi":
            return "FastAPI + uvicorn running our fan-out engine"
        if self.server == "fastapi-plain":
            what = "from a dict of stored envelope bytes" if self.cached else "plain gather"
            return f"FastAPI peer as its users write it ({what})"
        if self.view == "app":
            return "your app"
        return "this project"

    @property
    def runs_as(self) -> str:
        """How this target differs from what ships: "as shipped", or each flag in words.

        Only project targets can be "as shipped"; a FastAPI target says what it runs and its
        own flags (the event loop, GC).
        """
        said: list[str] = []
        if self.cached:
            said.append("every request a cache hit (+cached)")
        if self.quiet:
            said.append("logging WARNING, no access line (+quiet)")
        if self.metrics:
            said.append("metrics recorded and public (+metrics)")
        if self.nometrics:
            said.append("metrics off (+nometrics)")
        if self.mypyc:
            said.append("HTTP/1.1 parsed by h11-mypyc (+mypyc)")
        if self.hypercorn:
            said.append("served by Hypercorn, not uvicorn (+hypercorn)")
        if self.event_loop:
            said.append(f"{self.event_loop} event loop (+{self.event_loop})")
        if self.gc == "python":
            said.append("Python's GC (+pygc)")
        elif self.gc == "tuned":
            said.append("our GC tuning (+gc)")
        settings_flags = (
            self.quiet or self.metrics or self.nometrics or self.mypyc or self.event_loop or self.gc
        )
        if self.server in PROJECT_SERVERS and not settings_flags:
            said.insert(0, "as shipped")
        if self.server not in PROJECT_SERVERS:
            said.insert(0, self.stack)
        return ", ".join(said)

    @property
    def path(self) -> str:
        """The request path (with query) this target is loaded on."""
        if self.view == "app":
            return self.app_path or "/"
        base = CACHED_PATH if self.cached else UNCACHED_PATH
        prefix = {"async": "", "sync": "/sync", "sync-pool": "/sync-pool"}[self.view]
        return f"{prefix}{base}?{QUERY}"

    def missing_package(self) -> str | None:
        """The optional package this target needs and is not installed, if any."""
        for need in (self.server, self.event_loop, "h11-mypyc" if self.mypyc else None):
            package = _OPTIONAL.get(need or "")
            if package and importlib.util.find_spec(package) is None:
                return package
        return None


def parse_target(text: str, *, app: bool = False) -> Target:
    """Parse `SERVER:VIEW[:ENGINE][+FLAG...]`, refusing combinations that do not exist.

    `app`: the bench is of a developer's own app (`--app`): only `SERVER[:app][:ENGINE]` targets.
    """
    base, *flags = text.strip().split("+")
    if app:
        server, _, rest = base.partition(":")
        view, _, engine_part = rest.partition(":")
        if server not in APP_SERVERS:
            why = " (the FastAPI reference runs our fan-out, not your app)"
            raise PlanError(
                f"target {text!r}: with --app the server must be one of "
                f"{', '.join(APP_SERVERS)}{why if server == 'fastapi' else ''}"
            )
        if view not in ("", "app"):
            raise PlanError(
                f"target {text!r}: with --app the views are yours; write SERVER:app "
                f"({', '.join(APP_SERVERS)}), e.g. loop:app+uvloop ({view!r} is one of ours)"
            )
        base = f"{server}:async" + (f":{engine_part}" if engine_part else "")
        if "cached" in flags:
            raise PlanError(
                f"target {text!r}: +cached caches our bench aggregate; your app caches its own way"
            )
        if server == "gunicorn":
            base = "gunicorn:sync"  # checked as a WSGI server: no event loop, no GC flags
            if engine_part:
                raise PlanError(f"target {text!r}: gunicorn takes no engine")
        try:
            parsed = parse_target("+".join([base, *flags]))
        except PlanError as exc:  # said of the spelling checked: say it of the one given
            raise PlanError(f"target {text!r}: {str(exc).split(': ', 1)[1]}") from None
        return dataclasses.replace(parsed, view="app", engine=engine_part or None)
    known = {"cached", "metrics", "nometrics", "quiet", "mypyc", "hypercorn"}
    if set(flags) - known - {*EVENT_LOOPS, *GC_FLAGS} or len(flags) != len(set(flags)):
        raise PlanError(
            f"target {text!r}: flags are +cached, +metrics, +nometrics, +quiet, +mypyc, "
            "+hypercorn, +asyncio, +uvloop, +gc or +pygc, once each"
        )
    cached, metrics = "cached" in flags, "metrics" in flags
    nometrics, quiet, mypyc = "nometrics" in flags, "quiet" in flags, "mypyc" in flags
    hypercorn = "hypercorn" in flags
    if metrics and nometrics:
        raise PlanError(f"target {text!r}: +metrics or +nometrics, not both")
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
    if server == "fastapi-plain" and view == "cached" and engine is None:
        view, cached = "async", True  # `fastapi-plain:cached`: the peer's dict of envelopes
    if server not in SERVERS:
        raise PlanError(f"target {text!r}: server must be one of {', '.join(SERVERS)}")
    if view == "app":
        raise PlanError(f"target {text!r}: SERVER:app targets bench your own app: add --app")
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
    if server in FASTAPI_SERVERS and view != "async":
        raise PlanError(f"target {text!r}: the FastAPI targets are async only")
    if cached and (view != "async" or server == "fastapi"):
        raise PlanError(
            f"target {text!r}: only our async views are cached (the peer's: fastapi-plain:cached)"
        )
    if server == "fastapi-plain" and (gc is not None or event_loop == "asyncio"):
        # As its users run it: uvicorn's defaults (uvloop when installed), Python's GC.
        raise PlanError(f"target {text!r}: the plain FastAPI peer runs as its users run it")
    if event_loop and server == "gunicorn":
        raise PlanError(f"target {text!r}: gunicorn's threads have no event loop to choose")
    if gc is not None and server == "gunicorn":
        raise PlanError(f"target {text!r}: GC tuning applies to the ASGI servers only")
    if (metrics or nometrics) and server in FASTAPI_SERVERS:
        raise PlanError(f"target {text!r}: the FastAPI targets record no metrics")
    if quiet and server not in PROJECT_SERVERS:
        raise PlanError(f"target {text!r}: +quiet sets our logging; FastAPI targets log nothing")
    if mypyc and server not in HYPERCORN_SERVERS:
        raise PlanError(f"target {text!r}: +mypyc sets Hypercorn's parser (loop, threads, serial)")
    if hypercorn and server not in FASTAPI_SERVERS:
        raise PlanError(f"target {text!r}: +hypercorn serves a FastAPI target (ours always are)")
    return Target(
        server,
        view,
        engine,
        cached,
        event_loop,
        gc,
        metrics,
        quiet=quiet,
        nometrics=nometrics,
        mypyc=mypyc,
        hypercorn=hypercorn,
    )


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
    "fastapi-plain:async:aiohttp",
    "fastapi-plain:async:httpx",
    "loop:async:aiohttp+cached",
    "fastapi-plain:cached",
)


def default_app_targets() -> tuple[str, ...]:
    """What `bench --app` compares by default: every server, and asyncio beside uvloop."""
    loops = ("loop:app+asyncio",) if importlib.util.find_spec("uvloop") is not None else ()
    return ("loop:app", *loops, "threads:app", "serial:app", "gunicorn:app")


def on_paths(targets: tuple[Target, ...], paths: tuple[str, ...]) -> tuple[Target, ...]:
    """Each `--app` target once per path, in target order: every path is a series of its own."""
    return tuple(dataclasses.replace(t, app_path=p) for t in targets for p in paths)


@dataclass(frozen=True, slots=True)
class Workload:
    """The upstreams every target aggregates: K demo sources with the same latency profile."""

    sources: int = 5
    latency: float = 0.1
    jitter: float = 0.0
    failure_rate: float = 0.0
    #: Chance that an upstream call stalls until the caller times out (the demo's `stall`).
    stall_rate: float = 0.0
    #: KB of JSON per source answer (the demo's `--payload-kb`); 0: the demo's small payloads.
    payload_kb: float = 0.0

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
        if not 0 <= self.payload_kb <= MAX_PAYLOAD_KB:
            raise PlanError(f"payload must be within 0..{MAX_PAYLOAD_KB} KB, got {self.payload_kb}")

    @property
    def floor_s(self) -> float:
        """Expected slowest of K sources: latency plus the expected max of K uniform jitters."""
        return self.latency + self.jitter * self.sources / (self.sources + 1)

    def ideal_rps(self, concurrency: int, target: Target) -> float | None:
        """rps = C / L for a fan-out (C / (K x mean latency) one after another); none for hits.

        None for a developer's own views too: what they wait for is theirs, not the workload's.
        """
        if target.cached or target.view == "app":
            return None
        if target.view == "sync":
            per_request = self.sources * (self.latency + self.jitter / 2)
        else:
            per_request = self.floor_s
        return concurrency / per_request if per_request > 0 else None

    def upstreams(self, demo_url: str) -> list[tuple[str, str, str]]:
        """Each source's name, demo service and URL template (`{city}`, `{user_id}`)."""
        found: list[tuple[str, str, str]] = []
        for index in range(self.sources):
            service = DEMO_SERVICES[index % len(DEMO_SERVICES)]
            name = service if index < len(DEMO_SERVICES) else f"{service}_{index}"
            path = {
                "weather": "/weather/{city}",
                "stocks": "/stocks/{user_id}",
                "news": "/news",
                "profile": "/profile/{user_id}",
                "recommendations": "/recommendations/{user_id}",
            }[service]
            found.append((name, service, f"{demo_url}{path}"))
        return found

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
        for name, service, url in self.upstreams(demo_url):
            names.append(name)
            model = service.capitalize()
            lines += [
                f"[upstreams.{name}]",
                f'url = "{url}"',
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
