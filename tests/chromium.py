"""Debian's headless chromium for the browser tests (the `ipl eval` report, the `ipl serve` page).

CI sets `IPL_REQUIRE_BROWSER=1` (`.ci/run` installs chromium): there a missing browser is
a failure; elsewhere the browser tests skip, saying what to install.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRED = os.environ.get("IPL_REQUIRE_BROWSER", "") not in ("", "0")

#: Mark of a module that needs the browser.
needs_chromium = pytest.mark.skipif(
    not REQUIRED and not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's chromium and chromedriver: apt-get install chromium chromium-driver",
)


@contextlib.contextmanager
def headless_chromium(profile: Path, window: str = "1400,1000") -> Iterator:
    """A selenium driver of headless chromium through Debian's chromedriver (no driver download, no network)."""
    if REQUIRED:
        from selenium import webdriver
    else:
        webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        f"--window-size={window}", "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_AVOID_STATS", "true")  # should Selenium Manager run at all, it must not phone home
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
