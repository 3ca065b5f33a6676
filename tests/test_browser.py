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

import pytest
from browser_helpers import ARTIFACTS, CHROMIUM, NARROW, Proxy, open_tab
from conftest import ServerProcess
from playwright.async_api import WebSocketRoute, expect

from client import ScriptClient
from server.app import running
from server.auth import mint_token
from server.config import Config

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}"),
    pytest.mark.timeout(60),  # each test; the slow ones say more
]

DOC, SECTION = "spec-7", "intro"
SECRET = "browser-test-secret-browser-test-secret"


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


def shot(name: str) -> str:
    ARTIFACTS.mkdir(exist_ok=True)
    return str(ARTIFACTS / name)


def message_at(tab, seq: int):
    return tab.page.locator(f"#messages li.message[data-seq='{seq}']")


def chip(message, reaction: str):
    return message.locator(f".reaction-chip[data-reaction='{reaction}']")


async def react_from_picker(message, reaction: str) -> None:
    """Hover a message, open its reaction picker and pick `reaction`, as a user does."""
    await message.hover()
    await message.get_by_role("button", name="Add reaction").click()
    await message.get_by_role("button", name=f"React with {reaction}").click()


async def edit_inline(message, text: str) -> None:
    await message.hover()
    await message.get_by_role("button", name=re.compile(r"^Edit")).click()
    editor = message.get_by_label("Edit message text")
    await editor.fill(text)
    await editor.press("Enter")


async def delete_inline(message) -> None:
    await message.hover()
    await message.get_by_role("button", name=re.compile(r"^Delete")).click()
    await message.get_by_role("button", name="Confirm delete").click()


async def no_horizontal_overflow(page) -> bool:
    return await page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


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
        await mallory.call("react", session_id=session_id, seq=1, reaction="<b>hi</b>")
        alice = await open_tab(browser, app.port, doc=doc, section=SECTION, name="alice", session=session_id)
        await alice.wait_connected()

        await expect(alice.messages().locator(".message-text")).to_have_text([nasty])
        await expect(alice.messages().locator(".reaction-chip")).to_have_text(["<b>hi</b>1"])
        await expect(alice.messages().locator(".author")).to_have_text(["<b>mallory</b>"])
        await expect(alice.page.locator("#session-title")).to_have_text("<script>alert('title')</script>")
        await expect(alice.page.locator("#where")).to_contain_text(doc)

        await alice.send(nasty)
        await expect(alice.messages().locator(".message-text")).to_have_text([nasty, nasty])
        await expect(alice.messages().last).to_have_attribute("data-status", "sent")
        history = await mallory.call("history", session_id=session_id)
        assert [m["text"] for m in history["messages"]] == [nasty, nasty]
        await mallory.call("send_message", session_id=session_id, text="hi @<b>bob</b>", mentions=["<b>bob</b>"])
        await expect(alice.messages().last.locator(".mention")).to_have_text("@<b>bob</b>")

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
        # The document view settles (summaries are coalesced for up to a second): only the other session is unread.
        await expect(alice.page.locator("#sections [data-section-id='intro'] .unread")).to_have_text(
            "unread messages: 1"
        )
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


# Revision 1.1: edits, deletes, reactions, mentions, read state, the document view ---------------


@pytest.mark.timeout(90)
async def test_two_users_edit_delete_react_and_mention_each_other(browser, app, connect):
    """Alice and Bob: @-completion sends `mentions`, reactions toggle live, edits show "(edited)", deletes leave a placeholder."""
    alice = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice")
    bob = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="bob")
    await alice.wait_connected()
    await bob.wait_connected()
    await expect(bob.page.locator("#presence li[data-user='alice']")).to_be_visible()
    await alice.page.get_by_label("Title of a new session").fill("Wording")
    await alice.page.get_by_role("button", name="Create").click()
    await expect(alice.page.locator("#session-title")).to_have_text("Wording")
    await bob.page.locator("#sessions button.session", has_text="Wording").click()
    await expect(bob.page.locator("#history-status")).to_have_text("No messages yet. Say hello!")

    # Bob mentions Alice with the completion list: "@al" offers the people here.
    await bob.composer.press_sequentially("@al")
    offered = bob.page.locator("#mention-list li[role='option']")
    await expect(offered.locator(".mention-name")).to_have_text(["alice"])
    await expect(offered.first).to_have_attribute("aria-selected", "true")
    await bob.composer.press("Enter")  # picks, does not send
    await expect(bob.composer).to_have_value("@alice ")
    await expect(bob.page.locator("#mention-list")).to_be_hidden()
    await bob.composer.press_sequentially("can you check the wording?")
    await bob.composer.press("Enter")
    asked = message_at(alice, 1)
    await expect(asked.locator(".message-text")).to_have_text("@alice can you check the wording?")
    await expect(asked.locator(".mention.mention-me")).to_have_text("@alice")
    await expect(asked).to_have_attribute("data-mentions-me", "true")

    # Alice reacts from the picker; Bob adds his; Alice takes hers back. Each side sees each change.
    await react_from_picker(asked, "👍")
    await expect(chip(asked, "👍")).to_have_attribute("aria-pressed", "true")
    await expect(chip(asked, "👍")).not_to_have_attribute("data-pending", "true")
    # Her reaction's reply has come back, so the `mentioned` event (sent before it) has too:
    # no toast for a mention in the session she is reading.
    await expect(alice.page.locator(".notice.mentioned")).to_have_count(0)
    on_bob = message_at(bob, 1)
    await expect(chip(on_bob, "👍")).to_have_text("👍1")
    await expect(chip(on_bob, "👍")).to_have_attribute("aria-pressed", "false")
    await chip(on_bob, "👍").click()
    await expect(chip(on_bob, "👍")).to_have_attribute("aria-pressed", "true")
    await expect(chip(asked, "👍")).to_have_text("👍2")
    await chip(asked, "👍").click()
    await expect(chip(asked, "👍")).to_have_attribute("aria-pressed", "false")
    await expect(chip(on_bob, "👍")).to_have_text("👍1")
    await expect(chip(asked, "👍")).to_have_text("👍1")

    # Alice answers with a typo and fixes it inline, adding a mention of Bob with the completion.
    await alice.send("Teh wording is fine")
    answer = message_at(alice, 2)
    await expect(answer).to_have_attribute("data-status", "sent")
    await answer.hover()
    await answer.get_by_role("button", name="Edit message").click()
    editor = answer.get_by_label("Edit message text")
    await expect(editor).to_be_focused()
    await editor.fill("The wording is fine, thanks @bob")
    await editor.press("Enter")
    on_bob = message_at(bob, 2)
    await expect(on_bob.locator(".message-text")).to_have_text("The wording is fine, thanks @bob")
    await expect(on_bob.locator(".edited")).to_have_text("(edited)")
    await expect(on_bob.locator(".mention.mention-me")).to_have_text("@bob")
    await expect(answer.locator(".edited")).to_have_text("(edited)")

    # Neither may change the other's message (no moderator here); each may change their own.
    await asked.hover()
    await expect(asked.get_by_role("button", name="Add reaction")).to_be_visible()
    await expect(asked.get_by_role("button", name=re.compile(r"^(Edit|Delete)"))).to_have_count(0)
    await expect(message_at(bob, 2).get_by_role("button", name=re.compile(r"^(Edit|Delete)"))).to_have_count(0)
    await expect(message_at(bob, 1).get_by_role("button", name="Edit message")).to_have_count(1)

    # Bob sends to the wrong session and deletes it: both see a placeholder in its place.
    await bob.send("oops, wrong session")
    await expect(message_at(alice, 3).locator(".message-text")).to_have_text("oops, wrong session")
    await delete_inline(message_at(bob, 3))
    for tab in (alice, bob):
        await expect(message_at(tab, 3)).to_have_attribute("data-deleted", "true")
        await expect(message_at(tab, 3).locator(".message-text")).to_have_text("Message deleted")
        await expect(message_at(tab, 3).locator(".reaction-chip, .message-actions")).to_have_count(0)
    await expect(alice.page.locator("#sessions .session-preview")).to_have_text("bob: message deleted")
    # The document view follows: a deleted message no longer counts, and Alice has read the rest.
    intro = alice.page.locator("#sections [data-section-id='intro']")
    await expect(intro.locator(".section-counts")).to_have_text("1 open · 2 messages")
    await expect(intro.locator(".unread")).to_have_count(0)
    await alice.page.mouse.move(0, 0)
    await alice.page.screenshot(path=shot("conversation.png"))
    await bob.page.screenshot(path=shot("conversation-bob.png"))

    async with connect("carol") as carol:
        session_id = await alice.page.evaluate("new URL(location.href).searchParams.get('session')")
        messages = (await carol.call("history", session_id=session_id))["messages"]
    assert [(m["author"], m["text"], m["mentions"]) for m in messages] == [
        ("bob", "@alice can you check the wording?", ["alice"]),
        ("alice", "The wording is fine, thanks @bob", ["bob"]),
        ("bob", "", []),
    ]
    assert messages[0]["reactions"] == {"👍": ["bob"]}
    assert messages[1]["edited_at"] is not None and messages[2]["deleted_at"] is not None
    assert alice.console_errors == [] and bob.console_errors == []


async def test_mention_toast_when_named_elsewhere_in_the_document(browser, app):
    """Bob names Alice in another section: she gets a toast (the `mentioned` event) that opens the message."""
    alice = await open_tab(browser, app.port, doc=DOC, section="scope", name="alice")
    bob = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="bob")
    await alice.wait_connected()
    await bob.wait_connected()
    await bob.page.get_by_label("Title of a new session").fill("Needs a reviewer")
    await bob.page.get_by_role("button", name="Create").click()
    await expect(bob.page.locator("#session-title")).to_have_text("Needs a reviewer")
    await bob.send("@alice could you review the intro?")  # typed by hand: she is not in this section
    await expect(message_at(bob, 1)).to_have_attribute("data-status", "sent")

    toast = alice.page.locator(".notice.mentioned")
    await expect(toast).to_have_count(1)
    await expect(toast).to_contain_text("bob mentioned you")
    await expect(toast).to_contain_text("“Needs a reviewer” (section intro)")
    await expect(toast.locator(".mention-text")).to_have_text("@alice could you review the intro?")
    await alice.page.screenshot(path=shot("mention-toast.png"))
    await toast.get_by_role("button", name="Open").click()
    await expect(toast).to_have_count(0)
    await expect(alice.page.locator("#where")).to_contain_text(SECTION)
    await expect(alice.page.locator("#session-title")).to_have_text("Needs a reviewer")
    await expect(message_at(alice, 1).locator(".mention.mention-me")).to_have_text("@alice")
    assert alice.console_errors == [] and bob.console_errors == []


async def test_unread_badges_clear_in_a_second_tab_of_the_same_user(browser, app, connect):
    """Alice has two tabs: reading a session in one clears its badge in the other (the `read` event)."""
    async with connect("bob") as bob:
        session_id = await new_session(bob, "Open questions", "first question")
        await new_session(bob, "Quiet one")
        reading = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice")
        other = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice")
        await reading.wait_connected()
        await other.wait_connected()
        await bob.call("send_message", session_id=session_id, text="second question")
        await bob.call("send_message", session_id=session_id, text="third question")
        for tab in (reading, other):
            badge = tab.page.locator(f"#sessions [data-session-id='{session_id}'] .unread")
            await expect(badge).to_have_text("unread messages: 3")
            await expect(tab.page.locator("#sections [data-section-id='intro'] .unread")).to_have_text(
                "unread messages: 3"
            )
        # Sorted by last activity: the session with the new messages comes first.
        await expect(other.page.locator("#sessions button.session .session-title")).to_have_text(
            ["Open questions", "Quiet one"]
        )
        await other.page.screenshot(path=shot("unread.png"))

        await reading.page.locator(f"#sessions [data-session-id='{session_id}']").click()
        divider = reading.page.locator("#messages .unread-divider")
        await expect(divider).to_have_text("New since you last read")
        # The divider sits right before the first message she had not read.
        assert await divider.evaluate("d => d.nextElementSibling.dataset.seq") == "1"
        await expect(other.page.locator(f"#sessions [data-session-id='{session_id}'] .unread")).to_have_count(0)
        await expect(other.page.locator("#sections [data-section-id='intro'] .unread")).to_have_count(0)
        await reading.page.screenshot(path=shot("unread-divider.png"))

        # A message that arrives while she reads is read at once: no badge comes back in either tab.
        async with connect("alice") as alice_elsewhere:  # a third connection of hers gets the `read` event too
            await alice_elsewhere.call("subscribe", document_id=DOC, section_id=SECTION)
            await bob.call("send_message", session_id=session_id, text="fourth question")
            await expect(reading.messages("fourth question")).to_have_count(1)
            read = await alice_elsewhere.next_event("read")
            assert (read["session_id"], read["seq"]) == (session_id, 4)
        await expect(other.page.locator(f"#sessions [data-session-id='{session_id}'] .unread")).to_have_count(0)
        assert reading.console_errors == [] and other.console_errors == []


async def test_document_view_updates_live_when_a_message_arrives_in_another_section(browser, app, connect):
    """The document view (watch_document) lists every section with open sessions and unread counts, live."""
    async with connect("bob") as bob:
        await new_session(bob, "Intro talk", "about the intro")
        alice = await open_tab(browser, app.port, doc=DOC, section=SECTION, name="alice")
        await alice.wait_connected()
        sections = alice.page.locator("#sections button.section-link")
        await expect(sections).to_have_count(1)
        intro = alice.page.locator("#sections [data-section-id='intro']")
        await expect(intro).to_have_attribute("aria-current", "true")
        await expect(intro.locator(".section-counts")).to_have_text("1 open · 1 message")
        await expect(intro.locator(".unread")).to_have_text("unread messages: 1")

        scope_id = await new_session(bob, "Scope talk", doc=DOC, section="scope")
        scope = alice.page.locator("#sections [data-section-id='scope']")
        await expect(scope.locator(".section-counts")).to_have_text("1 open · 0 messages")
        await bob.call("send_message", session_id=scope_id, text="what is in scope?")
        await expect(scope.locator(".section-counts")).to_have_text("1 open · 1 message")
        await expect(scope.locator(".unread")).to_have_text("unread messages: 1")
        await bob.call("send_message", session_id=scope_id, text="@alice your call", mentions=["alice"])
        await expect(scope.locator(".unread")).to_have_text("unread messages: 2")
        await expect(scope.locator(".mention-count")).to_have_text("unread mentions: @1")
        await expect(sections.locator(".section-name")).to_have_text(["intro", "scope"])
        await alice.page.locator(".notice.mentioned button[aria-label='Dismiss']").click()
        await alice.page.screenshot(path=shot("document-view.png"))

        # The view is also a way to move between sections.
        await scope.click()
        await expect(alice.page.locator("#where")).to_contain_text("scope")
        await expect(scope).to_have_attribute("aria-current", "true")
        await alice.page.locator("#sessions button.session", has_text="Scope talk").click()
        await expect(alice.messages()).to_have_count(2)
        await expect(scope.locator(".unread")).to_have_count(0)  # read: the summary follows
        await expect(scope.locator(".mention-count")).to_have_count(0)
        await bob.call("close_session", session_id=scope_id)
        await expect(scope.locator(".section-counts")).to_have_text("0 open · 1 closed · 2 messages")
        assert alice.console_errors == []


@pytest.mark.timeout(90)
async def test_moderator_actions_are_shown_only_to_a_moderator(browser, data_dir):
    """Token mode: only a token with the moderator role gets Edit/Delete on others' messages, and they work."""
    config = Config(port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0, auth_secret=SECRET)
    async with running(config) as server:
        url = f"{server.url}?token={mint_token(SECRET, 'bob')}"
        async with ScriptClient.connect(url) as bob:
            session_id = await new_session(bob, "Moderated", "a rude remark", "a fine remark")
            alice = await open_tab(
                browser, server.port, doc=DOC, section=SECTION, session=session_id, token=mint_token(SECRET, "alice")
            )
            mod = await open_tab(
                browser,
                server.port,
                doc=DOC,
                section=SECTION,
                session=session_id,
                token=mint_token(SECRET, "maria", roles=["moderator"]),
            )
            await alice.wait_connected()
            await mod.wait_connected()
            await expect(alice.page.locator("#me-name")).to_have_text("alice")
            await expect(mod.page.locator("#me-role")).to_have_text("Moderator")
            await expect(alice.page.locator("#me-role")).to_be_hidden()
            await expect(alice.messages()).to_have_count(2)
            await expect(mod.messages()).to_have_count(2)

            rude_for_alice = message_at(alice, 1)
            await rude_for_alice.hover()
            await expect(rude_for_alice.get_by_role("button", name="Add reaction")).to_be_visible()
            await expect(rude_for_alice.get_by_role("button", name=re.compile(r"^(Edit|Delete)"))).to_have_count(0)
            rude_for_mod = message_at(mod, 1)
            await rude_for_mod.hover()
            await expect(rude_for_mod.get_by_role("button", name="Edit bob's message")).to_be_visible()
            await expect(rude_for_mod.get_by_role("button", name="Delete bob's message")).to_be_visible()
            await mod.page.screenshot(path=shot("moderator.png"))

            await edit_inline(message_at(mod, 2), "a fine remark (moderated)")
            await expect(message_at(alice, 2).locator(".message-text")).to_have_text("a fine remark (moderated)")
            await expect(message_at(alice, 2).locator(".edited")).to_have_text("(edited)")
            await delete_inline(rude_for_mod)
            await expect(rude_for_alice).to_have_attribute("data-deleted", "true")
            await expect(rude_for_alice.locator(".message-text")).to_have_text("Message deleted")

            history = (await bob.call("history", session_id=session_id))["messages"]
            assert [(m["text"], m["deleted_at"] is not None) for m in history] == [
                ("", True),
                ("a fine remark (moderated)", False),
            ]
            assert alice.console_errors == [] and mod.console_errors == []


async def proxied_tab(browser, port: int, proxy: Proxy, **params: str):
    tab = await open_tab(browser, port, **{"doc": DOC, "section": SECTION, **params})
    await tab.context.route_web_socket(re.compile(r"/ws\?"), proxy.route)
    await tab.page.reload()
    return tab


async def test_an_edit_and_a_reaction_made_offline_are_sent_once_after_the_reconnect(browser, app, connect):
    """Offline: two edits of a message and a reaction wait in the outbox; back online, one edit and one react go out."""
    proxy = Proxy()
    async with connect("bob") as bob, connect("alice") as alice_script:
        session_id = await new_session(bob, "Offline edits", "please react")
        await alice_script.call("send_message", session_id=session_id, text="frist draft")
        await bob.call("subscribe", document_id=DOC, section_id=SECTION)
        alice = await proxied_tab(browser, app.port, proxy, name="alice", session=session_id)
        await alice.wait_connected()
        await expect(alice.messages()).to_have_count(2)

        proxy.hold.set()
        await proxy.cut()
        await expect(alice.status).to_have_attribute("data-state", "reconnecting")
        await expect(alice.page.locator("#offline-note")).to_be_visible()

        mine = message_at(alice, 2)
        await edit_inline(mine, "first draft")
        await expect(mine).to_have_attribute("data-pending-edit", "queued")
        await expect(mine.locator(".message-state")).to_have_text("Saving the edit when the connection is back…")
        await edit_inline(mine, "first draft, fixed")  # a second edit before the first could leave
        await expect(mine.locator(".message-text")).to_have_text("first draft, fixed")
        theirs = message_at(alice, 1)
        await react_from_picker(theirs, "🎉")
        await expect(chip(theirs, "🎉")).to_have_attribute("data-pending", "true")
        await expect(chip(theirs, "🎉")).to_have_attribute("aria-pressed", "true")
        await alice.page.mouse.move(0, 0)
        await alice.page.screenshot(path=shot("offline-outbox.png"))
        assert proxy.requests("edit_message") == [] and proxy.requests("react") == []

        proxy.hold.clear()
        # As in the cut-socket test: "Retry now" only hurries a backoff that may win the race and hide it.
        await alice.page.evaluate("document.getElementById('retry-now').click()")
        await alice.wait_connected()
        await expect(mine).not_to_have_attribute("data-pending-edit", re.compile(".*"))
        await expect(chip(theirs, "🎉")).not_to_have_attribute("data-pending", "true")
        await expect(mine.locator(".edited")).to_have_text("(edited)")

        edits = proxy.requests("edit_message")
        reacts = proxy.requests("react")
        assert [(e["seq"], e["text"]) for e in edits] == [(2, "first draft, fixed")]
        assert [(r["seq"], r["reaction"], r["on"]) for r in reacts] == [(1, "🎉", True)]
        # Bob sees each change once.
        edited = await bob.next_event("message_edited")
        assert edited["message"]["text"] == "first draft, fixed"
        reaction = await bob.next_event("reaction")
        assert (reaction["user"], reaction["reaction"], reaction["on"]) == ("alice", "🎉", True)
        await bob.call("ping")  # anything else announced would be queued before this reply
        assert [e["type"] for e in bob.take_events() if e["type"] in ("message_edited", "reaction")] == []
        history = (await bob.call("history", session_id=session_id))["messages"]
        assert history[0]["reactions"] == {"🎉": ["alice"]}
        assert history[1]["text"] == "first draft, fixed"
        assert unexpected(alice.console_errors) == []


async def test_a_reaction_whose_reply_was_lost_is_resent_and_does_not_toggle_twice(browser, app, connect):
    """The socket drops after the server stored a reaction but before its reply: the resend sets the same state."""
    proxy = Proxy()
    async with connect("bob") as bob:
        session_id = await new_session(bob, "Lost replies", "react to me")
        await bob.call("subscribe", document_id=DOC, section_id=SECTION)
        alice = await proxied_tab(browser, app.port, proxy, name="alice", session=session_id)
        await alice.wait_connected()
        message = message_at(alice, 1)
        await expect(message).to_be_visible()

        proxy.swallow_after = "react"
        await react_from_picker(message, "👍")
        stored = await bob.next_event("reaction")  # stored and announced; the page never hears back
        assert (stored["user"], stored["on"]) == ("alice", True)
        await expect(chip(message, "👍")).to_have_attribute("data-pending", "true")
        proxy.swallow_after = None
        await proxy.cut()  # the page reconnects (on a socket whose replies arrive) and resends

        await alice.wait_connected()
        await expect(chip(message, "👍")).not_to_have_attribute("data-pending", "true")
        await expect(chip(message, "👍")).to_have_attribute("aria-pressed", "true")
        await expect(chip(message, "👍")).to_have_text("👍1")
        reacts = proxy.requests("react")
        assert [(r["reaction"], r["on"]) for r in reacts] == [("👍", True), ("👍", True)]  # sent again, same state
        await bob.call("ping")
        assert [e for e in bob.take_events() if e["type"] == "reaction"] == []  # the repeat stored nothing
        history = (await bob.call("history", session_id=session_id))["messages"]
        assert history[0]["reactions"] == {"👍": ["alice"]}
        assert unexpected(alice.console_errors) == []


@pytest.mark.timeout(90)
async def test_page_at_420_px_with_reactions_edits_mentions_and_the_document_view(browser, app, connect):
    """At 420 px every new piece fits: no sideways scrolling, the toolbar and picker inside the window."""
    async with connect("bob") as bob:
        session_id = await new_session(
            bob, "A rather long session title that has to be cut somewhere", "@alice a first look?"
        )
        await bob.call(
            "edit_message", session_id=session_id, seq=1, text="@alice a first look, please?", mentions=["alice"]
        )
        await bob.call("react", session_id=session_id, seq=1, reaction="👀")
        await bob.call("send_message", session_id=session_id, text="sent by mistake")
        await bob.call("delete_message", session_id=session_id, seq=2)
        await bob.call("send_message", session_id=session_id, text="x" * 300)
        other = await new_session(bob, "Second thread", "hello", section="scope")
        await bob.call("subscribe", document_id=DOC, section_id=SECTION)
        alice = await open_tab(browser, app.port, viewport=NARROW, doc=DOC, section=SECTION, name="alice")
        await alice.wait_connected()
        await expect(alice.page.locator("#sections button.section-link")).to_have_count(2)
        await expect(alice.page.locator(f"#sessions [data-session-id='{session_id}'] .unread")).to_have_text(
            "unread messages: 2"
        )
        assert await no_horizontal_overflow(alice.page)
        await alice.page.screenshot(path=shot("narrow-list.png"), full_page=True)

        await alice.page.locator(f"#sessions [data-session-id='{session_id}']").click()
        await expect(alice.messages()).to_have_count(3)
        first = message_at(alice, 1)
        await react_from_picker(first, "👍")
        await expect(chip(first, "👍")).to_have_attribute("aria-pressed", "true")
        await alice.send("@bo")  # the completion list opens; Enter picks rather than sends
        await expect(alice.page.locator("#mention-list")).to_be_hidden()
        await expect(alice.composer).to_have_value("@bob ")
        await expect(alice.messages()).to_have_count(3)  # nothing was sent
        await alice.composer.fill("")
        await alice.composer.press_sequentially("thanks @b")
        await expect(alice.page.locator("#mention-list .mention-name")).to_have_text(["bob"])
        box = await alice.page.locator("#mention-list").bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= NARROW["width"]
        await alice.page.screenshot(path=shot("narrow-mention.png"))
        await alice.composer.press("Enter")
        await alice.composer.press("Enter")
        await expect(message_at(alice, 4).locator(".mention")).to_have_text("@bob")

        await first.hover()
        await first.get_by_role("button", name="Add reaction").click()
        picker = first.locator(".reaction-picker")
        await expect(picker).to_be_visible()
        box = await picker.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= NARROW["width"]
        await alice.page.screenshot(path=shot("narrow-chat.png"))
        await alice.page.keyboard.press("Escape")
        await expect(picker).to_have_count(0)
        await edit_inline(message_at(alice, 4), "thanks @bob, will do")
        await expect(message_at(alice, 4).locator(".edited")).to_have_text("(edited)")
        assert await no_horizontal_overflow(alice.page)
        assert await alice.page.locator("#scroller").evaluate("s => s.scrollWidth <= s.clientWidth")

        await bob.call("send_message", session_id=other, text="@alice over here", mentions=["alice"])
        await expect(alice.page.locator(".notice.mentioned")).to_be_visible()
        await alice.page.screenshot(path=shot("narrow-toast.png"))
        assert await no_horizontal_overflow(alice.page)
        assert alice.console_errors == []


async def test_module_revision_1_1_requests_and_callbacks(browser, app, connect):
    """sectionchat.js alone: every 1.1 request as a method, every 1.1 event to its callback, read state kept current."""
    page = await (await browser.new_context()).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"http://127.0.0.1:{app.port}/healthz")
    async with connect("bob") as bob:
        session_id = await new_session(bob, "For the module", "one", doc="doc-1", section="sec-1")
        await page.evaluate(
            """async ([url, sessionId]) => {
                const { SectionChat, applyReaction } = await import("/static/sectionchat.js");
                const chat = (window.chat = new SectionChat(url, { name: "editor" }));
                const seen = (window.seen = []);
                chat.on("mentioned", ({ section_id, message }) => seen.push(["mentioned", section_id, message.text]));
                window.sub = await chat.subscribe("doc-1", "sec-1", {
                    onMessageEdited: (m, how) => seen.push(["edited", m.seq, m.text, how.own]),
                    onMessageDeleted: (m, how) => seen.push(["deleted", m.seq, m.text, how.own]),
                    onReaction: (r, how) => seen.push(["reaction", r.seq, r.reaction, r.user, r.on, how.own]),
                    onSessionUpdated: (s, how) => seen.push(["updated", s.title, how.own]),
                    onSessionClosed: (s, how) => seen.push(["closed", s.closed, how.own]),
                    onSessionReopened: (s, how) => seen.push(["reopened", s.closed, how.own]),
                    onRead: (r, how) => seen.push(["read", r.seq, how.own]),
                    onUnread: (u) => seen.push(["unread", u.unread, u.read]),
                });
                window.watch = await chat.watchDocument("doc-1", {
                    onSectionSummary: (s) => seen.push(["summary", s.section_id, s.messages, s.unread]),
                });
                const message = { reactions: {} };
                seen.push(["apply", applyReaction(message, { reaction: "x", user: "u", on: true }),
                           applyReaction(message, { reaction: "x", user: "u", on: true })]);
                seen.push(["start", sub.unreadOf(sessionId), sub.readOf(sessionId), watch.sectionList.map(s => s.unread)]);
                const mine = await chat.send(sessionId, "two @bob", { mentions: ["bob"] });
                await chat.editMessage(sessionId, mine.seq, "two, edited");
                await chat.react(sessionId, 1, "👍");
                await chat.react(sessionId, 1, "👍", false);
                await chat.markRead(sessionId, 1);
                await chat.deleteMessage(sessionId, mine.seq);
                const page = await chat.listSessionsPage("doc-1", { sectionId: "sec-1", order: "activity", limit: 1 });
                seen.push(["page", page.sessions.length, page.nextCursor, page.unread[sessionId]]);
                seen.push(["list", (await chat.listSessions("doc-1", null, { closed: false })).length]);
            }""",
            [app.url, session_id],
        )
        events = await bob.next_events("mentioned", 1)
        assert events[0]["message"]["mentions"] == ["bob"]
        await bob.call("update_session", session_id=session_id, title="Renamed")
        await bob.call("close_session", session_id=session_id)
        await page.evaluate("chat.reopenSession(sub.sessions.keys().next().value)")
        await bob.call("send_message", session_id=session_id, text="@editor look", mentions=["editor"])
        await page.wait_for_function("seen.some(item => item[0] === 'mentioned')")
        await page.wait_for_function("seen.some(item => item[0] === 'summary' && item[2] === 2 && item[3] === 1)")
        seen = await page.evaluate("seen")
        assert seen[:2] == [["apply", True, False], ["start", 1, 0, [1]]]
        assert ["edited", 2, "two, edited", True] in seen
        assert ["reaction", 1, "👍", "editor", True, True] in seen
        assert ["reaction", 1, "👍", "editor", False, True] in seen
        assert ["read", 2, True] in seen  # the marker had moved to our own message already
        assert ["deleted", 2, "", True] in seen
        assert ["page", 1, None, 0] in seen
        assert ["list", 1] in seen
        assert ["updated", "Renamed", False] in seen
        assert ["closed", True, False] in seen and ["reopened", False, True] in seen
        assert ["mentioned", "sec-1", "@editor look"] in seen
        assert ["unread", 1, 2] in seen  # bob's new message after our marker
        assert await page.evaluate("[chat.roles, chat.isModerator, chat.pendingRequests]") == [[], False, 0]
        assert errors == []
