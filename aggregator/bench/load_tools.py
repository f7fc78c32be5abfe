"""Run one bounded load: wrk when installed, else the built-in generator, each as a child process.

Both report the same `LoadResult`. wrk's CPU comes from the kernel's accounting of the reaped
child (`os.wait4`, all its threads); the built-in generator measures its own during the load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from aggregator.bench.loadgen import LoadResult, check_loopback

Tool = Literal["wrk", "builtin"]

#: wrk prints one JSON line in `done`; latencies are in microseconds. With BENCH_COUNT_PARTIAL
#: set, `response` counts answers flagged incomplete (header names arrive in any case); it
#: costs wrk CPU per response, so it is only installed when the workload injects failures.
#: Each thread has its own Lua state: the counts are gathered from every thread in `done`.
_WRK_SCRIPT = """
local threads = {}
setup = function(thread) table.insert(threads, thread) end
if os.getenv("BENCH_COUNT_PARTIAL") then
  partial = 0
  response = function(status, headers, body)
    for name, value in pairs(headers) do
      if value == "false" and string.lower(name) == "x-aggregate-complete" then
        partial = partial + 1
      end
    end
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  local partial = 0
  for _, thread in ipairs(threads) do partial = partial + (thread:get("partial") or 0) end
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"partial":%d,"p50":%.1f,"p95":%.1f,"p99":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    partial, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


class LoadError(RuntimeError):
    """The generator failed or printed nothing usable; the message carries its output."""


def wrk_available() -> bool:
    """Whether wrk is on PATH."""
    return shutil.which("wrk") is not None


def run_load(
    tool: Tool,
    url: str,
    concurrency: int,
    duration: float,
    requests: int | None = None,
    timeout: float = 10.0,
    count_partial: bool = False,
    required: tuple[str, ...] = (),
) -> LoadResult:
    """One load run against a loopback `url`, bounded by `duration` (and `requests` if given).

    `required` names the aggregate's required sources, so 502/504 caused by them are counted
    as designed (`LoadResult.designed_5xx`); that reads bodies, which only the built-in does.
    """
    check_loopback(url)
    # wrk has no request budget (a thread can stop itself, but the run still lasts the whole
    # duration, so its rate would be wrong): count-bounded runs use the built-in generator.
    if tool == "wrk" and requests is None and not required:
        return _run_wrk(url, concurrency, duration, timeout, count_partial)
    return _run_builtin(url, concurrency, duration, requests, timeout, required)


def _run_wrk(
    url: str, concurrency: int, duration: float, timeout: float, count_partial: bool
) -> LoadResult:
    threads = min(2, concurrency)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "BENCH_COUNT_PARTIAL"}
    if count_partial:
        env["BENCH_COUNT_PARTIAL"] = "1"
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={max(1, round(timeout))}s",
        "-s",
        script.name,
        url,
    ]
    try:
        out, cpu = _run_child(command, duration + timeout + 30, env)
    finally:
        Path(script.name).unlink(missing_ok=True)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    if line is None:
        raise LoadError(f"wrk printed no result:\n{out[-2000:]}")
    raw = json.loads(line)
    return LoadResult(
        tool="wrk",
        concurrency=concurrency,
        duration_s=raw["duration_us"] / 1e6,
        requests=raw["requests"],
        ok=raw["requests"] - raw["status"],
        status_errors=raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"],
        timeouts=raw["timeout"],
        p50_ms=raw["p50"] / 1000,
        p95_ms=raw["p95"] / 1000,
        p99_ms=raw["p99"] / 1000,
        generator_cpu_s=cpu,
        partial=raw["partial"],
    )


def _run_builtin(
    url: str,
    concurrency: int,
    duration: float,
    requests: int | None,
    timeout: float,
    required: tuple[str, ...] = (),
) -> LoadResult:
    command = [
        sys.executable,
        "-m",
        "aggregator.bench.loadgen",
        url,
        f"--concurrency={concurrency}",
        f"--duration={duration}",
        f"--timeout={timeout}",
    ]
    if requests is not None:
        command.append(f"--requests={requests}")
    command += [f"--required={name}" for name in required]
    out, _ = _run_child(command, duration + timeout + 30, dict(os.environ))
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    if line is None:
        raise LoadError(f"the built-in generator printed no result:\n{out[-2000:]}")
    # The CPU it reports itself covers the load alone: the kernel's figure (`cpu`) adds about
    # half a second of interpreter start-up and imports, which is not load.
    return LoadResult(**json.loads(line))


def _run_child(command: list[str], limit: float, env: dict[str, str]) -> tuple[str, float]:
    """Run a generator to completion (killed past `limit` s); its output and its CPU seconds."""
    with tempfile.TemporaryFile() as out:
        popen = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + limit
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid:
                popen.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                popen.kill()
                _, status, usage = os.wait4(popen.pid, 0)
                popen.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.05)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if popen.returncode != 0:
        raise LoadError(f"{command[0]} exited with {popen.returncode}:\n{text[-2000:]}")
    return text, usage.ru_utime + usage.ru_stime
