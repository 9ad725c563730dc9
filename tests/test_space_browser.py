"""The Space in a real browser: Debian's Chromium, driven by Playwright, against the real server and model.

Types a message and watches the answer stream, switches model, compares two models blind and votes, reads the
Leaderboard, and stops a long compare.
Screenshots land in test-artifacts/ (ignored by git) for a human to look at.
"""

import re
import shutil

import pytest

from conftest import ARTIFACTS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed "
                                "(make test installs it)")


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            # Root in a container needs --no-sandbox; this machine's network is closed, so Chromium's own
            # background traffic (updates, sync, component downloads) is turned off rather than refused.
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server[0])
        yield page
        browser.close()


def last_bot_message(page, chatbot_id: str) -> str:
    messages = page.locator(f"#{chatbot_id} .message.bot, #{chatbot_id} [data-testid='bot']")
    return messages.last.inner_text() if messages.count() else ""


def test_chat_streams_an_answer(page):
    page.locator("#chat-input textarea").fill("Hello! Tell me about llamas.")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => (document.querySelector('#chat-stats')?.innerText || '').includes('tok/s')", timeout=60_000)
    assert last_bot_message(page, "chat-bot").strip()
    assert re.search(r"TTFT [\d.]+ s", page.locator("#chat-stats").inner_text())
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)


def test_switching_model_answers_with_the_other_model(page):
    page.locator("#chat-model input").click()
    page.get_by_role("option", name="Tiny-B-Q4_K_M").click()
    assert page.locator("#chat-model input").input_value() == "Tiny-B-Q4_K_M"
    before = page.locator("#chat-bot .message.bot, #chat-bot [data-testid='bot']").count()
    page.locator("#chat-input textarea").fill("And now from the other model?")
    page.keyboard.press("Enter")
    page.wait_for_function(
        f"() => document.querySelectorAll('#chat-bot .message.bot, #chat-bot [data-testid=\"bot\"]').length > {before}",
        timeout=60_000)
    page.wait_for_function(
        "() => (document.querySelector('#chat-stats')?.innerText || '').includes('tok/s')", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "chat-model-b.png"), full_page=True)


def test_compare_blind_then_vote_reveals_the_models(page):
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-message textarea").fill("What is the capital of France?")
    page.locator("#compare-send").click()
    for side in ("a", "b"):
        page.wait_for_function(
            f"() => (document.querySelector('#compare-stats-{side}')?.innerText || '').includes('tok/s')",
            timeout=90_000)
    page.wait_for_function(  # both answers finished: a vote now counts (one sent mid-stream is refused)
        "() => (document.querySelector('#compare-reveal')?.innerText || '').includes('vote to see')", timeout=90_000)
    assert "Model A" in page.locator("#compare-stats-a").inner_text()  # names hidden in blind mode
    assert last_bot_message(page, "compare-chat-a").strip() and last_bot_message(page, "compare-chat-b").strip()
    page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    page.locator("#vote-tie").click()
    page.wait_for_function(
        "() => (document.querySelector('#compare-reveal')?.innerText || '').includes('Tiny-A-Q4_K_M')",
        timeout=30_000)
    assert "Tiny-B-Q4_K_M" in page.locator("#compare-reveal").inner_text()
    page.screenshot(path=str(ARTIFACTS / "vote.png"), full_page=True)


def open_leaderboard_and_wait_for(page, votes) -> str:
    """Open the Leaderboard tab and wait until it shows every vote in the log; returns the ratings table's text."""
    from space.ratings import leaderboard, read_votes

    expected = leaderboard(read_votes([votes]))
    counted = f"{expected.counted} vote{'s' * (expected.counted != 1)} counted"
    page.get_by_role("tab", name="Leaderboard").click()
    page.wait_for_function(f"() => (document.querySelector('#leaderboard-summary')?.innerText || '').includes("
                           f"'{counted}')", timeout=30_000)
    table = page.locator("#leaderboard-table").inner_text()
    for row in expected.ratings:
        assert row.model in table and f"{row.wins} / {row.ties} / {row.losses}" in table
    return table


def test_the_leaderboard_tab_counts_the_blind_votes(page, server):
    votes = server[1]
    table = open_leaderboard_and_wait_for(page, votes)
    assert re.search(r"\d+ – \d+", table)  # each rating with its 95% interval
    page.screenshot(path=str(ARTIFACTS / "leaderboard.png"), full_page=True)

    before = len(votes.read_text().splitlines())
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-message textarea").fill("Which is larger, 3 or 5?")
    page.locator("#compare-send").click()
    page.wait_for_function(  # both answers finished
        "() => (document.querySelector('#compare-reveal')?.innerText || '').includes('vote to see')", timeout=90_000)
    page.locator("#vote-A").click()
    page.wait_for_function("() => (document.querySelector('#compare-reveal')?.innerText || '').includes('Thanks')",
                           timeout=30_000)
    assert len(votes.read_text().splitlines()) == before + 1
    open_leaderboard_and_wait_for(page, votes)  # the new vote is counted when the tab opens again


def test_stop_in_compare_ends_both_answers_and_refuses_their_vote(page, server):
    """The Compare tab's Stop button, clicked while both models write long answers: both end well before their
    token budget, the tab says the compare was stopped, and a vote on the cut answers is refused (none recorded).
    Last in this file: it leaves the Compare settings at a long, hot answer."""
    votes = server[1]
    before = len(votes.read_text().splitlines()) if votes.exists() else 0
    budget = 960  # max new tokens: the most that fits the server's 1,024-token context beside this prompt
    page.get_by_role("tab", name="Compare").click()
    page.get_by_text("Settings (the same for both)").click()
    for slider, value in (("compare-temperature", "2"), ("compare-top-p", "1"), ("compare-max-new-tokens", budget)):
        number = page.locator(f"#{slider} input[type=number]")
        number.fill(str(value))
        number.press("Enter")
    page.locator("#compare-message textarea").fill("Write a very long story about a lighthouse.")
    page.locator("#compare-send").click()
    # This compare's first update (the stats still show the last compare's figures until it lands), then both
    # models writing.
    page.wait_for_function(
        "() => (document.querySelector('#compare-reveal')?.innerText || '').includes('being written')", timeout=90_000)
    for side in ("a", "b"):
        page.wait_for_function(
            f"() => (document.querySelector('#compare-stats-{side}')?.innerText || '').includes('TTFT')",
            timeout=90_000)
    page.locator("#compare-stop").click()
    page.wait_for_function(
        "() => (document.querySelector('#compare-reveal')?.innerText || '').includes('Stopped')", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "compare-stopped.png"), full_page=True)
    for side in ("a", "b"):
        tokens = re.search(r"(\d+) tokens?", page.locator(f"#compare-stats-{side}").inner_text())
        assert tokens and int(tokens.group(1)) < budget, page.locator(f"#compare-stats-{side}").inner_text()
    page.locator("#vote-tie").click()
    page.wait_for_function("() => (document.querySelector('#compare-reveal')?.innerText || '').includes("
                           "'stopped before their end')", timeout=30_000)
    reveal = page.locator("#compare-reveal").inner_text()
    assert "stopped before their end" in reveal, reveal
    assert (len(votes.read_text().splitlines()) if votes.exists() else 0) == before
