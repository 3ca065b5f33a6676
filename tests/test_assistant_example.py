"""The assistant example (examples/assistant): its summary as a plain function, which webhooks it answers, and
the service in this event loop between a real server's webhooks and its HTTP API, with WebSocket users."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from conftest import ROOT
from standardwebhooks.webhooks import Webhook

from client import ScriptClient
from examples.assistant.service import Assistant, Settings, parse_args, reply_id, to_answer
from examples.assistant.summary import addressed_to, open_questions, summarize
from server.app import running
from server.config import Config

pytestmark = pytest.mark.timeout(60)

KEY = "the-assistant-api-key"
SECRET = "whsec_" + base64.b64encode(b"the assistant's webhook secret!!").decode()
DOC, SECTION = "launch-plan", "risks"


def message(seq: int, author: str, text: str, **fields) -> dict:
    return {"seq": seq, "author": author, "text": text, "mentions": [], "deleted_at": None, **fields}


# The plain functions (no sockets) -------------------------------------------------------


def test_the_summary_counts_messages_per_author_and_lists_the_open_questions():
    history = [
        message(1, "alice", "The draft is up."),
        message(2, "bob", "Which build has the fix?"),
        message(3, "alice", "Build 42."),  # answers bob
        message(4, "alice", "When do we ship?  "),
        message(5, "alice", "And who tells legal?"),  # alice again: answers nothing of hers
        message(6, "bob", "@assistant what is still open?"),  # a request: neither a question nor an answer
    ]
    assert summarize(history) == (
        "Summary so far: 6 messages from 2 people.\n"
        "Messages per author: alice 4, bob 2.\n"
        "Open questions (2):\n"
        "- alice (#4): When do we ship?\n"
        "- alice (#5): And who tells legal?"
    )
    answered = [*history, message(7, "carol", "Friday, and I will.")]
    assert summarize(answered).endswith("Messages per author: alice 4, bob 2, carol 1.\nNo open questions.")


def test_the_summary_leaves_out_tombstones_its_own_messages_and_stays_short():
    history = [
        message(1, "alice", "", deleted_at="2026-01-01T00:00:00.000Z"),
        message(2, "assistant", "Summary so far: ... Is that all?"),
        message(3, "bob", "Anyone?", mentions=["assistant"]),
    ]
    assert summarize(history) == (
        "Summary so far: 1 message from 1 person.\nMessages per author: bob 1.\nNo open questions."
    )
    assert summarize([history[1]]) == "Nothing has been said in this session yet."
    many = [message(n, f"user{n}", f"question {n} " + "very " * 100 + "long?") for n in range(1, 31)]
    last_author_only = summarize(many)
    assert "user1 1" in last_author_only and "and 10 more" in last_author_only
    assert [q["seq"] for q in open_questions(many, "assistant")] == [30]  # each answered by the next person
    lonely = [message(n, "alice", f"q{n}?") for n in range(1, 14)]
    text = summarize(lonely)
    assert "Open questions (13):" in text and "- and 3 more" in text and len(text) < 1000
    long_one = summarize([message(1, "alice", "why " * 100 + "?")])
    assert max(len(line) for line in long_one.splitlines()) < 230 and long_one.endswith("…")


def test_which_messages_are_addressed_and_which_webhooks_are_answered():
    assert addressed_to(message(1, "a", "hi", mentions=["assistant"]), "assistant")
    for text in ("@assistant", "hey @Assistant, sum up.", "(@assistant)"):
        assert addressed_to(message(1, "a", text), "assistant"), text
    for text in ("assistant", "@assistant-bot", "@assistants", "me@assistant.example", "@@assistant"):
        assert not addressed_to(message(1, "a", text), "assistant"), text
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    sent = (now - timedelta(seconds=30)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    asked = message(1, "alice", "@assistant?", sent_at=sent, message_id="m1")
    assert to_answer({"type": "message", "message": asked}, "assistant", 60, now) == asked
    assert to_answer({"type": "message", "message": asked}, "assistant", 10, now) is None  # too old
    assert to_answer({"type": "message", "message": asked}, "assistant", 0, now) == asked  # no age limit
    assert to_answer({"type": "message_edited", "message": asked}, "assistant") is None
    assert to_answer({"type": "message", "message": {**asked, "author": "assistant"}}, "assistant") is None
    assert to_answer({"type": "message", "message": {**asked, "deleted_at": sent}}, "assistant") is None
    assert to_answer({"type": "session_created", "session": {}}, "assistant") is None
    assert to_answer([1, 2], "assistant") is None
    assert reply_id(asked) == "assistant-re-m1"


def test_the_command_line_from_the_repo_root_and_the_environment():
    shown = subprocess.run(
        [sys.executable, "-m", "examples.assistant", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0 and "--webhook-secret" in shown.stdout and "ASSISTANT_API_KEY" in shown.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "examples.assistant", "--webhook-secret", SECRET],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "--api-key" in refused.stderr
    settings = parse_args(["--port", "0"], {"ASSISTANT_API_KEY": KEY, "ASSISTANT_WEBHOOK_SECRET": SECRET})
    assert (settings.api_key, settings.webhook_secret, settings.port) == (KEY, SECRET, 0)
    with pytest.raises(SystemExit):
        parse_args(["--api-key", KEY, "--webhook-secret", "whsec_"], {})


# The service ---------------------------------------------------------------------------


@pytest.fixture
async def assistant():
    """The service on a free port; its API URL is given once the chat server is up."""
    service = Assistant(Settings(api_key=KEY, webhook_secret=SECRET, port=0, max_age=300))
    await service.start()
    yield service
    await service.stop()


def signed(payload: dict, webhook_id: str = "msg_test") -> tuple[str, dict[str, str]]:
    data = json.dumps(payload)
    now = datetime.now(tz=UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(webhook_id, now, data),
    }
    return data, headers


async def next_answer(client: ScriptClient) -> dict:
    """The next message by the assistant among the client's `message` events."""
    while True:
        event = await client.next_event("message", timeout=10)
        if event["message"]["author"] == "assistant":
            return event["message"]


async def test_each_mention_gets_one_summary_even_when_its_webhook_comes_twice(assistant, data_dir):
    config = Config(
        port=0, data_dir=str(data_dir), rate_limit=0, sessions_per_minute=0,
        api_keys=(KEY,), api_port=0, webhooks=(assistant.url,), webhook_secret=SECRET,
    )  # fmt: skip
    async with (
        running(config) as app,
        ScriptClient.connect(app.url, name="alice") as alice,
        ScriptClient.connect(app.url, name="bob") as bob,
        aiohttp.ClientSession() as http,
    ):
        assistant.api_url = f"http://127.0.0.1:{app.api_port}"
        await alice.call("subscribe", document_id=DOC, section_id=SECTION)
        created = await alice.call("create_session", document_id=DOC, section_id=SECTION)
        sid = created["session"]["session_id"]
        await alice.call("send_message", session_id=sid, text="The draft is up.")
        await bob.call("send_message", session_id=sid, text="Which build has the fix?")
        await alice.call("send_message", session_id=sid, text="Build 42.")
        await alice.call("send_message", session_id=sid, text="When do we ship?")
        first = (await bob.call("send_message", session_id=sid, text="@assistant what is still open?"))["message"]

        answer = await next_answer(alice)
        assert answer["client_msg_id"] == reply_id(first) and answer["mentions"] == ["bob"]
        assert "Messages per author: alice 3, bob 2." in answer["text"]
        assert "Open questions (1):\n- alice (#4): When do we ship?" in answer["text"]

        await bob.call("send_message", session_id=sid, text="Friday.")
        second = await alice.call("send_message", session_id=sid, text="Sum up again", mentions=["assistant"])
        again = await next_answer(alice)
        assert again["client_msg_id"] == reply_id(second["message"]) and again["seq"] == answer["seq"] + 3
        assert "alice 4, bob 3." in again["text"] and "No open questions." in again["text"]

        # The first mention's webhook once more, twice at once, as the server stored it.
        headers = {"Authorization": f"Bearer {KEY}"}
        async with http.get(f"{assistant.api_url}/api/v1/documents/{DOC}/sections/{SECTION}/events",
                            headers=headers) as r:  # fmt: skip
            stream = await r.json()
        event = next(e for e in stream["events"] if e["type"] == "message" and e["message"]["seq"] == first["seq"])
        data, signature = signed({**event, "document_id": DOC, "section_id": SECTION, "epoch": stream["epoch"]})
        for _ in range(2):
            async with http.post(assistant.url, data=data, headers=signature) as r:
                assert r.status == 204
        await assistant.drain()
        assert assistant.outcomes["created"] == 2 and assistant.outcomes["repeated"] >= 1
        assert assistant.outcomes["failed"] == 0

        history = (await alice.call("history", session_id=sid))["messages"]
        assert [m["seq"] for m in history if m["author"] == "assistant"] == [answer["seq"], again["seq"]]
        assert history[-1] == again  # its own answers triggered nothing more
        assert [
            e for e in alice.take_events() if e["type"] == "message" and e["message"]["author"] == "assistant"
        ] == []


async def test_unsigned_badly_signed_and_other_webhooks_start_no_answer(assistant):
    payload = {"type": "message", "message": message(1, "alice", "@assistant", message_id="m", session_id="s")}
    data, headers = signed(payload)
    async with aiohttp.ClientSession() as http:
        async with http.post(assistant.url, data=data) as r:
            assert r.status == 401  # no signature headers
        async with http.post(assistant.url, data=data + " ", headers=headers) as r:
            assert r.status == 401  # the body changed
        stale = {**headers, "webhook-timestamp": str(int(datetime.now(tz=UTC).timestamp()) - 3600)}
        async with http.post(assistant.url, data=data, headers=stale) as r:
            assert r.status == 401  # signed anew on every attempt: an old one is a replay
        async with http.post(assistant.url, data=data, headers={**headers, "webhook-signature": "junk"}) as r:
            assert r.status == 400
        for other in ({"type": "session_created", "session": {}}, {"type": "document_deleted", "document_id": "d"}):
            other_data, other_headers = signed(other)
            async with http.post(assistant.url, data=other_data, headers=other_headers) as r:
                assert r.status == 204
    assert assistant.in_flight == {} and sum(assistant.outcomes.values()) == 0
