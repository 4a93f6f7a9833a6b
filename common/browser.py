"""Headless Chromium through Selenium, from Debian's packages (``chromium``, ``chromium-driver``): never a download.

    with headless_chromium(640, 480) as driver:
        driver.get("file:///tmp/page.html")
        png = driver.get_screenshot_as_png()   # exactly 640 x 480, device pixel ratio 1

`Chromium` is the restartable form a long job keeps (``.driver``, ``.restart()`` after a hung or dead browser,
``.close()``). Every start gets a fresh profile in a temporary folder (removed on close), flags that keep it
offline and quiet (no sync, component updates, background networking or QUIC), and an emulated viewport of
exactly ``width`` x ``height`` CSS pixels at scale 1, so screenshots and ``getBoundingClientRect`` share one
pixel grid. http(s) and ws(s) requests are blocked (pages load from ``file://`` URLs) unless ``block_network``
is false, as for a page served on localhost. A missing program or driver library is a `BrowserError` naming
what to install.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

APT_PACKAGES = "chromium chromium-driver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--mute-audio")
BLOCKED_URLS = ("http://*", "https://*", "ws://*", "wss://*")
FALLBACK = {"chromium": "/usr/bin/chromium", "chromedriver": "/usr/bin/chromedriver"}  # where Debian puts them


class BrowserError(RuntimeError):
    """Chromium cannot start: a missing program (the apt packages to install) or driver library, or a failed
    launch (chromedriver's reason, on one line)."""


def find_program(name: str) -> str:
    """``name`` (chromium | chromedriver) on PATH, else where Debian puts it; neither: `BrowserError` with the apt
    command."""
    fallback = FALLBACK[name]
    path = shutil.which(name) or (fallback if Path(fallback).is_file() else None)
    if path is None:
        raise BrowserError(f"{name} not found (on PATH or at {fallback}): apt-get install {APT_PACKAGES}")
    return path


class Chromium:
    """One headless Chromium driven by chromedriver, started on construction; ``timeout_s`` bounds a page load
    and a script (Selenium's own HTTP timeout is set above it, so a hung renderer cannot block a command for
    longer)."""

    def __init__(self, width: int, height: int, timeout_s: float = 30.0, chromium: str | None = None,
                 chromedriver: str | None = None, block_network: bool = True):
        self.width, self.height, self.timeout_s, self.block_network = width, height, timeout_s, block_network
        self.chromium = chromium or find_program("chromium")
        self.chromedriver = chromedriver or find_program("chromedriver")
        for path in (self.chromium, self.chromedriver):
            if not Path(path).is_file():
                raise BrowserError(f"{path} not found: apt-get install {APT_PACKAGES}")
        self.driver: Any = None
        self._profile: str | None = None
        self.starts = 0
        self.start()

    def start(self) -> Any:
        try:
            from selenium import webdriver
            from selenium.common.exceptions import WebDriverException
            from selenium.webdriver.chrome.service import Service
        except ImportError as e:
            raise BrowserError(f"the Python driver is missing ({e}): pip install selenium") from None
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        options = webdriver.ChromeOptions()
        options.binary_location = self.chromium
        for flag in (*FLAGS, f"--user-data-dir={self._profile}", f"--window-size={self.width},{self.height}"):
            options.add_argument(flag)
        try:
            driver = webdriver.Chrome(service=Service(self.chromedriver), options=options)
        except WebDriverException as e:
            self._remove_profile()
            raise BrowserError(f"chromium did not start: {(e.msg or str(e)).strip().splitlines()[0]}") from None
        self.driver = driver
        self.starts += 1
        driver.command_executor._client_config.timeout = self.timeout_s + 30  # Selenium's default: 120 s
        driver.set_page_load_timeout(self.timeout_s)
        driver.set_script_timeout(self.timeout_s)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                                     "deviceScaleFactor": 1, "mobile": False})
        if self.block_network:
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": list(BLOCKED_URLS)})
        return driver

    @property
    def version(self) -> str:
        return str(self.driver.capabilities.get("browserVersion", "unknown")) if self.driver else "unknown"

    def restart(self) -> Any:
        """A fresh browser (after a page hung it or it died) -> the new driver."""
        self.close()
        return self.start()

    def close(self) -> None:
        if self.driver is not None:
            # a dead browser's quit may raise; Selenium stops chromedriver (and with it chromium) either way
            with contextlib.suppress(Exception):
                self.driver.quit()
            self.driver = None
        self._remove_profile()

    def _remove_profile(self) -> None:
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None


@contextmanager
def headless_chromium(width: int, height: int, timeout_s: float = 30.0, block_network: bool = True) -> Iterator[Any]:
    """A started headless Chromium's Selenium driver with a ``width`` x ``height`` viewport, quit on exit."""
    browser = Chromium(width, height, timeout_s, block_network=block_network)
    try:
        yield browser.driver
    finally:
        browser.close()
