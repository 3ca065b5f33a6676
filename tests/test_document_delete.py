"""Deleting a document (DELETE /api/v1/documents/{id}) on real servers: everything of it gone, nothing else touched,
across a kill -9, on files and on Redis."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest
from conftest import API_KEY, NO_RATE_LIMITS, ServerProcess, api_config, redis_values

from client import ScriptClient
from server.app import running

pytestmark = pytest.mark.timeout(90)

KEY = API_KEY
SECRET_TEXT = "the secret of the doomed document"
KEPT_TEXT = "what the other document says"


async def delete(port: int, document_id: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}/api/v1/documents/{document_id}"
        async with http.delete(url, headers={"Authorization": f"Bearer {KEY}"}) as response:
            return response.status, await response.json()


async def seed(url: str) -> dict[str, str]:
    """Document 'doomed' (two sections, messages, a tombstone, a read marker) and document 'kept'."""
    async with ScriptClient.connect(url, name="alice") as alice, ScriptClient.connect(url, name="bob") as bob:
        ids = {}
        for section in ("intro", "body"):
            sid = (await alice.call("create_session", document_id="doomed", section_id=section))["session"][
                "session_id"
            ]
            await alice.call("send_message", session_id=sid, text=SECRET_TEXT)
            await alice.call("send_message", session_id=sid, text=f"{SECRET_TEXT}, again")
            ids[section] = sid
        await alice.call("delete_message", session_id=ids["intro"], seq=2)
        await bob.call("mark_read", session_id=ids["intro"], seq=1)
        kept = (await bob.call("create_session", document_id="kept", section_id="intro"))["session"]["session_id"]
        await bob.call("send_message", session_id=kept, text=KEPT_TEXT)
        ids["kept"] = kept
        return ids


def files_of(directory: Path) -> bytes:
    return b"".join(path.read_bytes() for path in directory.rglob("*") if path.is_file())


async def gone_from(data_dir: Path) -> None:
    """The doomed text leaves every file once the journal segments that held it are checkpointed (about a second)."""
    async with asyncio.timeout(10):
        while SECRET_TEXT.encode() in files_of(data_dir):
            await asyncio.sleep(0.05)
    assert KEPT_TEXT.encode() in files_of(data_dir)


async def check_deleted(url: str, ids: dict[str, str]) -> None:
    async with ScriptClient.connect(url, name="checker") as checker:
        for section in ("intro", "body"):
            assert (await checker.request("get_session", session_id=ids[section]))["code"] == "not_found"
            listed = await checker.call("list_sessions", document_id="doomed", section_id=section)
            assert listed["sessions"] == []
        assert (await checker.call("watch_document", document_id="doomed"))["sections"] == []
        history = (await checker.call("history", session_id=ids["kept"]))["messages"]
        assert [m["text"] for m in history] == [KEPT_TEXT]


async def test_deleting_a_document_removes_everything_of_it_and_tells_its_subscribers_and_watchers(data_dir):
    async with running(api_config(data_dir)) as app:
        ids = await seed(app.url)
        async with (
            ScriptClient.connect(app.url, name="sub") as sub,
            ScriptClient.connect(app.url, name="watcher") as watcher,
        ):
            old = await sub.call("subscribe", document_id="doomed", section_id="intro")
            await sub.call("subscribe", document_id="doomed", section_id="body")
            await sub.call("subscribe", document_id="kept", section_id="intro")
            await watcher.call("watch_document", document_id="doomed")
            status, body = await delete(app.api_port, "doomed")
            assert (status, body) == (200, {"document_id": "doomed", "sessions_deleted": 2, "messages_deleted": 4})
            assert await sub.next_event("document_deleted") == {"type": "document_deleted", "document_id": "doomed"}
            assert await watcher.next_event("document_deleted") == {"type": "document_deleted", "document_id": "doomed"}
            await sub.call("ping")
            assert [e for e in sub.take_events() if e["type"] == "document_deleted"] == []  # once per connection
            # Their subscriptions ended; the document starts afresh, with a new epoch.
            fresh = await sub.call("create_session", document_id="doomed", section_id="intro")
            again = await sub.call("subscribe", document_id="doomed", section_id="intro")
            assert again["epoch"] != old["epoch"] and [s["session_id"] for s in again["sessions"]] == [
                fresh["session"]["session_id"]
            ]
            assert (await delete(app.api_port, "doomed"))[1]["sessions_deleted"] == 1
            assert (await delete(app.api_port, "doomed"))[1] == {
                "document_id": "doomed",
                "sessions_deleted": 0,
                "messages_deleted": 0,
            }
        await check_deleted(app.url, ids)
        await gone_from(data_dir)


@pytest.mark.parametrize("wait_for_reply", [True, False], ids=["acknowledged", "in-flight"])
async def test_a_deletion_survives_kill_9_in_the_middle(data_dir, wait_for_reply):
    args = (*NO_RATE_LIMITS, "--api-key", KEY, "--api-port", "0")
    server = ServerProcess(data_dir, *args).start()
    try:
        ids = await seed(server.url)
        api_port = await server.api_port()
        if wait_for_reply:
            assert (await delete(api_port, "doomed"))[0] == 200
        else:
            request = asyncio.create_task(delete(api_port, "doomed"))
            await asyncio.sleep(random.uniform(0, 0.02))  # the kill lands somewhere in the deletion
            request.cancel()
        server.kill()
        server.close()
        server = ServerProcess(data_dir, *args).start()
        api_port = await server.api_port()
        if not wait_for_reply:  # not acknowledged: the client retries, and the retry finishes it
            assert (await delete(api_port, "doomed"))[0] == 200
        await check_deleted(server.url, ids)
        await gone_from(data_dir)
    finally:
        server.close()


async def test_deleting_a_document_on_redis_removes_its_keys(data_dir, redis_server):
    async with running(api_config(data_dir, storage=redis_server.url)) as app:
        ids = await seed(app.url)
        assert SECRET_TEXT.encode() in await redis_values(redis_server.url)
        assert (await delete(app.api_port, "doomed"))[1]["sessions_deleted"] == 2
        values = await redis_values(redis_server.url)
        assert SECRET_TEXT.encode() not in values and KEPT_TEXT.encode() in values
        assert not any(sid.encode() in values for sid in (ids["intro"], ids["body"]))  # nor its sessions' index
        await check_deleted(app.url, ids)
