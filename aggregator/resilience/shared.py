"""Shared resilience state: the fleet's breakers and concurrency limits in the cache's Redis.

Opt-in (`AGGREGATOR_SHARED_RESILIENCE=redis`). Without it every worker keeps its own breakers and
bulkheads (see the package docstring): with 3 hosts x 2 workers a dead upstream is probed by six
breakers and a bulkhead's limit is multiplied by six. With it, each upstream has one state for the
whole fleet, in keys hash-tagged per upstream (`{prefix}guard:{<name>}:...`, one Cluster slot):

- `open` exists while the fleet's circuit is open; `fails` counts failures fleet-wide (reset by a
  success, expiring after a window so rare blips never add up); `probe` is the half-open lease,
  `SET NX PX cooldown`: one probe per cool-down for the whole fleet, and a prober that dies holds
  it one cool-down at most.
- `sem` is a sorted set of call leases scored by their expiry (Redis's own clock), so a worker
  killed mid-call leaks its slots for one lease time only.

The hot path never waits for Redis for the breaker: `fleet.SharedCircuitBreaker` decides from a
local mirror, which a background task (`SharedState`, started and stopped by the lifespan)
refreshes every `shared_resilience_interval` and updates at once with what this worker reports
(failures, probe outcomes). Only the fleet-wide limit costs one awaited round trip per call, and
only for an upstream with `max_concurrency`.

Failing open: any Redis error or a command slower than `shared_resilience_timeout` marks the state
unhealthy; every decision is then the worker's local one (kept current all along), one log line
per change of health, a gauge and a counter in /metrics; the background task looks again each
interval. A request is never refused or delayed past the timeout because the shared state is
down.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from aggregator.cache.backends import redis_nodes
from aggregator.errors import ConfigError

if TYPE_CHECKING:
    from aggregator.config import UpstreamConfig
    from aggregator.resilience.fleet import SharedCircuitBreaker
    from aggregator.settings import Settings

logger = logging.getLogger(__name__)

#: The cache types whose Redis the shared state can use.
REDIS_CACHES = frozenset({"redis", "redissentinel", "rediscluster"})

# KEYS: fails, open, probe. ARGV: threshold, window ms, cooldown ms, open ttl ms.
# 1: this failure opened the fleet's circuit; 2: it was open already; 0: still closed.
_FAIL = """
if redis.call('exists', KEYS[2]) == 1 then return 2 end
local n = redis.call('incr', KEYS[1])
if n == 1 then redis.call('pexpire', KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[1]) then
  redis.call('set', KEYS[2], '1', 'px', ARGV[4])
  redis.call('set', KEYS[3], 'cooldown', 'px', ARGV[3])
  redis.call('del', KEYS[1])
  return 1
end
return 0
"""

# KEYS: sem. ARGV: limit, lease ms, lease id. 1: leased; 0: the fleet is at its limit.
_ACQUIRE = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('zadd', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('pexpire', KEYS[1], ARGV[2])
return 1
"""

Health = Literal["off", "starting", "up", "down"]
#: Told whether the shared state is usable whenever that changes (the metrics' gauge).
HealthListener = Callable[[bool], None]


@dataclass(frozen=True, slots=True)
class _Event:
    """What this worker tells the fleet: `fail`, `reset`, `close`, `reopen` or `release`."""

    kind: str
    upstream: str
    lease: str = ""


def check_shared_settings(settings: Settings) -> None:
    """The shared state lives in the cache's Redis: refuse it without one, saying why."""
    if settings.shared_resilience == "redis" and settings.cache_type not in REDIS_CACHES:
        raise ConfigError(
            "AGGREGATOR_SHARED_RESILIENCE",
            [
                "shared_resilience='redis' keeps breakers and limits in the cache's Redis, but "
                f"cache_type={settings.cache_type!r}: set AGGREGATOR_CACHE_TYPE to redis, "
                "redissentinel or rediscluster, or leave AGGREGATOR_SHARED_RESILIENCE=off"
            ],
        )


class SharedState:
    """This worker's link to the fleet's resilience state: mirror, reports, health."""

    def __init__(self, settings: Settings, *, on_health: HealthListener | None = None) -> None:
        self.settings = settings
        self.timeout = settings.shared_resilience_timeout
        self.interval = settings.shared_resilience_interval
        self.prefix = f"{settings.cache_key_prefix}guard:"
        #: Identifies this worker's probe leases and call leases in Redis.
        self.worker_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.failures = 0
        self._health: Health = "starting"
        self._on_health = on_health
        self._breakers: dict[str, SharedCircuitBreaker] = {}
        self._client: Any = None
        self._events: collections.deque[_Event] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._sentinel: Any = None

    # -- what the guards use ----------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Whether decisions are fleet-wide now (else each worker's own, failing open)."""
        return self._health == "up"

    def breaker(self, name: str, upstream: UpstreamConfig, **kwargs: Any) -> SharedCircuitBreaker:
        """The fleet-wide breaker of `name` (kwargs: the local breaker's clock and on_change)."""
        from aggregator.resilience.fleet import SharedCircuitBreaker

        breaker = SharedCircuitBreaker(self, name, upstream, **kwargs)
        self._breakers[name] = breaker
        return breaker

    def key(self, upstream: str, what: str) -> str:
        """`{prefix}guard:{<upstream>}:<what>`: one upstream's keys share one Cluster slot."""
        return f"{self.prefix}{{{upstream}}}:{what}"

    def report(self, kind: str, upstream: str, lease: str = "") -> None:
        """Queue a report for the background task; from any thread, never blocking."""
        if self._loop is None or not self.healthy:
            return  # failing open: a report lost while Redis is away changes nothing locally
        self._events.append(_Event(kind, upstream, lease))
        if self._wake is not None:
            if threading.get_ident() == self._loop_thread:
                self._wake.set()
            else:
                self._loop.call_soon_threadsafe(self._wake.set)

    async def lease(self, upstream: str, limit: int, seconds: float) -> str | None:
        """A fleet-wide call slot: its id, "" when not enforced now (failing open), None: full."""
        if not self.healthy:
            return ""
        lease = f"{self.worker_id}-{secrets.token_hex(4)}"
        try:
            async with asyncio.timeout(self.timeout):
                got = await self._client.eval(
                    _ACQUIRE, 1, self.key(upstream, "sem"), limit, int(seconds * 1000), lease
                )
        except Exception as exc:  # anything from a sick Redis: fail open, never the request
            self._down(exc)
            return ""
        return lease if got == 1 else None

    def status(self) -> dict[str, Any]:
        """For /status: whether the fleet's state is in use and answering."""
        return {
            "mode": self.settings.shared_resilience,
            "state": self._health,
            "healthy": self.healthy,
            "failures": self.failures,
        }

    # -- lifespan ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the async Redis client on this loop, sync once (bounded), start the task."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._stopping = False
        await self._sync(poll=True)
        self._task = asyncio.create_task(self._run(), name="aggregator-shared-resilience")

    async def stop(self) -> None:
        if self._task is not None and self._wake is not None:
            # Asked, not cancelled: a cancel landing inside a Redis command can be taken for
            # that command's timeout by the client library, and the task would go on.
            self._stopping = True
            self._wake.set()
            try:
                async with asyncio.timeout(8 * self.timeout + 1):
                    await self._task
            except TimeoutError:
                self._task.cancel()
            self._task = None
        if self.healthy:
            await self._sync(poll=False)  # hand back this worker's leases (bounded)
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception:  # closing a dead connection may raise
                logger.debug("closing the shared-state client failed", exc_info=True)
            self._client = None
        for watcher in getattr(self._sentinel, "sentinels", ()):  # Sentinel's own connections
            try:
                await watcher.aclose()
            except Exception:
                logger.debug("closing a sentinel connection failed", exc_info=True)
        self._sentinel = None
        self._loop = None

    # -- the background task ----------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None and self._loop is not None
        next_poll = self._loop.time() + self.interval
        while not self._stopping:
            try:
                async with asyncio.timeout(max(0.0, next_poll - self._loop.time())):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                return
            poll = self._loop.time() >= next_poll
            if poll:
                next_poll = self._loop.time() + self.interval
            await self._sync(poll=poll)

    async def _sync(self, *, poll: bool) -> None:
        """Send what was reported, then (on `poll`) read the fleet's state; mark health."""
        events = []
        while self._events:
            events.append(self._events.popleft())
        try:
            async with asyncio.timeout(self.timeout * 4):
                if self._client is None:
                    self._client = await self._connect()
                if events:
                    await self._send(events)
                if poll:
                    await self._poll()
        except Exception as exc:  # Redis down, slow, refusing: the workers decide alone
            self._down(exc)
            return
        if poll:
            self._up()

    async def _send(self, events: list[_Event]) -> None:
        releases = [e for e in events if e.kind == "release"]
        if len(releases) == 1:
            await self._client.zrem(self.key(releases[0].upstream, "sem"), releases[0].lease)
        elif releases:  # the common report by far: one round trip for all of them
            pipe = self._client.pipeline(transaction=False)
            for event in releases:
                pipe.zrem(self.key(event.upstream, "sem"), event.lease)
            await pipe.execute()
        for event in events:
            breaker = self._breakers.get(event.upstream)
            if event.kind == "release":
                continue
            elif breaker is None:
                continue
            elif event.kind == "fail":
                up = breaker.upstream
                cooldown_ms = int(up.breaker_cooldown * 1000)
                tripped = await self._client.eval(
                    _FAIL,
                    3,
                    self.key(event.upstream, "fails"),
                    self.key(event.upstream, "open"),
                    self.key(event.upstream, "probe"),
                    up.breaker_failures,
                    max(60_000, 10 * cooldown_ms),  # a window: blips an hour apart never add up
                    cooldown_ms,
                    _open_ttl_ms(up),
                )
                if tripped:  # 1: this failure opened it; 2: another worker's had, unseen yet
                    why = "tripped by this worker" if tripped == 1 else "seen in the fleet"
                    breaker.mirror(open_=True, fails=0, why=why)
            elif event.kind == "reset":
                await self._client.delete(self.key(event.upstream, "fails"))
            elif event.kind == "close":
                keys = ("open", "probe", "fails")
                await self._client.delete(*(self.key(event.upstream, k) for k in keys))
            elif event.kind == "reopen":
                ttl = _open_ttl_ms(breaker.upstream)
                await self._client.set(self.key(event.upstream, "open"), "1", px=ttl)

    async def _poll(self) -> None:
        """Read every fleet breaker's state; take the probe lease for those that want one."""
        if not self._breakers:
            await self._client.ping()
            return
        pipe = self._client.pipeline(transaction=False)
        names = list(self._breakers)
        for name in names:
            pipe.exists(self.key(name, "open"))
            pipe.get(self.key(name, "fails"))
        replies = await pipe.execute()
        for i, name in enumerate(names):
            is_open, fails = bool(replies[2 * i]), int(replies[2 * i + 1] or 0)
            self._breakers[name].mirror(open_=is_open, fails=fails, why="seen in the fleet")
        for name, breaker in self._breakers.items():
            if breaker.wants_probe():
                ms = int(breaker.upstream.breaker_cooldown * 1000)
                key = self.key(name, "probe")
                won = await self._client.set(key, self.worker_id, nx=True, px=ms)
                breaker.grant_probe(bool(won))

    async def _connect(self) -> Any:
        """An async client for the cache's Redis (standalone, Sentinel or Cluster)."""
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        settings = self.settings
        options: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "health_check_interval": 0,
            "retry": Retry(NoBackoff(), 0),  # one try: a slow answer is a down state, not a wait
        }
        if settings.cache_type == "rediscluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            nodes = [ClusterNode(host, port) for host, port in redis_nodes(settings)]
            return RedisCluster(startup_nodes=nodes, **options)  # discovers on first use
        if settings.cache_type == "redissentinel":
            from redis.asyncio.sentinel import Sentinel

            sentinel = self._sentinel = Sentinel(redis_nodes(settings), **options)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            return sentinel.master_for(settings.cache_redis_master, **options)
        return Redis.from_url(settings.cache_redis_url, **options)

    # -- health -----------------------------------------------------------------------------

    def _down(self, exc: BaseException) -> None:
        self.failures += 1
        if self._health != "down":
            reason = "timed out" if isinstance(exc, TimeoutError) else repr(exc)
            logger.warning(
                "shared resilience state unavailable (%s): each worker decides alone "
                "(its own breakers and limits) until Redis answers again",
                reason,
            )
            self._health = "down"
            self._events.clear()
            for breaker in self._breakers.values():
                breaker.fleet_lost()
            if self._on_health is not None:
                self._on_health(False)

    def _up(self) -> None:
        if self._health != "up":
            if self._health == "down":
                logger.info(
                    "shared resilience state answers again: breakers and limits are fleet-wide"
                )
            self._health = "up"
            if self._on_health is not None:
                self._on_health(True)


def _open_ttl_ms(upstream: UpstreamConfig) -> int:
    """How long an open fleet circuit outlives its last failed probe (then closed: a stale key
    never keeps an upstream refused for ever, e.g. after the fleet stopped calling it)."""
    return max(60_000, int(upstream.breaker_cooldown * 10_000))


def build_shared(settings: Settings, on_health: HealthListener | None = None) -> SharedState | None:
    """The worker's shared state, or None when `shared_resilience` is off."""
    check_shared_settings(settings)
    if settings.shared_resilience == "off":
        return None
    return SharedState(settings, on_health=on_health)
