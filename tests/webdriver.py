"""A minimal W3C WebDriver client (the standard library's urllib talking to chromedriver), enough for a test
to open a page in headless Debian Chromium, type, click, read the DOM and take a screenshot."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1000,700"]


def chromium_binaries() -> tuple[str, str] | None:
    """(chromium, chromedriver) when both are installed, else None."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def _call(url: str, method: str = "GET", payload: dict | None = None, timeout: float = 60) -> object:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.load(reply)["value"]
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"WebDriver {method} {url}: {err.code} {err.read()[:500]!r}") from None


class Browser:
    """One chromedriver process and one headless Chromium session."""

    def __init__(self, chromium: str, driver: str, port: int, startup_timeout: float = 60,
                 language: str = "en-US"):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.driver = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                if _call(self.base + "/status", timeout=5).get("ready"):
                    break
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline or self.driver.poll() is not None:
                self.driver.kill()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.2)
        # `language`: what the page sees in navigator.languages (and Accept-Language).
        options = {"binary": chromium, "prefs": {"intl.accept_languages": language},
                   "args": CHROMIUM_FLAGS + [f"--user-data-dir={self.profile}", f"--lang={language}"]}
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        try:
            session = _call(self.base + "/session", "POST", {"capabilities": capabilities}, timeout=120)
        except Exception:
            self.driver.kill()
            raise
        self.session = f"{self.base}/session/{session['sessionId']}"

    def open(self, url: str) -> None:
        _call(self.session + "/url", "POST", {"url": url})

    def element(self, css: str) -> str:
        return _call(self.session + "/element", "POST", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        _call(f"{self.session}/element/{self.element(css)}/value", "POST", {"text": text})

    def click(self, css: str) -> None:
        _call(f"{self.session}/element/{self.element(css)}/click", "POST", {})

    def script(self, source: str, *args: object) -> object:
        return _call(self.session + "/execute/sync", "POST", {"script": source, "args": list(args)})

    def wait_for(self, source: str, timeout: float = 60) -> object:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.script(f"return ({source});")
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout}s for {source}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(_call(self.session + "/screenshot")))
        return path

    def close(self) -> None:
        try:
            _call(self.session, "DELETE", timeout=30)
        finally:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
