"""The assistant example (examples/assistant) seen from the browser page: someone writes @assistant in a session
and its summary appears in the page, written by "assistant", live.

The assistant service and the server run in this event loop (as in test_assistant_example.py): the server's
webhooks go to the service, whose answer comes back through the HTTP API; the page is Debian's Chromium.
"""

from __future__ import annotations

import base64

import pytest
from browser_helpers import ARTIFACTS, CHROMIUM, open_tab
from playwright.async_api import expect

from examples.assistant.service import Assistant, Settings
from server.app import running
from server.config import Config

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}"),
    pytest.mark.timeout(90),
]

KEY = "the-browser-assistant-api-key"
SECRET = "whsec_" + base64.b64encode(b"the browser assistant's secret!!").decode()
DOC, SECTION = "launch-plan", "risks"


def message_at(tab, seq: int):
    return tab.page.locator(f"#messages li.message[data-seq='{seq}']")


async def send_and_wait(tab, seq: int, text: str) -> None:
    """Type `text` in the composer, press Enter, and wait for the server to have it as message `seq`."""
    await tab.send(text)
    await expect(message_at(tab, seq)).to_have_attribute("data-status", "sent")


async def test_the_assistant_answers_in_the_page_when_someone_writes_at_assistant(browser, data_dir):
    """Alice and Bob talk in a session; Alice writes "@assistant what is open?" and the summary shows up for both."""
    assistant = Assistant(Settings(api_key=KEY, webhook_secret=SECRET, port=0, max_age=300))
    await assistant.start()
    try:
        config = Config(
            port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0,
            api_keys=(KEY,), api_port=0, webhooks=(assistant.url,), webhook_secret=SECRET,
        )  # fmt: skip
        async with running(config) as app:
            assistant.api_url = f"http://127.0.0.1:{app.api_port}"

            alice = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice")
            bob = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="bob")
            await alice.wait_connected()
            await bob.wait_connected()
            await alice.page.get_by_label("Title of a new session").fill("Launch risks")
            await alice.page.get_by_role("button", name="Create").click()
            await expect(alice.page.locator("#session-title")).to_have_text("Launch risks")
            await bob.page.locator("#sessions button.session", has_text="Launch risks").click()
            await expect(bob.page.locator("#session-title")).to_have_text("Launch risks")

            await send_and_wait(alice, 1, "The draft is up.")
            await send_and_wait(bob, 2, "Which build has the fix?")
            await send_and_wait(alice, 3, "Build 42.")
            await send_and_wait(bob, 4, "When do we ship?")
            await expect(alice.messages("When do we ship?")).to_have_count(1)
            await send_and_wait(alice, 5, "@assistant what is open?")  # plain text: the assistant reads "@assistant"

            expected = [
                "Summary so far: 5 messages from 2 people.",
                "Messages per author: alice 3, bob 2.",
                "Open questions (1):",
                "- bob (#4): When do we ship?",
            ]
            for tab in (alice, bob):
                answer = tab.page.locator("#messages li.message[data-author='assistant']")
                await expect(answer).to_have_count(1, timeout=15_000)
                await expect(answer).to_have_attribute("data-seq", "6")
                await expect(answer.locator(".message-text")).to_have_text("\n".join(expected))
            # It mentions whoever asked: marked as a mention of Alice in her page, not in Bob's.
            await expect(message_at(alice, 6)).to_have_attribute("data-mentions-me", "true")
            await expect(message_at(bob, 6)).not_to_have_attribute("data-mentions-me", "true")
            await expect(alice.page.locator("#sessions button.session .session-preview")).to_contain_text(
                "assistant: Summary so far"
            )

            # The document view follows within its summary window: six messages, all read by Alice, who is here.
            risks = alice.page.locator(f"#sections [data-section-id='{SECTION}']")
            await expect(risks.locator(".section-counts")).to_have_text("1 open · 6 messages")
            await expect(risks.locator(".unread")).to_have_count(0)

            ARTIFACTS.mkdir(exist_ok=True)
            await alice.page.mouse.move(0, 0)
            await alice.page.screenshot(path=ARTIFACTS / "assistant-answer.png")

            await assistant.drain()
            assert assistant.outcomes == {"created": 1}
            await expect(alice.page.locator("#messages li.message")).to_have_count(6)  # its answer started nothing
            assert alice.console_errors == [] and bob.console_errors == []
            assert alice.dialogs == [] and bob.dialogs == []
    finally:
        await assistant.stop()
