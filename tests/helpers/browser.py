"""Debian's headless Chromium driven by Playwright, for the tests that look at a real page.

Playwright's own browser download cannot reach its host here, so the browser is the system's
/usr/bin/chromium (apt-get install chromium; `./dev test` installs it when run as root).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def headless_chromium() -> Iterator:
    """A Playwright browser on the system's Chromium; the test is skipped, saying why, without one."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = Path(shutil.which("chromium") or "/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium package is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
