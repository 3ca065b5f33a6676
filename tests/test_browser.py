"""The browser client (static/) in Debian's Chromium against a real server on port 0.

Every wait is on something the page shows (Playwright's auto-waiting `expect`):
the status element's data-state, list items with data attributes, visible text.
Screenshots land in test-artifacts/ (gitignored).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator

import pytest
from browser_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, NARROW, open_tab
from conftest import ServerProcess
from playwright.async_api import Browser, WebSocketRoute, async_playwright, expect

from client import ScriptClient
from server.app import running
from server.config import Config

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}")

DOC, SECTION = "spec-7", "intro"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def new_session(client: ScriptClient, title: str, *texts: str, doc: str = DOC, section: str = SECTION) -> str:
    reply = await client.call("create_session", document_id=doc, section_id=section, title=title)
    session_id = reply["session"]["session_id"]
    for text in texts:
        await client.call("send_message", session_id=session_id, text=text)
    return session_id


def unexpected(errors: list[str]) -> list[str]:
    """Console errors other than Chromium's own report of a refused reconnect attempt."""
    return [e for e in errors if not re.match(r"WebSocket connection to '\S+' failed: .*ERR_CONNECTION_REFUSED", e)]


async def page_seqs(tab) -> list[int]:
    return [int(seq) for seq in await tab.messages().evaluate_all("items => items.map(li => li.dataset.seq)")]


async def test_two_users_see_sessions_messages_presence_and_typing_live(browser, app):
    """Two users in one section: a session and a message of one appear live for the other, with presence and typing."""
    alice = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice")
    bob = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="bob")
    await alice.wait_connected()
    await bob.wait_connected()
    await expect(alice.page.locator("#presence li[data-user='bob']")).to_be_visible()
    await expect(bob.page.locator("#presence li[data-user='alice']")).to_be_visible()

    await alice.page.get_by_label("Title of a new session").fill("Wording of the intro")
    await alice.page.get_by_role("button", name="Create").click()
    await expect(alice.page.locator("#session-title")).to_have_text("Wording of the intro")

    listed = bob.page.locator("#sessions button.session", has_text="Wording of the intro")
    await expect(listed).to_be_visible()
    await listed.click()
    await expect(bob.page.locator("#session-title")).to_have_text("Wording of the intro")

    await alice.composer.press_sequentially("Hello bob, what do you think?")
    await expect(bob.page.locator("#typing")).to_have_text("alice is typing…")
    await alice.composer.press("Enter")

    received = bob.messages("Hello bob, what do you think?")
    await expect(received).to_have_count(1)
    await expect(received).to_have_attribute("data-author", "alice")
    await expect(bob.page.locator("#typing")).to_have_text("")  # her message ends her typing
    await expect(alice.messages()).to_have_count(1)
    await expect(alice.messages().first).to_have_attribute("data-status", "sent")

    # Shift+Enter adds a line, Enter sends.
    await bob.composer.press_sequentially("Fine by me.")
    await bob.composer.press("Shift+Enter")
    await bob.composer.press_sequentially("Ship it.")
    await bob.composer.press("Enter")
    await expect(alice.messages("Ship it.").locator(".message-text")).to_have_text("Fine by me.\nShip it.")
    await expect(alice.page.locator("#sessions button.session .session-preview")).to_have_text(
        "bob: Fine by me. Ship it."
    )

    # Closing asks once more; the other side sees the session closed and cannot write.
    await alice.page.get_by_role("button", name="Close session").click()
    await alice.page.get_by_role("button", name="Confirm close").click()
    await expect(bob.page.locator("#closed-note")).to_be_visible()
    await expect(bob.composer).to_be_disabled()
    await expect(bob.page.locator("#sessions button.session .badge")).to_have_text("Closed")

    await bob.context.close()
    await expect(alice.page.locator("#presence li[data-user='bob']")).to_have_count(0)
    await expect(alice.page.locator("#presence li")).to_have_count(1)
    assert alice.console_errors == [] and bob.console_errors == []


async def test_page_recovers_after_a_server_restart_and_delivers_each_message_once(browser, server_process, data_dir):
    """Server restarted while the page is open: it shows reconnecting, recovers, and every message is there exactly once."""
    server = server_process()
    restarted: ServerProcess | None = None
    try:
        async with ScriptClient.connect(server.url, name="bob") as bob:
            session_id = await new_session(bob, "Restart drill", "before the restart")
        alice = await open_tab(browser, server.port, doc=DOC, section=SECTION, name="alice", session=session_id)
        await alice.wait_connected()
        await expect(alice.messages("before the restart")).to_have_count(1)

        await asyncio.to_thread(server.terminate)
        await expect(alice.status).to_have_attribute("data-state", "reconnecting")
        await expect(alice.page.locator("#offline-note")).to_be_visible()

        await alice.send("typed while offline")
        queued = alice.messages("typed while offline")
        await expect(queued).to_have_attribute("data-status", "queued")
        ARTIFACTS.mkdir(exist_ok=True)
        await alice.page.screenshot(path=ARTIFACTS / "reconnecting.png")

        restarted = await asyncio.to_thread(ServerProcess(data_dir).start, server.port)
        async with ScriptClient.connect(restarted.url, name="bob") as bob:
            await bob.call("send_message", session_id=session_id, text="sent while alice was away")
            await alice.wait_connected(timeout=20_000)
            await expect(alice.messages("sent while alice was away")).to_have_count(1)
            await expect(queued).to_have_attribute("data-status", "sent")
            await expect(alice.messages("typed while offline")).to_have_count(1)

            await bob.call("send_message", session_id=session_id, text="after the reconnect")
            await expect(alice.messages("after the reconnect")).to_have_count(1)

            history = await bob.call("history", session_id=session_id)
            texts = [message["text"] for message in history["messages"]]
            assert sorted(texts) == sorted(
                ["before the restart", "typed while offline", "sent while alice was away", "after the reconnect"]
            )
            assert [m["author"] for m in history["messages"] if m["text"] == "typed while offline"] == ["alice"]
            assert await page_seqs(alice) == [message["seq"] for message in history["messages"]]
        assert unexpected(alice.console_errors) == []
    finally:
        if restarted is not None:
            restarted.close()


async def test_cut_socket_replays_missed_events_from_the_offset(browser, app, connect):
    """Socket cut (4008) and held down while others talk: the resubscribe recovers the missed events, each shown once."""
    hold = asyncio.Event()  # set: the page's connection attempts are refused
    routes: list[tuple[WebSocketRoute, WebSocketRoute]] = []
    subscribes: list[dict] = []
    subscribed: list[dict] = []

    async def route(ws: WebSocketRoute) -> None:
        if hold.is_set():
            await ws.close(code=1013, reason="try again later")
            return
        server = ws.connect_to_server()

        def to_server(message: str | bytes) -> None:
            if isinstance(message, str) and '"subscribe"' in message:
                subscribes.append(json.loads(message))
            server.send(message)

        def to_page(message: str | bytes) -> None:
            if isinstance(message, str) and '"subscribed"' in message:
                subscribed.append(json.loads(message))
            ws.send(message)

        ws.on_message(to_server)
        server.on_message(to_page)
        routes.append((ws, server))

    async with connect("bob") as bob:
        session_id = await new_session(bob, "Flaky network", "one")
        context = await browser.new_context()
        await context.route_web_socket(re.compile(r"/ws\?"), route)
        page = await context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        await page.goto(f"http://127.0.0.1:{app.port}/?doc={DOC}&section={SECTION}&name=alice&session={session_id}")
        status = page.locator("#status")
        await expect(status).to_have_attribute("data-state", "connected")
        await expect(page.locator("#messages li.message")).to_have_count(1)

        hold.set()
        ws, server = routes[-1]
        await ws.close(code=4008, reason="slow consumer")
        await server.close()
        await expect(status).to_have_attribute("data-state", "reconnecting")

        await bob.call("send_message", session_id=session_id, text="two")
        await bob.call("send_message", session_id=session_id, text="three")
        other = await new_session(bob, "Opened while you were away")
        hold.clear()
        # "Retry now" only hurries the page's own backoff, which may win the race and hide the
        # button first; clicked from script it does nothing once a connection is on its way.
        await page.evaluate("document.getElementById('retry-now').click()")

        await expect(status).to_have_attribute("data-state", "connected")
        await expect(page.locator("#messages li.message .message-text")).to_have_text(["one", "two", "three"])
        await expect(page.locator(f"#sessions [data-session-id='{other}']")).to_be_visible()
        assert subscribes[-1]["since_offset"] == subscribed[0]["offset"]
        assert subscribes[-1]["epoch"] == subscribed[0]["epoch"]
        assert subscribed[-1]["recovered"] is True
        assert [event["type"] for event in subscribed[-1]["events"]] == ["message", "message", "session_created"]

        await bob.call("send_message", session_id=session_id, text="four")
        await expect(page.locator("#messages li.message .message-text")).to_have_text(["one", "two", "three", "four"])
        assert errors == []
        await context.close()


async def test_lost_stream_reloads_sessions_and_history(browser, server_process, data_dir):
    """After a restart on wiped storage (new epoch) the page reloads instead of trusting its offsets."""
    server = server_process()
    restarted: ServerProcess | None = None
    try:
        async with ScriptClient.connect(server.url, name="bob") as bob:
            session_id = await new_session(bob, "Soon gone", "hello")
        alice = await open_tab(browser, server.port, doc=DOC, section=SECTION, name="alice", session=session_id)
        await alice.wait_connected()
        await expect(alice.messages()).to_have_count(1)

        await asyncio.to_thread(server.terminate)
        await expect(alice.status).to_have_attribute("data-state", "reconnecting")
        shutil.rmtree(data_dir)
        restarted = await asyncio.to_thread(ServerProcess(data_dir).start, server.port)
        async with ScriptClient.connect(restarted.url, name="bob") as bob:
            fresh = await new_session(bob, "Fresh start", "new world")
        await alice.wait_connected(timeout=20_000)
        await expect(alice.page.locator("#sessions button.session")).to_have_count(1)
        await expect(alice.page.locator(f"#sessions [data-session-id='{fresh}']")).to_be_visible()
        await expect(alice.page.locator("#no-session")).to_be_visible()
        await expect(alice.page.locator("#notices")).to_contain_text("The open session no longer exists")
    finally:
        if restarted is not None:
            restarted.close()


async def test_markup_in_messages_titles_names_and_ids_is_text(browser, app, connect):
    """`<img src=x onerror=alert(1)>` in a message (and markup in titles, names, ids) shows as text; no dialog fires."""
    nasty = "<img src=x onerror=alert(1)>"
    doc = '<svg onload=alert("doc")>'
    async with connect("<b>mallory</b>") as mallory:
        session_id = await new_session(mallory, "<script>alert('title')</script>", nasty, doc=doc)
        alice = await open_tab(browser, app.port, doc=doc, section=SECTION, name="alice", session=session_id)
        await alice.wait_connected()

        await expect(alice.messages().locator(".message-text")).to_have_text([nasty])
        await expect(alice.messages().locator(".author")).to_have_text(["<b>mallory</b>"])
        await expect(alice.page.locator("#session-title")).to_have_text("<script>alert('title')</script>")
        await expect(alice.page.locator("#where")).to_contain_text(doc)

        await alice.send(nasty)
        await expect(alice.messages().locator(".message-text")).to_have_text([nasty, nasty])
        await expect(alice.messages().last).to_have_attribute("data-status", "sent")
        history = await mallory.call("history", session_id=session_id)
        assert [m["text"] for m in history["messages"]] == [nasty, nasty]

        assert await alice.page.locator("#app img, #app svg, #app script, #app b").count() == 0
        assert alice.dialogs == []
        assert alice.console_errors == []


async def test_server_errors_are_shown_in_plain_words(browser, app):
    """A message over the server's limit fails visibly with a sentence that says why (the server's too_large)."""
    alice = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice")
    await alice.wait_connected()
    await alice.page.get_by_label("Title of a new session").fill("Limits")
    await alice.page.get_by_label("Title of a new session").press("Enter")
    await expect(alice.page.locator("#session-title")).to_have_text("Limits")

    await alice.composer.fill("x" * 8001)
    await expect(alice.page.locator("#char-count")).to_have_text("8,001 / 8,000")
    await alice.composer.press("Enter")
    failed = alice.page.locator("#messages li[data-status='failed']")
    await expect(failed.get_by_role("alert")).to_have_text(
        "Not sent. That message is too long: 8,001 characters, and the limit is 8,000. Shorten it or split it into parts."
    )
    await expect(failed.locator(".message-state")).to_have_text(
        "Not sent. That message is too long: 8,001 characters, and the limit is 8,000. Shorten it or split it into parts. Edit Discard"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    await alice.page.screenshot(path=ARTIFACTS / "error.png")
    await failed.get_by_role("button", name="Edit").click()
    await expect(alice.composer).to_have_value("x" * 8001)
    await expect(failed).to_have_count(0)


async def test_history_loads_on_scroll(browser, app, connect):
    """Opening a long session shows the newest page; scrolling up loads older pages with before_seq down to seq 1."""
    async with connect("bob") as bob:
        session_id = await new_session(bob, "Long thread")
        for n in range(1, 131):
            await bob.call("send_message", session_id=session_id, text=f"message {n}")
        alice = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice", session=session_id)
        await alice.wait_connected()
        await expect(alice.messages()).to_have_count(50)
        await expect(alice.messages().last).to_have_attribute("data-seq", "130")

        scroller = alice.page.locator("#scroller")
        await scroller.evaluate("node => { node.scrollTop = 0; }")
        await expect(alice.messages()).to_have_count(100)
        await scroller.evaluate("node => { node.scrollTop = 0; }")
        await expect(alice.messages()).to_have_count(130)
        await expect(alice.page.locator("#history-status")).to_have_text("This is the start of the session.")
        assert await page_seqs(alice) == list(range(1, 131))
        assert alice.console_errors == []


async def test_page_loads_without_console_errors_and_is_captured(browser, app, connect):
    """The page loads with no console errors; screenshots (wide, narrow chat, narrow list, join) go to test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    async with connect("bob") as bob, connect("carol") as carol:
        await new_session(bob, "Examples for section 2", "Could we add one example per rule?")
        session_id = await new_session(
            bob,
            "Wording of the intro",
            "I think the second sentence of the intro is too long.",
            "Could we split it after “sessions”?",
        )
        await carol.call(
            "send_message", session_id=session_id, text="Agreed. And “real-time” needs a hyphen everywhere."
        )
        await carol.call("subscribe", document_id=DOC, section_id=SECTION)

        alice = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice", session=session_id)
        await alice.wait_connected()
        await expect(alice.messages()).to_have_count(3)
        await alice.send(
            "Good points, both. I'll draft a shorter version.\nDoes this work: “Chat about one section, live.”"
        )
        await expect(alice.messages().last).to_have_attribute("data-status", "sent")
        await expect(alice.page.locator("#presence li")).to_have_count(2)
        await carol.send({"type": "typing", "session_id": session_id})
        await expect(alice.page.locator("#typing")).to_have_text("carol is typing…")
        await expect(alice.page.locator("#sessions button.session")).to_have_count(2)
        await alice.page.screenshot(path=ARTIFACTS / "chat.png")

        await alice.page.set_viewport_size(NARROW)
        await alice.page.screenshot(path=ARTIFACTS / "chat-narrow.png")
        await alice.page.get_by_role("button", name="Back to sessions").click()
        await expect(alice.page.locator("#sessions")).to_be_visible()
        await alice.page.screenshot(path=ARTIFACTS / "chat-narrow-list.png")
        assert alice.console_errors == []

        joining = await open_tab(browser, app.port)
        await expect(joining.page.get_by_role("heading", name="Join a section chat")).to_be_visible()
        await expect(joining.page.get_by_role("textbox", name="Your name")).to_be_focused()
        await joining.page.screenshot(path=ARTIFACTS / "join.png")
        assert joining.console_errors == []


async def test_error_codes_read_as_plain_sentences(browser, app):
    """Codes the server may send (rate_limited, forbidden, conflict, …) become sentences a user understands."""
    tab = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice")
    await tab.wait_connected()
    words = await tab.page.evaluate(
        """async () => {
            const { ChatError, describeError } = await import("/static/sectionchat.js");
            const say = (code, message, temporary = false) => describeError(new ChatError(code, message, { temporary }));
            return {
                rate_limited: say("rate_limited", "over 20 messages per second", true),
                forbidden: say("forbidden", "document 'x' is not granted"),
                conflict: say("conflict", "the session is closed"),
                unavailable: say("unavailable", "storage is unavailable; nothing was stored", true),
                internal: say("internal", "internal error; trace id 0123abcd"),
            };
        }"""
    )
    assert words == {
        "rate_limited": "You are sending too fast. Wait a moment, then try again. (over 20 messages per second)",
        "forbidden": "You do not have access to this document.",
        "conflict": "This session is closed; it no longer takes new messages.",
        "unavailable": "The server could not save that just now. Try again in a moment.",
        "internal": "Something went wrong on the server. (internal error; trace id 0123abcd)",
    }


async def test_module_embedded_without_the_page(browser, app, connect):
    """sectionchat.js on its own, as an editor embeds it: promises, subscription callbacks, own and others' events."""
    page = await (await browser.new_context()).new_page()
    await page.goto(f"http://127.0.0.1:{app.port}/healthz")  # same origin, no app.js
    session_id = await page.evaluate(
        """async (url) => {
            const { SectionChat } = await import("/static/sectionchat.js");
            const chat = new SectionChat(url, { name: "editor" });
            const seen = (window.seen = []);
            await chat.subscribe("doc-1", "sec-1", {
                onSessionCreated: (session, how) => seen.push(["session", session.title, how.own]),
                onMessage: (message, how) => seen.push(["message", message.author, message.text, how.own]),
                onPresence: ({ present }) => seen.push(["presence", present.sort().join(",")]),
            });
            const session = await chat.createSession("doc-1", "sec-1", { title: "From the editor" });
            await chat.send(session.session_id, "hello from the editor");
            try {
                await chat.send(session.session_id, "x".repeat(8001));
            } catch (error) {
                seen.push(["error", error.name, error.code]);
            }
            window.chat = chat;
            return session.session_id;
        }""",
        app.url,
    )
    async with connect("bob") as bob:
        await bob.call("subscribe", document_id="doc-1", section_id="sec-1")
        await bob.call("send_message", session_id=session_id, text="hello editor")
        await page.wait_for_function("window.seen.some(item => item[2] === 'hello editor')")
        seen = await page.evaluate("window.seen")
        assert seen[:3] == [
            ["session", "From the editor", True],
            ["message", "editor", "hello from the editor", True],
            ["error", "ChatError", "too_large"],
        ]
        assert ["message", "bob", "hello editor", False] in seen
        await page.wait_for_function("window.seen.some(item => item[0] === 'presence' && item[1] === 'bob,editor')")
        assert await page.evaluate("window.chat.state") == "connected"


async def test_join_form_and_switching_sections_follow_the_url(browser, app, connect):
    """Joining from the form and switching sections updates the URL, the sessions and the presence."""
    async with connect("bob") as bob:
        intro = await new_session(bob, "Intro talk", "about the intro")
        scope = await new_session(bob, "Scope talk", "about the scope", section="scope")
        tab = await open_tab(browser, app.port)
        page = tab.page
        await page.get_by_role("textbox", name="Your name").fill("alice")
        await page.get_by_role("textbox", name="Document").fill(DOC)
        await page.get_by_role("textbox", name="Section").fill(SECTION)
        await page.get_by_role("button", name="Join").click()
        await tab.wait_connected()
        await expect(page.locator("#sessions button.session")).to_have_text([re.compile("Intro talk")])
        await expect(page.locator("#sessions .session-preview")).to_have_text(["bob: about the intro"])
        assert page.url.endswith(f"/?doc={DOC}&section={SECTION}&name=alice")

        await page.locator("#place summary").click()
        await page.locator("#place-section").fill("scope")
        await page.get_by_role("button", name="Open section").click()
        await expect(page.locator("#sessions button.session")).to_have_text([re.compile("Scope talk")])
        await expect(page.locator("#where")).to_contain_text("scope")
        await page.locator("#sessions button.session").click()
        await expect(tab.messages()).to_have_text([re.compile("about the scope")])
        assert "section=scope" in page.url and "session=" in page.url

        await bob.call("subscribe", document_id=DOC, section_id="scope")
        await expect(page.locator("#presence li[data-user='bob']")).to_be_visible()
        await bob.call("send_message", session_id=intro, text="in the section alice left")
        await bob.call("send_message", session_id=scope, text="here")
        await expect(tab.messages()).to_have_text([re.compile("about the scope"), re.compile("here")])
        assert tab.console_errors == []


async def test_a_burst_of_messages_is_paced_under_the_rate_limit(browser, data_dir):
    """Twelve messages typed in a row against a 5 requests/s server: paced by the client, all delivered in order."""
    async with running(Config(port=0, data_dir=str(data_dir), rate_limit=5)) as server:
        async with ScriptClient.connect(server.url, name="bob") as bob:
            session_id = await new_session(bob, "Rapid fire")
            alice = await open_tab(browser, server.port, doc=DOC, section=SECTION, name="alice", session=session_id)
            await alice.wait_connected()
            await expect(alice.page.locator("#history-status")).to_have_text("No messages yet. Say hello!")
            texts = [f"burst {n}" for n in range(1, 13)]
            for text in texts:
                await alice.send(text)
            await expect(alice.page.locator("#messages li[data-status='sent'] .message-text")).to_have_text(texts)
            await expect(alice.page.locator("#messages li[data-status='failed']")).to_have_count(0)
            history = await bob.call("history", session_id=session_id)
            assert [m["text"] for m in history["messages"]] == texts
            assert alice.console_errors == []
