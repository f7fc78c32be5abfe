"""A multi-host topology on one machine: network namespaces on a bridge, one per host.

`python -m deploy.local_cluster up|down|status` (or `deploy/local-cluster ...`), as root, builds:

    agc-lb       10.231.0.10   HAProxy on :8080 (checks /readyz; GET retries; redispatch)
    agc-demo     10.231.0.20   the demo upstreams on :8101 (they count every call)
    agc-agg1..3  10.231.0.31.. `aggregator serve -w 2` on :8000, cache type rediscluster
    agc-redis1..6 10.231.0.41.. a Redis Cluster, 3 masters + 3 replicas, node timeout 2000 ms

Every name (netns, veth, bridge) starts with `agc-`, so `down` finds leftovers of any earlier
run by that prefix alone, kills what runs inside those namespaces (only processes started
there, by this module) and deletes them. The bridge lives in the root namespace with
10.231.0.1/24 and no route beyond that subnet, so traffic stays between these namespaces and
this machine. The library API (`LocalCluster`) is what tests/test_cluster.py drives;
deploy/load.py sends it load, deploy/scaling.py measures it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

PREFIX = "agc-"
BRIDGE = f"{PREFIX}br"
SUBNET = ipaddress.ip_network("10.231.0.0/24")
BRIDGE_IP = "10.231.0.1"
LB_PORT = 8080
AGG_PORT = 8000
DEMO_PORT = 8101
REDIS_PORT = 6379
NODE_TIMEOUT_MS = 2000
DEFAULT_WORKDIR = Path("/tmp/agc-local-cluster")
#: The dashboard the scenarios ask for (the bundled demo config's aggregate).
DASHBOARD = "/api/dashboard"
#: Its required source: a 502/504 naming it is the designed answer to that upstream failing.
REQUIRED = ("profile",)


@dataclass(frozen=True)
class Host:
    """One namespace: its name (netns and root-side veth) and its address on the bridge."""

    name: str
    ip: str

    @property
    def netns(self) -> str:
        return PREFIX + self.name


LB = Host("lb", "10.231.0.10")
DEMO = Host("demo", "10.231.0.20")


def agg_hosts(n: int) -> list[Host]:
    return [Host(f"agg{i}", f"10.231.0.{30 + i}") for i in range(1, n + 1)]


REDIS = [Host(f"redis{i}", f"10.231.0.{40 + i}") for i in range(1, 7)]


class ClusterError(RuntimeError):
    """The topology could not be built or a step of it failed; the message says which."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 20) -> str:
    """Run a short command (ip, nft, redis-cli) and return its stdout."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def in_netns(host: Host, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", host.netns, *argv]


def missing_prerequisites() -> str | None:
    """Why this machine cannot build the topology, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, a bridge)"
    for tool in ("ip", "haproxy", "redis-server", "redis-cli", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs iproute2, haproxy, nftables)"
    probe = f"{PREFIX}probe"
    try:
        run(["ip", "netns", "add", probe])
    except (ClusterError, OSError) as exc:
        return f"`ip netns add` does not work here: {exc}"
    run(["ip", "netns", "del", probe], check=False)
    return None


# -- leftovers -----------------------------------------------------------------------------


def our_namespaces() -> list[str]:
    names = [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line]
    return [n for n in names if n.startswith(PREFIX)]


def our_links() -> list[str]:
    links = []
    for line in run(["ip", "-o", "link", "show"]).splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name.startswith(PREFIX):
            links.append(name)
    return links


def netns_pids(netns: str) -> list[int]:
    out = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in out.split()]


def teardown() -> list[str]:
    """Kill every process inside an `agc-` namespace, delete them and the links; say what went.

    Every process this module starts runs inside one of them (`ip netns exec`), so the kernel's
    list of a namespace's processes is the exact set to stop: no pid file that could name a
    reused pid, no match by command line.
    """
    removed = []
    for netns in our_namespaces():
        pids = netns_pids(netns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while netns_pids(netns) and time.monotonic() < deadline:
            time.sleep(0.05)
        run(["ip", "netns", "del", netns], check=False)
        removed.append(f"netns {netns} ({len(pids)} processes killed)")
    for link in our_links():
        run(["ip", "link", "del", link], check=False)
        removed.append(f"link {link}")
    return removed


# -- the topology --------------------------------------------------------------------------


def haproxy_config(aggs: Sequence[Host], socket_path: Path) -> str:
    """HAProxy: /readyz drains a host; when none is ready, /healthz-live hosts serve anyway.

    A shared dependency (the Redis Cluster during a failover) makes every host unready at
    once; answering 503 from the balancer then would turn a cache outage into a total one,
    so the `live` backend (same hosts, checked on /healthz) takes over until one is ready.
    """
    servers = "\n".join(f"    server {h.name} {h.ip}:{AGG_PORT} check" for h in aggs)
    return f"""\
global
    maxconn 4096
    stats socket {socket_path} mode 600 level admin

defaults
    mode http
    timeout connect 500ms
    timeout client 30s
    timeout server 10s
    timeout check 1s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response response-timeout
    default-server inter 500ms fastinter 250ms downinter 500ms fall 2 rise 2

frontend fe
    bind *:{LB_PORT}
    # Only idempotent requests are replayed on another host.
    http-request disable-l7-retry unless METH_GET || METH_HEAD
    use_backend live if {{ nbsrv(ready) eq 0 }}
    default_backend ready

backend ready
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    http-response set-header X-Served-By %[srv_name]
{servers}

backend live
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    http-response set-header X-Served-By %[srv_name]
{servers}
"""


@dataclass
class LocalCluster:
    """Builds, drives and tears down the topology; a context manager that always cleans up."""

    workdir: Path = DEFAULT_WORKDIR
    hosts: int = 3
    workers: int = 2
    python: str = sys.executable
    #: Extra AGGREGATOR_* settings for every aggregator host.
    settings: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def aggs(self) -> list[Host]:
        return agg_hosts(self.hosts)

    @property
    def lb_url(self) -> str:
        return f"http://{LB.ip}:{LB_PORT}"

    @property
    def demo_url(self) -> str:
        return f"http://{DEMO.ip}:{DEMO_PORT}"

    def agg_url(self, i: int) -> str:
        return f"http://{self.aggs[i].ip}:{AGG_PORT}"

    # -- up / down ---------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        atexit.register(self.down)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
        atexit.unregister(self.down)

    def up(self, timeout: float = 60) -> None:
        """Build everything, each step bounded; raise ClusterError naming what did not come up."""
        deadline = time.monotonic() + timeout
        teardown()  # an earlier run killed hard leaves its namespaces behind
        self.workdir.mkdir(parents=True, exist_ok=True)
        for node in REDIS:  # an old nodes.conf would make a node refuse the new cluster
            shutil.rmtree(self.workdir / node.name, ignore_errors=True)
        self._network()
        for node in REDIS:
            self.start_redis(node)
        self.start_demo()
        self._create_redis_cluster(deadline)
        for i in range(self.hosts):
            self.start_agg(i, wait=False)
        for i in range(self.hosts):
            self.wait_agg(i, deadline)
        self.start_haproxy()
        self.wait_lb_ready(deadline)

    def down(self) -> list[str]:
        """Stop what was started and remove every `agc-` namespace and link."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.procs.clear()
        return teardown()

    def _network(self) -> None:
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{BRIDGE_IP}/{SUBNET.prefixlen}", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        for host in [LB, DEMO, *self.aggs, *REDIS]:
            peer = f"{PREFIX}{host.name}p"
            run(["ip", "netns", "add", host.netns])
            run(["ip", "link", "add", PREFIX + host.name, "type", "veth", "peer", "name", peer])
            run(["ip", "link", "set", peer, "netns", host.netns])
            run(["ip", "link", "set", PREFIX + host.name, "master", BRIDGE, "up"])
            run(in_netns(host, ["ip", "link", "set", "lo", "up"]))
            run(in_netns(host, ["ip", "link", "set", peer, "name", "eth0"]))
            run(
                in_netns(
                    host, ["ip", "addr", "add", f"{host.ip}/{SUBNET.prefixlen}", "dev", "eth0"]
                )
            )
            run(in_netns(host, ["ip", "link", "set", "eth0", "up"]))

    def _spawn(self, key: str, host: Host, argv: Sequence[str], env: dict[str, str]) -> None:
        log = self.workdir / f"{key}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                in_netns(host, argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C in the caller's terminal is ours to handle
            )
        self.procs[key] = proc

    def log(self, key: str) -> str:
        path = self.workdir / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}

    # -- redis ----------------------------------------------------------------------------------

    def start_redis(self, node: Host) -> None:
        data = self.workdir / node.name
        data.mkdir(exist_ok=True)
        argv = ["redis-server", "--bind", "0.0.0.0", "--port", str(REDIS_PORT)]
        argv += ["--protected-mode", "no", "--save", "", "--appendonly", "no"]
        argv += ["--daemonize", "no", "--dir", str(data), "--cluster-enabled", "yes"]
        argv += ["--cluster-config-file", str(data / "nodes.conf")]
        argv += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        self._spawn(node.name, node, argv, self._env())

    def redis_cli(self, node: Host, *args: str, timeout: float = 5) -> str:
        return run(["redis-cli", "-h", node.ip, "-p", str(REDIS_PORT), *args], timeout=timeout)

    def _create_redis_cluster(self, deadline: float) -> None:
        for node in REDIS:
            _wait(lambda n=node: self._pong(n), deadline, f"redis {node.name} answering PING")
        nodes = [f"{n.ip}:{REDIS_PORT}" for n in REDIS]
        run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1"]
            + ["--cluster-yes"],
            timeout=30,
        )
        _wait(self.redis_ok, deadline, "the Redis Cluster reporting cluster_state:ok everywhere")

    def _pong(self, node: Host) -> bool:
        try:
            return self.redis_cli(node, "PING", timeout=2).strip() == "PONG"
        except (ClusterError, subprocess.TimeoutExpired):
            return False

    def redis_ok(self, nodes: Sequence[Host] | None = None) -> bool:
        """Every (given) node says cluster_state:ok and 3 masters hold all slots."""
        for node in nodes or REDIS:
            try:
                info = self.redis_cli(node, "CLUSTER", "INFO", timeout=2)
            except (ClusterError, subprocess.TimeoutExpired):
                return False
            if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                return False
        return True

    def redis_roles(self) -> dict[str, str]:
        """Node name -> "master" or "slave", as the cluster sees it now (dead nodes: "fail")."""
        by_ip = {n.ip: n.name for n in REDIS}
        for node in REDIS:
            with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                listing = self.redis_cli(node, "CLUSTER", "NODES", timeout=2)
                roles = {}
                for line in listing.splitlines():
                    fields = line.split()
                    ip = fields[1].split(":", 1)[0]
                    flags = fields[2]
                    role = (
                        "fail" if "fail" in flags else ("master" if "master" in flags else "slave")
                    )
                    roles[by_ip.get(ip, ip)] = role
                return roles
        return {}

    def kill(self, key: str) -> None:
        """SIGKILL a host's processes (everything inside its namespace), as a crash would."""
        host = next(h for h in [LB, DEMO, *self.aggs, *REDIS] if h.name == key)
        for pid in netns_pids(host.netns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc = self.procs.pop(key, None)
        if proc is not None:
            proc.wait(5)
        deadline = time.monotonic() + 5
        while netns_pids(host.netns) and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- demo, aggregators, haproxy --------------------------------------------------------------

    def start_demo(self) -> None:
        argv = [self.python, "-m", "aggregator", "demo", "--host", "0.0.0.0"]
        self._spawn("demo", DEMO, argv + ["--port", str(DEMO_PORT)], self._env())

    def start_agg(self, i: int, *, wait: bool = True) -> None:
        host = self.aggs[i]
        config = resources.files("aggregator.demo").joinpath("config.toml")
        env = self._env() | {
            "AGGREGATOR_DEMO_URL": self.demo_url,
            "AGGREGATOR_CACHE_TYPE": "rediscluster",
            "AGGREGATOR_CACHE_REDIS_NODES": ",".join(f"{n.ip}:{REDIS_PORT}" for n in REDIS),
        }
        env |= {f"AGGREGATOR_{k.upper()}": v for k, v in self.settings.items()}
        argv = [self.python, "-m", "aggregator", "serve", "--config", str(config)]
        argv += ["--bind", f"0.0.0.0:{AGG_PORT}", "--workers", str(self.workers)]
        self._spawn(host.name, host, argv, env)
        if wait:
            self.wait_agg(i, time.monotonic() + 30)

    def wait_agg(self, i: int, deadline: float) -> None:
        host = self.aggs[i]

        def ready() -> bool:
            proc = self.procs.get(host.name)
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{host.name} exited {proc.returncode}:\n{self.log(host.name)}")
            return http_status(f"{self.agg_url(i)}/readyz") == 200

        _wait(ready, deadline, f"{host.name} /readyz 200", lambda: self.log(host.name))

    def start_haproxy(self) -> None:
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.aggs, self.workdir / "haproxy.sock"))
        run(["haproxy", "-c", "-f", str(cfg)])
        self._spawn("lb", LB, ["haproxy", "-db", "-f", str(cfg)], self._env())

    def wait_lb_ready(self, deadline: float, servers: int | None = None) -> None:
        want = self.hosts if servers is None else servers
        _wait(
            lambda: sum(s == "UP" for s in self.lb_states().values()) >= want,
            deadline,
            f"HAProxy seeing {want} hosts UP",
            lambda: f"{self.lb_states()}\n{self.log('lb')}",
        )

    def haproxy(self, command: str) -> str:
        """One command on HAProxy's runtime API (its stats socket in the workdir)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.workdir / "haproxy.sock"))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def lb_states(self, backend: str = "ready") -> dict[str, str]:
        """Server -> status (UP, DOWN, MAINT, ...) in a backend, as HAProxy sees it now."""
        try:
            stat = self.haproxy("show stat")
        except OSError:
            return {}
        header, *rows = stat.lstrip("# ").splitlines()
        cols = header.split(",")
        states = {}
        for row in rows:
            values = dict(zip(cols, row.split(","), strict=False))
            if values.get("pxname") == backend and values.get("svname") not in ("BACKEND", None):
                states[values["svname"]] = values["status"].split()[0]
        return states

    # -- faults -------------------------------------------------------------------------------

    def partition_from_redis(self, i: int) -> None:
        """Drop every packet from aggregator host i to the Redis hosts (both ways, in its netns)."""
        host = self.aggs[i]
        ips = "{ " + ", ".join(n.ip for n in REDIS) + " }"
        rules = f"""table inet agc_partition {{
    chain out {{ type filter hook output priority 0; ip daddr {ips} drop; }}
    chain in {{ type filter hook input priority 0; ip saddr {ips} drop; }}
}}
"""
        path = self.workdir / f"partition-{host.name}.nft"
        path.write_text(rules)
        run(in_netns(host, ["nft", "-f", str(path)]))

    def heal(self, i: int) -> None:
        run(in_netns(self.aggs[i], ["nft", "delete", "table", "inet", "agc_partition"]))

    # -- reading it -------------------------------------------------------------------------

    def demo_calls(self) -> dict[str, int]:
        """How many calls each demo service received (since the demo started or was reset)."""
        import httpx

        stats: dict[str, Any] = httpx.get(f"{self.demo_url}/_stats", trust_env=False).json()
        return {k: int(v) for k, v in stats["requests"].items()}

    def cpu_seconds(self, host: Host) -> float:
        """User + system CPU of every process now inside the host's namespace."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in netns_pids(host.netns):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def status(self) -> dict[str, Any]:
        return status(self.workdir)


def status(workdir: Path = DEFAULT_WORKDIR) -> dict[str, Any]:
    """What exists now: namespaces with their process counts, links, and HAProxy's view."""
    report: dict[str, Any] = {
        "namespaces": {ns: len(netns_pids(ns)) for ns in our_namespaces()},
        "links": our_links(),
    }
    if (workdir / "haproxy.sock").exists():
        cluster = LocalCluster(workdir)
        with contextlib.suppress(OSError):
            report["haproxy"] = cluster.lb_states()
        report["redis"] = cluster.redis_roles()
    return report


# -- helpers --------------------------------------------------------------------------------


def http_status(url: str) -> int:
    import httpx

    try:
        return httpx.get(url, timeout=1, trust_env=False).status_code
    except httpx.HTTPError:
        return 0


def _wait(ok: Any, deadline: float, what: str, detail: Any = None, poll: float = 0.1) -> None:
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(poll)
    extra = f"\n{detail()}" if detail is not None else ""
    raise ClusterError(f"timed out waiting for {what}{extra}")


# -- the command ------------------------------------------------------------------------------


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through `with LocalCluster` and atexit


def main(argv: Sequence[str] | None = None) -> int:
    """`up` (foreground until Ctrl-C or --ttl), `down`, `status`."""
    parser = argparse.ArgumentParser(
        prog="deploy/local-cluster", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the topology and keep it until Ctrl-C or --ttl")
    up.add_argument("--ttl", type=float, default=600, help="seconds before it tears down (600)")
    up.add_argument("--hosts", type=int, default=3, choices=(1, 2, 3))
    up.add_argument("--workers", type=int, default=2)
    sub.add_parser("down", help="remove every agc- namespace, link and process inside them")
    sub.add_parser("status", help="what exists now")
    for p in sub.choices.values():
        p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    if args.command == "down":
        for line in teardown() or ["nothing to remove"]:
            print(line)
        return 0
    if args.command == "status":
        print(json.dumps(status(args.workdir), indent=2))
        return 0
    problem = missing_prerequisites()
    if problem is not None:
        print(f"local-cluster: {problem}", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    started = time.monotonic()
    with LocalCluster(args.workdir, hosts=args.hosts, workers=args.workers) as cluster:
        print(f"up in {time.monotonic() - started:.1f} s: {cluster.lb_url} (HAProxy)", flush=True)
        print(json.dumps(cluster.status(), indent=2), flush=True)
        print(f"tearing down in {args.ttl:.0f} s, or on Ctrl-C / SIGTERM", flush=True)
        time.sleep(args.ttl)
    print("down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
