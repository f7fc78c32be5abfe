"""The Docker image for the tests: which container tool, the image (built once), a container.

The tool is `AGGREGATOR_CONTAINER_CLI` when set (`.ci/run` sets it, with a podman wrapper on
machines that need one), else `podman`, else a `docker` whose daemon answers. The image is
`AGGREGATOR_CONTAINER_IMAGE` when set (`.ci/run` builds it first), else built here from the
Dockerfile (its layers are cached by the tool, so a rebuild after a code change is short).
Containers share the host's network (some machines have no bridge network) and bind loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support.paths import ROOT

CLI_ENV = "AGGREGATOR_CONTAINER_CLI"
IMAGE_ENV = "AGGREGATOR_CONTAINER_IMAGE"
TEST_IMAGE = "localhost/aggregator:test"


def find_cli() -> tuple[list[str] | None, str]:
    """The container command to use, or None and why there is none."""
    given = os.environ.get(CLI_ENV)
    if given:
        return [given], f"{CLI_ENV}={given}"
    problems = []
    for name in ("podman", "docker"):
        found = shutil.which(name)
        if found is None:
            problems.append(f"{name} is not installed")
            continue
        done = subprocess.run([found, "info"], capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return [found], name
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        problems.append(f"`{name} info` failed ({last})")
    return None, "; ".join(problems)


def is_podman(cli: list[str]) -> bool:
    done = subprocess.run([*cli, "--version"], capture_output=True, text=True, timeout=30)
    return "podman" in done.stdout.lower()


def build_image(cli: list[str]) -> str:
    """The image to run: the one named by IMAGE_ENV, else the Dockerfile built now."""
    given = os.environ.get(IMAGE_ENV)
    if given:
        return given
    # podman's default (OCI) image format drops HEALTHCHECK; docker's builder keeps it.
    formats = ["--format", "docker"] if is_podman(cli) else []
    command = [*cli, "build", *formats, "--network=host", "-t", TEST_IMAGE, str(ROOT)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=280)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr}")
    return TEST_IMAGE


def inspect_image(cli: list[str], image: str) -> dict[str, Any]:
    """The image's config (User, Cmd, Healthcheck...), as docker and podman both report it."""
    done = subprocess.run(
        [*cli, "image", "inspect", image], capture_output=True, text=True, timeout=60, check=True
    )
    inspected = json.loads(done.stdout)[0]
    config: dict[str, Any] = dict(inspected["Config"])
    # docker reports the health check in Config, podman beside it (and neither one when absent).
    config.setdefault("Healthcheck", inspected.get("Healthcheck"))
    return config


@dataclass
class Container:
    """One container of the image, run detached with the image's own CMD on another port."""

    cli: list[str]
    image: str
    port: int
    env: dict[str, str]
    name: str = field(default_factory=lambda: f"aggregator-test-{uuid.uuid4().hex[:12]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The image's CMD with only its bind address changed (the host's network is shared)."""
        argv: list[str] = list(inspect_image(self.cli, self.image)["Cmd"])
        argv[argv.index("--bind") + 1] = f"127.0.0.1:{self.port}"
        return argv

    def start(self, timeout: float = 60.0) -> None:
        env = [arg for key, value in self.env.items() for arg in ("-e", f"{key}={value}")]
        run = [*self.cli, "run", "-d", "--name", self.name, "--network=host", *env]
        subprocess.run(
            [*run, self.image, *self.command()], capture_output=True, timeout=120, check=True
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if not self.running():
                raise AssertionError(f"the container exited:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no /healthz 200 within {timeout:g} s:\n{self.logs()}")
            time.sleep(0.2)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.cli, *args], capture_output=True, text=True, timeout=timeout)

    def running(self) -> bool:
        state = self._run("inspect", "--format", "{{.State.Running}}", self.name)
        return state.stdout.strip() == "true"

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self._run("exec", self.name, *argv)

    def logs(self) -> str:
        done = self._run("logs", self.name)
        return done.stdout + done.stderr

    def signal(self, name: str) -> None:
        self._run("kill", "--signal", name, self.name).check_returncode()

    def wait(self, timeout: float) -> int:
        """The container's exit code, once it has exited."""
        done = self._run("wait", self.name, timeout=timeout)
        done.check_returncode()
        return int(done.stdout.strip().splitlines()[-1])

    def remove(self) -> None:
        if self.running():
            self._run("kill", self.name)
        self._run("rm", "--force", self.name)
