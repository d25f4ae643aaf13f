"""Debian's headless Chromium driven by Playwright, for the tests that look at a real page.

Playwright's own browser download cannot reach its host here, so the browser is the system's
/usr/bin/chromium (apt-get install chromium; `./dev test` installs it when run as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

DOCS_SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
UPDATE_SCREENSHOTS_ENV = "NANOGPT_UPDATE_SCREENSHOTS"

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


def update_docs_screenshot(shot: Path, name: str) -> None:
    """Copy a screenshot a test took over the docs' copy, only when NANOGPT_UPDATE_SCREENSHOTS=1:
    a plain test run leaves the working tree as it found it."""
    if os.environ.get(UPDATE_SCREENSHOTS_ENV) == "1":
        DOCS_SCREENSHOTS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOTS / name)
