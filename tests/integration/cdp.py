"""Headless Chromium driven over the DevTools protocol (a websocket): open a page, act on it
with JavaScript, wait for what a user would see, take a screenshot. Used by test_ui_browser,
where `--dump-dom` alone cannot type into a search box or wait for charts drawn late."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from pathlib import Path

import httpx
import websockets
from live_servers import free_port


class Browser:
    def __init__(self, chromium: str, width: int = 1500, height: int = 1000):
        self.port = free_port()
        self.size = (width, height)
        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--hide-scrollbars", f"--remote-debugging-port={self.port}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()

    def _page(self) -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{self.port}/json", timeout=2).json()
                return next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
            except (httpx.HTTPError, StopIteration):
                assert time.monotonic() < deadline, "Chromium's DevTools endpoint never answered"
                time.sleep(0.2)

    def visit(self, url: str, *, type_into: tuple[str, str] | None = None, until: str,
              timeout: float = 120, screenshot: Path | None = None) -> str:  # fmt: skip
        """Open `url`; optionally type text into the input matching a CSS selector; wait until the
        JavaScript expression `until` is true (polled, real time); return the page's text."""
        return asyncio.run(self._visit(url, type_into, until, timeout, screenshot))

    async def _visit(self, url, type_into, until, timeout, screenshot) -> str:
        async with websockets.connect(self._page(), max_size=64_000_000) as ws:
            counter = 0

            async def call(method: str, **params: object) -> dict:
                nonlocal counter
                counter += 1
                await ws.send(json.dumps({"id": counter, "method": method, "params": params}))
                while True:
                    message = json.loads(await ws.recv())
                    if message.get("id") == counter:
                        return message.get("result", {})

            async def evaluate(expression: str) -> object:
                result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                return result.get("result", {}).get("value")

            width, height = self.size
            await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                       mobile=False)  # fmt: skip
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            typed = type_into is None
            while True:
                if not typed:  # a React input: set its value the way React sees a user's typing
                    selector, text = type_into
                    typed = await evaluate(
                        f"(() => {{ const box = document.querySelector({json.dumps(selector)}); if (!box) return false;"
                        " Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set"
                        f".call(box, {json.dumps(text)}); box.dispatchEvent(new Event('input', {{bubbles: true}}));"
                        " return true; })()"
                    )
                if typed and await evaluate(f"Boolean({until})"):
                    break
                assert time.monotonic() < deadline, f"{url}: not shown within {timeout:.0f} s: {until}"
                await asyncio.sleep(0.5)
            if screenshot is not None:
                await asyncio.sleep(1)  # the last chart's animation
                shot = await call("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            return str(await evaluate("document.body.innerText"))
