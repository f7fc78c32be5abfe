"""A real headless Chromium driven over the Chrome DevTools Protocol, for the browser tests.

No selenium/playwright (heavy, and a second browser download): Debian's `chromium` package is
started with `--remote-debugging-port=0`, the port it picked is read from `DevToolsActivePort`
in its profile directory, and one page is driven over a websocket with aiohttp (a dependency
already). Every wait is bounded, and the browser is stopped by its own pid (then its process
group, which it leads), never by name.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: The flags the issue asks for, plus a private profile and a fixed window size.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--remote-debugging-port=0",
    "--window-size=1280,1000",
)
COMMAND_TIMEOUT = 15.0


def find_chromium() -> str | None:
    """The browser's path, or None: `$CHROMIUM`, else the first known name on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(RuntimeError):
    """A DevTools command failed, or the page's script threw."""


class Page:
    """One browser tab: send commands, keep every event, evaluate and wait for expressions."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []

    async def read_messages(self) -> None:
        """Resolve answers and record events until the socket closes."""
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._pending.pop(data["id"], None) if "id" in data else None
            if future is None:
                self.events.append(data)
            elif not future.done():
                if "error" in data:
                    future.set_exception(CdpError(f"{data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CdpError("the DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        await self._ws.send_json({"id": number, "method": method, "params": params})
        return await asyncio.wait_for(future, COMMAND_TIMEOUT)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of `expression` in the page (promises are awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float) -> Any:
        """Poll until `expression` is truthy; fail with the page's last state after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                body = await self.evaluate("document.body && document.body.innerText")
                raise TimeoutError(f"{expression!r} not true within {timeout} s; page:\n{body}")
            await asyncio.sleep(0.1)

    async def navigate(self, url: str, timeout: float = 20.0) -> None:
        """Load `url` and wait until its scripts ran (`load` fired).

        The old document is marked first: the page may rewrite its own URL (history API), so
        "a new document that finished loading" is the test, not the address.
        """
        await self.evaluate("window.__cdpOldDocument = true")
        await self.send("Page.navigate", url=url)
        await self.wait_for(
            "!window.__cdpOldDocument && document.readyState === 'complete'", timeout
        )

    async def screenshot(self, path: Path) -> Path:
        """The whole page (not only the window) as PNG."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        shot = await self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def problems(self, *, ignore_network: bool = False) -> list[str]:
        """Uncaught exceptions, console.error/assert calls and error log entries (CSP too)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(f"console.{params['type']}: {params['args']}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                if not (ignore_network and entry.get("source") == "network"):
                    found.append(f"log ({entry.get('source')}): {entry['text']} {entry.get('url')}")
        return found


async def _devtools_port(profile: Path, popen: subprocess.Popen[bytes], timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"chromium exited with {popen.returncode}")
        if marker.is_file():
            first = marker.read_text().split("\n", 1)[0].strip()
            if first.isdigit():
                return int(first)
        await asyncio.sleep(0.05)
    raise RuntimeError(f"chromium did not open its DevTools port within {timeout} s")


def _stop(popen: subprocess.Popen[bytes]) -> None:
    """Terminate our browser by pid; then its process group (renderers, zygote) if left over."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)  # it leads its own session: only its children


@contextlib.asynccontextmanager
async def open_page(browser: str, workdir: Path, *, timeout: float = 30.0) -> AsyncIterator[Page]:
    """Start headless Chromium with a private profile in `workdir`; yield its one blank tab."""
    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    log = workdir / "chromium.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        port = await _devtools_port(profile, popen, timeout)
        http_timeout = aiohttp.ClientTimeout(total=timeout)
        async with aiohttp.ClientSession(timeout=http_timeout) as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as listing:
                targets = await listing.json()
            page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(page_url, max_msg_size=64 * 1024 * 1024) as ws:
                page = Page(ws)
                reader = asyncio.create_task(page.read_messages())
                try:
                    for domain in ("Page", "Runtime", "Log"):
                        await page.send(f"{domain}.enable")
                    yield page
                finally:
                    await ws.close()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(reader, 5)
    finally:
        _stop(popen)
