"""Moving sessions (revision 1.1) in the browser: sectionchat.js's moveSessions and session_moved, and the page.

Debian's Chromium against a real server on port 0; every wait is on what the page
shows or records. The editor example has its own test (test_editor_example.py).
"""

from __future__ import annotations

import re

import pytest
from browser_helpers import ARTIFACTS, CHROMIUM, Proxy, open_tab
from playwright.async_api import Browser, Page, expect

from client import ScriptClient

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}"),
    pytest.mark.timeout(60),
]

DOC = "spec-7"


async def new_session(client: ScriptClient, section: str, title: str, *texts: str) -> str:
    reply = await client.call("create_session", document_id=DOC, section_id=section, title=title)
    session_id = reply["session"]["session_id"]
    for text in texts:
        await client.call("send_message", session_id=session_id, text=text)
    return session_id


async def move(client: ScriptClient, source: str, target: str, *session_ids: str) -> dict:
    fields = {"session_ids": list(session_ids)} if session_ids else {}
    return await client.call("move_sessions", document_id=DOC, from_section_id=source, to_section_id=target, **fields)


async def offsets(client: ScriptClient, *sections: str) -> list[int]:
    """Each section's stream offset, as the server reports it to a new subscriber."""
    found = []
    for section in sections:
        found.append((await client.call("subscribe", document_id=DOC, section_id=section))["offset"])
        await client.call("unsubscribe", document_id=DOC, section_id=section)
    return found


async def module_page(browser: Browser, port: int, proxy: Proxy | None = None) -> tuple[Page, list[str]]:
    """A page of the server's origin without the chat page: sectionchat.js is imported on its own."""
    context = await browser.new_context()
    if proxy is not None:
        await context.route_web_socket(re.compile(r"/ws\?"), proxy.route)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"http://127.0.0.1:{port}/healthz")
    return page, errors


# The page records what each subscription hands to onSessionMoved, and keeps its subscriptions.
SUBSCRIBE_BOTH = """async ([url, doc]) => {
    const { SectionChat } = await import("/static/sectionchat.js");
    const chat = (window.chat = new SectionChat(url, { name: "editor", initialDelay: 100, maxDelay: 500 }));
    const seen = (window.seen = []);
    const track = (name) => ({
        onSessionMoved: (m, how) => seen.push([name, how.direction, m.session.title, m.session.section_id,
                                               m.from_section_id, m.to_section_id, how.own, how.replay]),
    });
    window.a = await chat.subscribe(doc, "a", track("a"));
    window.b = await chat.subscribe(doc, "b", track("b"));
}"""


async def test_module_moves_sessions_and_the_subscriptions_of_both_sections_follow(browser, app, connect):
    """Another client's move reaches both subscriptions once, with each stream's offset; our own comes as the reply."""
    page, errors = await module_page(browser, app.port)
    async with connect("bob") as bob:
        moving = await new_session(bob, "a", "Moving", "one")
        staying = await new_session(bob, "a", "Staying")
        await page.evaluate(SUBSCRIBE_BOTH, [app.url, DOC])

        await move(bob, "a", "b", moving)
        await page.wait_for_function("seen.length === 2")
        assert await page.evaluate("seen") == [
            ["a", "out", "Moving", "b", "a", "b", False, False],
            ["b", "in", "Moving", "b", "a", "b", False, False],
        ]
        state = await page.evaluate(
            """(id) => [[...a.sessions.keys()].length, b.sessions.get(id).last_seq, chat.subscriptionOf(id) === b,
                        b.unreadOf(id), a.offset, b.offset]""",
            moving,
        )
        assert state[:4] == [1, 1, True, 1]  # the unread count came along with the session
        assert state[4:] == await offsets(bob, "a", "b")  # each frame advanced its own stream's offset

        # The moved session lives on in b: its next message reaches b's subscription.
        await page.evaluate("void b.on('message', (m) => seen.push(['message', m.session_id, m.seq, m.text]))")
        await bob.call("send_message", session_id=moving, text="two")
        await page.wait_for_function("seen.some((item) => item[0] === 'message')")
        assert ["message", moving, 2, "two"] in await page.evaluate("seen")

        # Our own move of the whole section: the reply, applied to both subscriptions as `own`.
        await page.evaluate("seen.length = 0")
        await bob.call("subscribe", document_id=DOC, section_id="b")
        reply = await page.evaluate("chat.moveSessions({ documentId: 'spec-7', fromSectionId: 'a', toSectionId: 'b' })")
        assert (reply["document_id"], reply["from_section_id"], reply["to_section_id"]) == (DOC, "a", "b")
        assert [(s["session_id"], s["section_id"]) for s in reply["sessions"]] == [(staying, "b")]
        assert await page.evaluate("seen") == [
            ["a", "out", "Staying", "b", "a", "b", True, False],
            ["b", "in", "Staying", "b", "a", "b", True, False],
        ]
        event = await bob.next_event("session_moved")
        assert (event["session"]["session_id"], event["from_section_id"]) == (staying, "a")

        # A repeat of a named move changes nothing and gets the same sessions back.
        again = await page.evaluate(
            "(id) => chat.moveSessions({ documentId: 'spec-7', fromSectionId: 'a', toSectionId: 'b', sessionIds: [id] })",
            staying,
        )
        assert [s["session_id"] for s in again["sessions"]] == [staying]
        assert len(await page.evaluate("seen")) == 2
        await bob.call("ping")
        assert [e for e in bob.take_events() if e["type"] == "session_moved"] == []
        assert await page.evaluate("[a.sessions.size, b.sessions.size, chat.pendingRequests]") == [0, 2, 0]
    assert errors == []


async def test_a_move_made_offline_is_sent_once_and_a_lost_reply_is_resent_safely(browser, app, connect):
    """Offline, moveSessions waits in the outbox and goes out once; a move whose reply was lost is resent, stored once."""
    proxy = Proxy()
    page, errors = await module_page(browser, app.port, proxy)
    async with connect("bob") as bob:
        first = await new_session(bob, "a", "First", "one")
        second = await new_session(bob, "a", "Second")
        await page.evaluate(SUBSCRIBE_BOTH, [app.url, DOC])
        await bob.call("subscribe", document_id=DOC, section_id="b")

        proxy.hold.set()
        await proxy.cut()
        await page.wait_for_function("chat.state !== 'connected'")
        await page.evaluate(
            "(id) => { window.offline = chat.moveSessions({ documentId: 'spec-7', fromSectionId: 'a',"
            " toSectionId: 'b', sessionIds: [id] }); }",
            first,
        )
        assert await page.evaluate("chat.pendingRequests") == 1
        assert proxy.requests("move_sessions") == []
        proxy.hold.clear()
        await page.evaluate("chat.reconnectNow()")
        reply = await page.evaluate("offline")
        assert [s["session_id"] for s in reply["sessions"]] == [first]
        assert len(proxy.requests("move_sessions")) == 1
        assert (await bob.next_event("session_moved"))["session"]["session_id"] == first

        # The server stores the next move, but its reply is lost with the socket: the page sends it again.
        proxy.swallow_after = "move_sessions"
        await page.evaluate(
            "(id) => { window.lost = chat.moveSessions({ documentId: 'spec-7', fromSectionId: 'a',"
            " toSectionId: 'b', sessionIds: [id] }); }",
            second,
        )
        assert (await bob.next_event("session_moved"))["session"]["session_id"] == second
        proxy.swallow_after = None
        await proxy.cut()
        reply = await page.evaluate("lost")
        assert [s["session_id"] for s in reply["sessions"]] == [second]
        assert len(proxy.requests("move_sessions")) == 3  # the first, then the lost one twice
        await bob.call("ping")
        assert [e for e in bob.take_events() if e["type"] == "session_moved"] == []  # the resend stored nothing
        listed = await bob.call("list_sessions", document_id=DOC, section_id="b")
        assert sorted(s["title"] for s in listed["sessions"]) == ["First", "Second"]
        await page.wait_for_function("b.sessions.size === 2 && a.sessions.size === 0")
        moved_in = await page.evaluate("seen.filter((item) => item[1] === 'in').map((item) => item[2])")
        assert sorted(moved_in) == ["First", "Second"]  # each once, live or replayed after the reconnect
    assert errors == []


async def test_page_drops_and_adds_moved_sessions_and_the_open_one_says_where_it_went(browser, app, connect):
    """The chat page: a session moved away leaves the list, the open one says where it went and opens there."""
    async with connect("bob") as bob:
        session_id = await new_session(bob, "intro", "Wording", "Shall we say must?")
        other = await new_session(bob, "intro", "Stays here")
        arriving = await new_session(bob, "appendix", "From the appendix", "hello")
        alice = await open_tab(browser, app.port, doc=DOC, section="intro", name="alice", session=session_id)
        await alice.wait_connected()
        await expect(alice.messages("Shall we say must?")).to_have_count(1)
        listed = alice.page.locator("#sessions button.session")
        await expect(listed).to_have_count(2)

        await move(bob, "intro", "overview", session_id)
        await expect(alice.page.locator(f"#sessions [data-session-id='{session_id}']")).to_have_count(0)
        await expect(listed).to_have_count(1)
        note = alice.page.locator("#moved-note")
        await expect(note).to_be_visible()
        await expect(note).to_contain_text("This session moved to section “overview”.")
        await expect(alice.page.locator("#session-view")).to_have_attribute("data-moved-to", "overview")
        await expect(alice.composer).to_be_disabled()
        await expect(alice.page.get_by_role("button", name="Close session")).to_be_hidden()
        await expect(alice.messages("Shall we say must?")).to_have_count(1)  # still readable
        ARTIFACTS.mkdir(exist_ok=True)
        await alice.page.screenshot(path=ARTIFACTS / "moved-away.png")

        await note.get_by_role("button", name="Open it there").click()
        await expect(alice.page).to_have_url(re.compile(r"section=overview"))
        await expect(alice.page.locator("#session-title")).to_have_text("Wording")
        await expect(alice.messages("Shall we say must?")).to_have_count(1)
        await expect(note).to_be_hidden()
        await expect(alice.composer).to_be_enabled()
        await alice.send("Yes, must.")
        await expect(alice.messages("Yes, must.")).to_have_attribute("data-status", "sent")

        # A session moved in from elsewhere appears in the list, with its preview.
        await move(bob, "appendix", "overview", arriving)
        added = alice.page.locator(f"#sessions [data-session-id='{arriving}']")
        await expect(added).to_be_visible()
        await expect(added.locator(".session-preview")).to_have_text("bob: hello")
        await expect(listed).to_have_count(2)
        # The document view follows from the server's summaries (coalesced, within a second).
        sections = alice.page.locator("#sections .section-link")
        await expect(sections.filter(has_text="overview").locator(".section-counts")).to_have_text(
            "2 open · 3 messages"
        )
        await expect(sections.filter(has_text="intro").locator(".section-counts")).to_have_text("1 open · 0 messages")
        await expect(sections.filter(has_text="appendix")).to_have_count(0)
        await alice.page.screenshot(path=ARTIFACTS / "moved-in.png")
        history = await bob.call("history", session_id=session_id)
        assert [m["text"] for m in history["messages"]] == ["Shall we say must?", "Yes, must."]
        assert other  # never moved: still in intro
        assert [
            s["session_id"] for s in (await bob.call("list_sessions", document_id=DOC, section_id="intro"))["sessions"]
        ] == [other]
    assert alice.console_errors == []
