"""The editor example (examples/editor: Tiptap from npm) in Debian's Chromium against a real server process.

Two people open one document; the author starts chats in three sections through the
side panel, then renames a heading, merges two sections and deletes a third (and
undoes and redoes the delete). The other person's badges and panel follow live, and
after the server is killed and started again on the same data dir and port, every
chat is where it was moved to.
The example is built once per test session (`npm ci`, `npm run build`); every wait
is on what a page shows. Screenshots land in test-artifacts/ (editor-*.png).
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from urllib.parse import urlencode

import pytest
from browser_helpers import ARTIFACTS, CHROMIUM, NARROW, Tab, open_page
from conftest import NO_RATE_LIMITS, ROOT, ServerProcess
from playwright.async_api import Browser, expect

from client import ScriptClient

EDITOR = ROOT / "examples" / "editor"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}"),
    # The first test also builds the example (npm ci: a download on a fresh machine).
    pytest.mark.timeout(300),
]

DOC = "launch-plan"


def npm(*args: str) -> None:
    """Run npm in examples/editor; fail with its output if it fails."""
    found = shutil.which("npm")
    if found is None:
        pytest.fail(
            "npm is not installed: the editor example is built with `npm ci && npm run build` (Node 18 or later)"
        )
    result = subprocess.run([found, *args], cwd=EDITOR, capture_output=True, text=True, timeout=240)
    if result.returncode != 0:
        pytest.fail(
            f"`npm {' '.join(args)}` failed in {EDITOR} (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
        )


@pytest.fixture(scope="session")
def editor_dist() -> Path:
    """The example, installed from its lock file and built, once per test session."""
    npm("ci", "--no-audit", "--no-fund")
    npm("run", "build")
    dist = EDITOR / "dist"
    assert (dist / "editor.js").is_file() and (dist / "index.html").is_file()
    return dist


@pytest.fixture(scope="session")
def serve(editor_dist: Path) -> ModuleType:
    """examples/editor/serve.py, the example's stand-in backend (static files and shared documents)."""
    spec = importlib.util.spec_from_file_location("editor_serve", EDITOR / "serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def editor_site(serve: ModuleType) -> Iterator:
    """The built page and its document store on a free port, in a thread."""
    with serve.EditorServer(port=0) as site:
        yield site


async def open_editor(browser: Browser, site_url: str, chat_port: int, name: str, viewport: dict | None = None) -> Tab:
    """A fresh browser context (another person) on the editor page, recording its console errors."""
    query = urlencode({"ws": f"ws://127.0.0.1:{chat_port}/ws", "doc": DOC, "name": name})
    return await open_page(browser, f"{site_url}?{query}", viewport)


def unexpected(errors: list[str]) -> list[str]:
    """Console errors other than Chromium's own report of a refused reconnect attempt (the server was down)."""
    return [e for e in errors if not re.match(r"WebSocket connection to '\S+' failed: .*ERR_CONNECTION_REFUSED", e)]


def heading(tab: Tab, section_id: str):
    return tab.page.locator(f".tiptap :is(h1, h2, h3)[data-section-id='{section_id}']")


def titled(text: str) -> re.Pattern[str]:
    """A heading's text as the page shows it: its title, then its badge ("Chat", "2 chats")."""
    return re.compile(rf"^{re.escape(text)}(Chat|\d)")


def badge(tab: Tab, section_id: str):
    return tab.page.locator(f".chat-badge[data-section-id='{section_id}']")


async def expect_badge(tab: Tab, section_id: str, *, open: int, unread: int) -> None:
    await expect(badge(tab, section_id)).to_have_attribute("data-open", str(open))
    await expect(badge(tab, section_id)).to_have_attribute("data-unread", str(unread))


def listed(tab: Tab):
    """The titles of the chats the panel lists."""
    return tab.page.locator("#session-list li button span:first-child")


async def start_chat(tab: Tab, section_id: str, title: str, text: str) -> str:
    """Through the side panel, as a user does: the heading's badge, a title, the first message."""
    await badge(tab, section_id).click()
    await expect(tab.page.locator("#panel")).to_have_attribute("data-section-id", section_id)
    await tab.page.get_by_label("New chat title").fill(title)
    await tab.page.get_by_role("button", name="Start chat").click()
    await expect(tab.page.locator("#chat-title")).to_have_text(title)
    await tab.page.get_by_label("Message", exact=True).fill(text)
    await tab.page.get_by_label("Message", exact=True).press("Enter")
    await expect(tab.page.locator("#messages li .text")).to_have_text([text])
    session_id = await tab.page.locator("#chat-view").get_attribute("data-session-id")
    assert session_id
    return session_id


async def select_heading_text(tab: Tab, section_id: str) -> None:
    await heading(tab, section_id).click()
    await tab.page.keyboard.press("End")
    await tab.page.keyboard.press("Shift+Home")


async def shot(tab: Tab, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await tab.page.screenshot(path=ARTIFACTS / name)


async def sessions_of(client: ScriptClient, section_id: str) -> dict[str, str]:
    reply = await client.call("list_sessions", document_id=DOC, section_id=section_id)
    return {session["title"]: session["session_id"] for session in reply["sessions"]}


async def no_horizontal_overflow(tab: Tab) -> bool:
    return await tab.page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def test_section_moves_are_planned_from_the_edit(editor_dist):
    """The example's own unit tests (node --test): slugs, ids, and which move each kind of edit calls for."""
    npm("test")


async def test_chats_follow_renamed_merged_and_deleted_sections_live_and_after_a_restart(
    browser, editor_site, server_process, data_dir
):
    """Rename, merge, delete (and undo): the chats follow the text for both people, live, and after kill -9."""
    server = server_process()
    restarted: ServerProcess | None = None
    try:
        alice = await open_editor(browser, editor_site.url, server.port, "alice")
        bob = await open_editor(browser, editor_site.url, server.port, "bob")
        for tab in (alice, bob):
            await tab.wait_connected()
            await expect(heading(tab, "background")).to_have_text(titled("Background"))

        # Alice starts a chat in three sections; Bob's badges count them, unread.
        why = await start_chat(alice, "background", "Why now?", "Because writers asked.")
        scope = await start_chat(alice, "goals", "Scope", "Only headings for now.")
        lock_in = await start_chat(alice, "risks", "Vendor lock-in", "We keep our data.")
        for section_id in ("background", "goals", "risks"):
            await expect_badge(bob, section_id, open=1, unread=1)
            await expect_badge(alice, section_id, open=1, unread=0)
        await expect_badge(bob, "timeline", open=0, unread=0)
        await shot(alice, "editor-chats.png")

        # Bob reads the Background chat in his panel: his badge clears.
        await badge(bob, "background").click()
        await bob.page.locator("#session-list button", has_text="Why now?").click()
        await expect(bob.page.locator("#messages li .text")).to_have_text(["Because writers asked."])
        await expect_badge(bob, "background", open=1, unread=0)

        # Rename: the heading's id becomes the new slug, and its chat follows it.
        await select_heading_text(alice, "background")
        await alice.page.keyboard.type("Context")
        await expect(heading(alice, "context")).to_have_text(titled("Context"))
        await expect(heading(bob, "context")).to_have_text(titled("Context"))  # the document reached Bob
        await expect(heading(bob, "background")).to_have_count(0)
        await expect_badge(bob, "context", open=1, unread=0)
        moved = bob.page.locator("#moved-note")  # the chat open in his panel says where it went
        await expect(moved).to_contain_text("This chat moved to “Context”.")
        await expect(bob.page.get_by_label("Message", exact=True)).to_be_disabled()
        await shot(bob, "editor-renamed-bob.png")
        await moved.get_by_role("button", name="Open it there").click()
        await expect(bob.page.locator("#panel")).to_have_attribute("data-section-id", "context")
        await expect(bob.page.locator("#panel-title")).to_have_text("Chats · Context")
        await expect(bob.page.locator("#chat-view")).to_have_attribute("data-session-id", why)
        await expect(bob.page.locator("#messages li .text")).to_have_text(["Because writers asked."])  # its history
        await bob.page.get_by_role("button", name="‹ All chats").click()
        await expect(listed(bob)).to_have_text(["Why now?"])

        # Merge: Alice deletes the Goals heading, so its text joins Context; so does its chat, into Bob's list.
        await select_heading_text(alice, "goals")
        await alice.page.keyboard.press("Backspace")  # the heading's text
        await alice.page.keyboard.press("Backspace")  # the empty heading itself
        await expect(heading(alice, "goals")).to_have_count(0)
        await expect(alice.page.locator(".tiptap p", has_text="Every section can be discussed")).to_have_count(1)
        await expect(listed(bob)).to_have_text(["Scope", "Why now?"])  # live, latest activity first
        await expect_badge(bob, "context", open=2, unread=1)
        await expect(heading(bob, "goals")).to_have_count(0)
        await shot(bob, "editor-merged-bob.png")

        # Delete: Bob looks at Risks while Alice deletes the whole section; its chat goes to Unplaced.
        await badge(bob, "risks").click()
        await expect(listed(bob)).to_have_text(["Vendor lock-in"])
        await heading(alice, "risks").click()
        await alice.page.keyboard.press("Home")
        await alice.page.keyboard.press("Shift+ArrowDown")
        await alice.page.keyboard.press("Shift+End")
        await alice.page.keyboard.press("Backspace")  # the heading's text and its paragraph
        await alice.page.keyboard.press("Backspace")  # the empty heading left
        await expect(alice.page.locator(".tiptap p", has_text="Conversations get lost")).to_have_count(0)
        await expect(heading(bob, "risks")).to_have_count(0)
        await expect_badge(bob, "unplaced", open=1, unread=1)
        await expect(listed(bob)).to_have_count(0)
        note = bob.page.locator("#panel-note")
        await expect(note).to_contain_text("“Vendor lock-in” moved to “Unplaced”.")
        # Alice's panel had the Risks chat open: it followed her own edit, chat and all.
        await expect(alice.page.locator("#panel")).to_have_attribute("data-section-id", "unplaced")
        await expect(alice.page.locator("#chat-view")).to_have_attribute("data-session-id", lock_in)
        await expect(alice.page.locator("#messages li .text")).to_have_text(["We keep our data."])
        await shot(alice, "editor-deleted-alice.png")
        await note.get_by_role("button", name="Follow it").click()
        await expect(bob.page.locator("#panel-title")).to_have_text("Chats · Unplaced")
        await expect(bob.page.locator("#chat-view")).to_have_attribute("data-session-id", lock_in)
        await expect(bob.page.locator("#messages li .text")).to_have_text(["We keep our data."])
        await expect_badge(bob, "unplaced", open=1, unread=0)  # read where it is now
        await shot(bob, "editor-deleted-bob.png")

        # Undo brings the section back, and its chat with it (the ids the move reported); redo deletes it again.
        await alice.page.keyboard.press("Control+z")
        await expect(heading(bob, "risks")).to_have_count(1)
        await expect_badge(bob, "risks", open=1, unread=0)
        await expect(moved).to_contain_text("This chat moved to “Risks”.")
        await alice.page.keyboard.press("Control+Shift+z")
        await expect(heading(bob, "risks")).to_have_count(0)
        await expect_badge(bob, "unplaced", open=1, unread=0)
        await expect(moved).to_be_hidden()  # back where Bob is looking
        await expect(bob.page.get_by_label("Message", exact=True)).to_be_enabled()
        await expect(alice.page.locator("#chat-view")).to_have_attribute("data-session-id", lock_in)
        for tab in (alice, bob):
            await expect(tab.page.locator(".tiptap :is(h1, h2, h3)")).to_have_count(3)  # Launch plan, Context, Timeline
            await expect_badge(tab, "context", open=2, unread=1 if tab is bob else 0)

        # The server's view: the same sessions, with their messages, where the edits put them.
        async with ScriptClient.connect(server.url, name="carol") as carol:
            assert await sessions_of(carol, "context") == {"Why now?": why, "Scope": scope}
            assert await sessions_of(carol, "unplaced") == {"Vendor lock-in": lock_in}
            for section_id in ("background", "goals", "risks"):
                assert await sessions_of(carol, section_id) == {}

        # kill -9 and a restart on the same data dir and port: everything is where it was moved.
        await asyncio.to_thread(server.kill)
        await expect(bob.status).not_to_have_attribute("data-state", "connected")
        restarted = await asyncio.to_thread(ServerProcess(data_dir, *NO_RATE_LIMITS).start, server.port)
        for tab in (alice, bob):
            await tab.wait_connected(timeout=20_000)
        await expect_badge(bob, "context", open=2, unread=1)
        await expect_badge(bob, "unplaced", open=1, unread=0)
        await bob.page.reload()  # and from nothing but the server's state
        await bob.wait_connected()
        await expect_badge(bob, "context", open=2, unread=1)
        await expect_badge(bob, "unplaced", open=1, unread=0)
        await expect(badge(bob, "goals")).to_have_count(0)
        await badge(bob, "context").click()
        await expect(listed(bob)).to_have_text(["Scope", "Why now?"])
        await bob.page.locator("#session-list button", has_text="Scope").click()
        await expect(bob.page.locator("#messages li .text")).to_have_text(["Only headings for now."])
        await expect_badge(bob, "context", open=2, unread=0)  # read now, after the move and the restart
        await shot(bob, "editor-after-restart-bob.png")
        async with ScriptClient.connect(restarted.url, name="carol") as carol:
            assert await sessions_of(carol, "context") == {"Why now?": why, "Scope": scope}
            assert await sessions_of(carol, "unplaced") == {"Vendor lock-in": lock_in}
            history = await carol.call("history", session_id=lock_in)
            assert [(m["seq"], m["author"], m["text"]) for m in history["messages"]] == [
                (1, "alice", "We keep our data.")
            ]

        # Readable at 420 px: nothing scrolls sideways.
        await bob.page.set_viewport_size(NARROW)
        await expect(bob.page.locator("#messages li .text")).to_have_text(["Only headings for now."])
        assert await no_horizontal_overflow(bob)
        await bob.page.screenshot(path=ARTIFACTS / "editor-narrow-bob.png", full_page=True)

        assert unexpected(alice.console_errors) == []
        assert unexpected(bob.console_errors) == []
    finally:
        if restarted is not None:
            restarted.close()
