"""The web chat page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""

from __future__ import annotations

import pytest

from tests.helpers.browser import headless_chromium, update_docs_screenshot

pytestmark = pytest.mark.slow  # against a real server process



@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as browser:
        yield browser


def test_chat_page_streams_a_reply(browser, deployment, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(deployment.server.url + "/")

    page.fill("#api-key", deployment.api_key)
    page.dispatch_event("#api-key", "change")
    # The model picker fills from /v1/models once the key is known, and the lineage shows.
    page.wait_for_function("document.querySelectorAll('#model option').length >= 2", timeout=10_000)
    assert page.locator("#model option").first.get_attribute("value") == "nanogpt"
    page.wait_for_selector("#lineage details", timeout=10_000)
    assert "checkpoint" in page.inner_text("#lineage")
    assert "demo-cloze" in page.inner_text("#lineage")

    page.fill("#max-tokens", "60")
    page.fill("#seed", "7")  # a reproducible reply for the saved screenshot
    page.fill("#prompt", "Write a short poem about the sea.")
    page.click("#send")

    reply = page.locator(".message.assistant").last
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.message.assistant')].pop();"
        " return m && Number(m.dataset.chunks) >= 1; }", timeout=20_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.message.assistant')].pop().dataset.done === 'true'", timeout=30_000)
    # Text arrived in several pieces (streamed), not as one block at the end.
    assert int(reply.get_attribute("data-chunks")) > 1
    assert "error" not in (reply.get_attribute("class") or "")
    assert page.inner_text(".message.user") == "Write a short poem about the sea."
    assert not errors

    shot = tmp_path / "chat_ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    update_docs_screenshot(shot, "chat_ui.png")
    page.close()


def test_stop_button_ends_a_reply_early(browser, deployment):
    page = browser.new_page()
    page.goto(deployment.server.url + "/")
    page.fill("#api-key", deployment.api_key)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelectorAll('#model option').length >= 2", timeout=10_000)
    page.fill("#max-tokens", "230")
    page.fill("#temperature", "1")
    page.fill("#prompt", "Go on for a long time.")
    page.click("#send")
    # Stop as soon as the request is under way: the tiny test model writes all 230 tokens in
    # well under a second, so waiting for text to arrive first would race the end of the reply.
    page.wait_for_selector("#stop:not([disabled])", timeout=10_000)
    page.click("#stop")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.message.assistant')].pop().dataset.done === 'true'", timeout=10_000)
    assert "stopped" in page.inner_text(".message.assistant .meta")
    page.close()


def test_lineage_panel_shows_the_report_card_as_tables(browser, deployment):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(deployment.server.url + "/")
    page.fill("#api-key", deployment.api_key)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#lineage details[data-section='Report card']", timeout=10_000)
    panel = page.inner_text("#lineage")
    assert "[object Object]" not in panel and "{" not in panel
    # nested values are tables: the score candidates, the previous deployment's score beside this one
    assert page.locator("#lineage details[data-section='Report card'] table table").count() >= 1
    assert "previous deployment" in panel and "deploy-0" in panel
    # the greedy replies are a table with a row per prompt, a column per field
    replies = page.locator("#lineage details[data-section='Greedy replies'] table.grid")
    assert replies.locator("tbody tr").count() == 5  # the random checkpoint has no chat lineage: text prompts
    assert "prompt" in replies.locator("thead").inner_text()
    assert not errors
    page.close()
