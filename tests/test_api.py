"""The HTTP API over a real server: the same chat as the WebSocket transport, for backends and bots.

Every reply is validated against the server's own /api/v1/openapi.json with a
real JSON Schema validator (jsonschema), so the document and the server agree.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import aiohttp
import jsonschema
import pytest
from conftest import API_KEY, ServerProcess

from client import ScriptClient
from client.process import NotListening

pytestmark = pytest.mark.timeout(60)

KEY = API_KEY
PATHS = [
    ("post", "/api/v1/sessions"),
    ("get", "/api/v1/sessions/{session_id}"),
    ("patch", "/api/v1/sessions/{session_id}"),
    ("get", "/api/v1/documents/{document_id}/sessions"),
    ("get", "/api/v1/documents/{document_id}/summary"),
    ("post", "/api/v1/documents/{document_id}/move"),
    ("delete", "/api/v1/documents/{document_id}"),
    ("post", "/api/v1/sessions/{session_id}/messages"),
    ("get", "/api/v1/sessions/{session_id}/messages"),
    ("patch", "/api/v1/sessions/{session_id}/messages/{seq}"),
    ("delete", "/api/v1/sessions/{session_id}/messages/{seq}"),
    ("post", "/api/v1/sessions/{session_id}/messages/{seq}/reactions"),
    ("post", "/api/v1/sessions/{session_id}/read"),
    ("get", "/api/v1/documents/{document_id}/sections/{section_id}/events"),
]


class Api:
    """A backend's HTTP client that checks every reply against the OpenAPI document."""

    def __init__(self, http: aiohttp.ClientSession, base: str, spec: dict[str, Any]):
        self.http, self.base, self.spec = http, base, spec

    async def call(
        self, method: str, path: str, body: Any = None, *, key: str | None = KEY, **query
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        data = json.dumps(body) if body is not None else None
        async with self.http.request(method, self.base + path, data=data, params=query or None, headers=headers) as r:
            reply = await r.json(content_type=None)
            self.check(method, path, r.status, reply)
            return r.status, reply

    def check(self, method: str, path: str, status: int, reply: Any) -> None:
        """The reply fits the schema the OpenAPI document gives for that path, method and status."""
        if status == 401 or status == 405:
            return  # not the chat's: the key or the method
        template = next((p for m, p in PATHS if m == method.lower() and _matches(p, path.split("?")[0])), None)
        assert template is not None, f"{method} {path} is not in the table"
        responses = self.spec["paths"][template][method.lower()]["responses"]
        schema = responses[str(status)]["content"]["application/json"]["schema"]
        jsonschema.validate(reply, {**schema, "components": self.spec["components"]})


def _matches(template: str, path: str) -> bool:
    parts, wanted = path.split("/"), template.split("/")
    return len(parts) == len(wanted) and all(w.startswith("{") or w == p for w, p in zip(wanted, parts, strict=True))


@pytest.fixture
async def api(api_app):
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{api_app.api_port}"
        async with http.get(base + "/api/v1/openapi.json") as r:
            assert r.status == 200
            spec = await r.json()
        yield Api(http, base, spec), api_app


async def test_the_openapi_document_has_every_path_of_the_table_and_is_valid(api):
    client, _ = api
    spec = client.spec
    assert spec["openapi"].startswith("3.1")
    assert {(m, p) for p, ops in spec["paths"].items() for m in ops} == set(PATHS)
    for schema in spec["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


async def test_writes_over_http_are_live_to_websocket_subscribers_and_durable(api):
    client, app = api
    async with ScriptClient.connect(app.url, name="watcher") as watcher:
        await watcher.call("subscribe", document_id="spec 7/α", section_id="intro")
        status, created = await client.call(
            "POST", "/api/v1/sessions",
            {"user": "assistant", "document_id": "spec 7/α", "section_id": "intro", "idempotency_key": "k"},
        )  # fmt: skip
        assert status == 201
        session = created["session"]
        sid = session["session_id"]
        assert (await watcher.next_event("session_created"))["session"] == session
        again_status, again = await client.call(
            "POST", "/api/v1/sessions",
            {"user": "assistant", "document_id": "spec 7/α", "section_id": "intro", "idempotency_key": "k"},
        )  # fmt: skip
        assert again_status == 200 and again["session"] == session
        status, sent = await client.call(
            "POST",
            f"/api/v1/sessions/{sid}/messages",
            {"user": "assistant", "text": "hello @bob", "client_msg_id": "c1"},
        )
        assert status == 201 and sent["message"]["author"] == "assistant"
        assert (await watcher.next_event("message"))["message"] == sent["message"]
        status, repeated = await client.call(
            "POST",
            f"/api/v1/sessions/{sid}/messages",
            {"user": "assistant", "text": "hello @bob", "client_msg_id": "c1"},
        )
        assert status == 200 and repeated == sent
        # Trusted: a moderator, whoever wrote it.
        await watcher.call("send_message", session_id=sid, text="mine")
        status, edited = await client.call("PATCH", f"/api/v1/sessions/{sid}/messages/2", {"user": "mod", "text": "ok"})
        assert status == 200 and edited["message"]["text"] == "ok"
        status, reacted = await client.call(
            "POST", f"/api/v1/sessions/{sid}/messages/1/reactions", {"user": "bob", "reaction": "👍"}
        )
        assert reacted == {"session_id": sid, "seq": 1, "reaction": "👍", "user": "bob", "on": True}
        status, read = await client.call("POST", f"/api/v1/sessions/{sid}/read", {"user": "bob", "seq": 2})
        assert read == {"session_id": sid, "seq": 2}
        status, deleted = await client.call("DELETE", f"/api/v1/sessions/{sid}/messages/2", user="mod")
        assert deleted["message"]["deleted_at"] is not None and deleted["message"]["text"] == ""
        status, page = await client.call("GET", f"/api/v1/sessions/{sid}/messages", limit="1")
        assert page["has_more"] and [m["seq"] for m in page["messages"]] == [2]
        status, patched = await client.call(
            "PATCH", f"/api/v1/sessions/{sid}", {"user": "mod", "title": "T", "closed": True}
        )
        assert patched["session"]["title"] == "T" and patched["session"]["closed"]
        status, same = await client.call("PATCH", f"/api/v1/sessions/{sid}", {"user": "mod", "closed": True})
        assert status == 200 and same["session"]["closed"]  # what it is already: no conflict
        doc = quote("spec 7/α", safe="")
        status, listed = await client.call("GET", f"/api/v1/documents/{doc}/sessions", closed="true")
        assert [s["session_id"] for s in listed["sessions"]] == [sid] and "next_cursor" in listed
        status, summary = await client.call("GET", f"/api/v1/documents/{doc}/summary", user="bob")
        assert summary["sections"][0]["section_id"] == "intro" and summary["sections"][0]["unread"] == 0
        status, moved = await client.call(
            "POST",
            f"/api/v1/documents/{doc}/move",
            {"user": "mod", "from_section_id": "intro", "to_section_id": "later"},
        )
        assert [s["section_id"] for s in moved["sessions"]] == ["later"]
        status, events = await client.call(
            "GET", f"/api/v1/documents/{doc}/sections/intro/events", since_offset="1", limit="3"
        )
        assert events["offset"] == 9 and events["has_more"] and [e["offset"] for e in events["events"]] == [2, 3, 4]
        assert events["events"][0]["message"]["text"] == "hello @bob"
        status, rest = await client.call("GET", f"/api/v1/documents/{doc}/sections/intro/events", since_offset="4")
        assert [e["type"] for e in rest["events"]][-2:] == ["session_closed", "session_moved"] and not rest["has_more"]
        assert (await client.call("GET", f"/api/v1/documents/{doc}/sections/intro/events", since_offset="10"))[0] == 409
        assert (await client.call("GET", f"/api/v1/documents/{doc}/sections/intro/events", epoch="other"))[0] == 409
        status, empty = await client.call("GET", f"/api/v1/documents/{doc}/sections/never/events")
        assert (empty["offset"], empty["events"], empty["has_more"]) == (0, [], False)


async def test_ids_with_slashes_percent_spaces_and_non_ascii_round_trip(api):
    client, _ = api
    for document_id in ("a/b", "50%", "with space", "naïve ☃", "%2F"):
        status, created = await client.call(
            "POST", "/api/v1/sessions", {"user": "u", "document_id": document_id, "section_id": document_id}
        )
        assert status == 201
        sid = created["session"]["session_id"]
        status, got = await client.call("GET", f"/api/v1/sessions/{quote(sid, safe='')}")
        assert got["session"]["document_id"] == document_id
        status, listed = await client.call("GET", f"/api/v1/documents/{quote(document_id, safe='')}/sessions")
        assert [s["session_id"] for s in listed["sessions"]] == [sid]


async def test_errors_status_codes_and_the_error_body(api):
    client, app = api
    status, body = await client.call("GET", "/api/v1/sessions/nope", key=None)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    async with client.http.get(client.base + "/api/v1/sessions/nope") as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert (await client.call("GET", "/api/v1/sessions/nope", key="wrong"))[0] == 401
    status, body = await client.call("GET", "/api/v1/sessions/nope")
    assert status == 404 and body["error"] == {
        "code": "not_found",
        "message": body["error"]["message"],
        "temporary": False,
    }
    status, created = await client.call(
        "POST", "/api/v1/sessions", {"user": "u", "document_id": "d", "section_id": "s"}
    )
    sid = created["session"]["session_id"]
    assert (await client.call("POST", "/api/v1/sessions", {"document_id": "d", "section_id": "s"}))[0] == 400  # no user
    assert (await client.call("POST", f"/api/v1/sessions/{sid}/messages", {"user": "u", "text": 5}))[0] == 400
    assert (await client.call("PATCH", f"/api/v1/sessions/{sid}/messages/0", {"user": "u", "text": "x"}))[0] == 400
    assert (await client.call("PATCH", f"/api/v1/sessions/{sid}/messages/9", {"user": "u", "text": "x"}))[0] == 404
    assert (await client.call("GET", f"/api/v1/sessions/{sid}/messages", limit="zero"))[0] == 400
    assert (await client.call("GET", f"/api/v1/sessions/{sid}/messages", unknown="ignored"))[0] == 200
    headers = {"Authorization": f"Bearer {KEY}"}
    async with client.http.post(client.base + "/api/v1/sessions", data=b"{not json", headers=headers) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_request"
    async with client.http.post(client.base + "/api/v1/sessions", data=b"x" * (65 * 1024), headers=headers) as r:
        assert r.status == 413 and (await r.json())["error"]["code"] == "too_large"
    async with client.http.put(client.base + f"/api/v1/sessions/{sid}", headers=headers) as r:
        assert r.status == 405 and {m.strip() for m in r.headers["Allow"].split(",")} >= {"GET", "PATCH"}
    async with client.http.get(client.base + "/api/v1/nothing/here", headers=headers) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{app.port}/api/v1/openapi.json") as r:
        assert r.status == 404  # the WebSocket port has no API


def test_api_port_without_a_key_is_a_startup_error(data_dir):
    server = ServerProcess(data_dir, "--api-port", "0")
    with pytest.raises(NotListening) as refused:
        server.start(timeout=10)
    assert b"sectionchat: --api-port needs an API key" in str(refused.value).encode()
    server.close()


async def test_the_api_logs_where_it_listens_and_keys_come_from_the_environment(data_dir, monkeypatch):
    monkeypatch.setenv("SECTIONCHAT_API_KEYS", "one, two")
    server = ServerProcess(data_dir, "--api-port", "0").start()
    try:
        port = await server.api_port()
        async with aiohttp.ClientSession() as http:
            for key, expected in (("one", 404), ("two", 404), ("three", 401)):
                headers = {"Authorization": f"Bearer {key}"}
                async with http.get(f"http://127.0.0.1:{port}/api/v1/sessions/x", headers=headers) as r:
                    assert r.status == expected
    finally:
        server.close()
