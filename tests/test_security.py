"""Token mode, origins and the abuse limits, against real servers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import jwt
import pytest
from conftest import ROOT, resolved_config
from websockets.exceptions import InvalidStatus

from client import ScriptClient
from server.app import running
from server.auth import mint_token
from server.config import Config

SECRET = "a-test-secret-long-enough-for-every-hmac-algorithm-0123456789abcdef"


def config(data_dir, **options) -> Config:
    return Config(**{"port": 0, "data_dir": str(data_dir), "rate_limit": 0, "sessions_per_minute": 0, **options})


async def refused_status(url: str, **options) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with ScriptClient.connect(url, **options):
            pass
    return refused.value.response.status_code


# Token mode ---------------------------------------------------------------


async def test_token_mode_refuses_missing_bad_and_expired_tokens(data_dir):
    """No token, a forged token and an expired token all get HTTP 401 at the handshake."""
    async with running(config(data_dir, auth_secret=SECRET)) as app:
        assert await refused_status(app.url) == 401
        assert await refused_status(app.url, name="alice") == 401
        forged = mint_token("another-secret-another-secret-1234", "alice")
        assert await refused_status(app.url + "?token=" + forged) == 401
        expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
        assert await refused_status(app.url + "?token=" + expired) == 401
        no_sub = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
        assert await refused_status(app.url + "?token=" + no_sub) == 401
        other_algorithm = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS512")
        assert await refused_status(app.url + "?token=" + other_algorithm) == 401


async def test_token_in_query_or_bearer_header(data_dir):
    """The user is the token's sub, from ?token= or Authorization: Bearer; ?name= is ignored."""
    token = mint_token(SECRET, "alice")
    async with running(config(data_dir, auth_secret=SECRET)) as app:
        async with ScriptClient.connect(app.url + "?token=" + token, name="mallory") as by_query:
            assert by_query.user == "alice"
        headers = {"Authorization": f"Bearer {token}"}
        async with ScriptClient.connect(app.url, additional_headers=headers) as by_header:
            assert by_header.user == "alice"
            assert (await by_header.call("create_session", document_id="d", section_id="s"))["session"][
                "created_by"
            ] == "alice"


async def test_docs_claim_limits_documents(data_dir):
    """Every request that names a document, or a session in one, outside `docs` is forbidden."""
    async with running(config(data_dir, auth_secret=SECRET)) as app:
        admin = await ScriptClient.open(app.url + "?token=" + mint_token(SECRET, "admin", ["*"]))
        secret_session = (await admin.call("create_session", document_id="secret", section_id="s"))["session"][
            "session_id"
        ]
        await admin.close()
        async with ScriptClient.connect(app.url + "?token=" + mint_token(SECRET, "bob", ["spec-7"])) as bob:
            own = await bob.call("create_session", document_id="spec-7", section_id="s")
            assert own["session"]["document_id"] == "spec-7"
            for request, fields in [
                ("create_session", {"document_id": "secret", "section_id": "s"}),
                ("list_sessions", {"document_id": "secret"}),
                ("subscribe", {"document_id": "secret", "section_id": "s"}),
                ("unsubscribe", {"document_id": "secret", "section_id": "s"}),
                ("get_session", {"session_id": secret_session}),
                ("send_message", {"session_id": secret_session, "text": "hi"}),
                ("history", {"session_id": secret_session}),
                ("close_session", {"session_id": secret_session}),
                ("typing", {"session_id": secret_session}),
            ]:
                reply = await bob.request(request, id=request, **fields)
                assert reply["type"] == "error", request
                assert reply["code"] == "forbidden", request
                assert reply["reply_to"] == request and reply["temporary"] is False
        async with ScriptClient.connect(app.url + "?token=" + mint_token(SECRET, "carol", ["*"])) as carol:
            assert (await carol.call("get_session", session_id=secret_session))["session"]["document_id"] == "secret"


@pytest.mark.timeout(60)
def test_token_command_mints_a_working_token(data_dir):
    """`sectionchat token` prints a token the server accepts; tokens never reach the logs."""
    minted = subprocess.run(
        [sys.executable, "-m", "server", "token", "--sub", "alice", "--docs", "spec-7", "--ttl", "60"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={"SECTIONCHAT_AUTH_SECRET": SECRET, "PATH": ""},
    )
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["docs"] == ["spec-7"] and claims["exp"] - time.time() <= 60

    from conftest import ServerProcess

    server = ServerProcess(data_dir, "--auth-secret", SECRET, "--log-level", "debug").start()
    try:

        async def use() -> None:
            async with ScriptClient.connect(server.url + "?token=" + token) as alice:
                assert alice.user == "alice"
                assert (await alice.request("list_sessions", document_id="other"))["code"] == "forbidden"
            assert await refused_status(server.url + "?token=" + token + "x") == 401

        asyncio.run(use())
        server.terminate()
        assert token not in server.output.decode()
        assert "alice" in server.output.decode()
    finally:
        server.close()


# Origins ------------------------------------------------------------------


async def test_allowed_origins(data_dir):
    """With allowed origins, another Origin is refused with 403; listed ones and non-browsers get in."""
    async with running(config(data_dir, allowed_origins=("https://docs.example",))) as app:
        assert await refused_status(app.url, origin="https://evil.example") == 403
        async with ScriptClient.connect(app.url, origin="https://docs.example") as listed:
            assert (await listed.request("ping"))["type"] == "pong"
        async with ScriptClient.connect(app.url) as no_origin:
            assert (await no_origin.request("ping"))["type"] == "pong"


# Limits -------------------------------------------------------------------


async def test_rate_limit(data_dir):
    """Past the rate, requests get rate_limited (temporary); a polite client on another connection is untouched."""
    async with running(config(data_dir, rate_limit=5)) as app:
        async with (
            ScriptClient.connect(app.url, name="flood") as flood,
            ScriptClient.connect(app.url, name="polite") as polite,
        ):
            assert flood.welcome["limits"]["messages_per_s"] == 5
            replies = [await flood.request("ping", id=n) for n in range(12)]
            limited = [r for r in replies if r["type"] == "error"]
            assert limited, "the burst should have run out"
            assert all(r["code"] == "rate_limited" and r["temporary"] is True for r in limited)
            assert {r["reply_to"] for r in limited} <= set(range(12))
            assert (await polite.request("ping"))["type"] == "pong"


async def test_sustained_abuse_closes_with_1008(data_dir):
    """A client that keeps flooding past the limit is closed with 1008."""
    async with running(config(data_dir, rate_limit=5)) as app:
        async with ScriptClient.connect(app.url, name="flood") as flood:
            for n in range(200):
                if flood.websocket.close_code is not None:
                    break
                try:
                    await flood.send({"type": "ping", "id": n})
                except Exception:
                    break
            assert await flood.wait_closed() == 1008


async def test_subscriptions_per_connection(data_dir):
    """A connection cannot subscribe to more sections than the limit; resubscribing is fine."""
    async with running(config(data_dir, max_subscriptions=2)) as app, ScriptClient.connect(app.url) as client:
        await client.call("subscribe", document_id="d", section_id="a")
        await client.call("subscribe", document_id="d", section_id="b")
        over = await client.request("subscribe", document_id="d", section_id="c")
        assert over["code"] == "bad_request" and "limit" in over["message"]
        assert (await client.request("subscribe", document_id="d", section_id="a"))["type"] == "subscribed"
        await client.call("unsubscribe", document_id="d", section_id="a")
        assert (await client.request("subscribe", document_id="d", section_id="c"))["type"] == "subscribed"


async def test_sessions_per_user_per_minute(data_dir):
    """A user creating sessions too fast gets rate_limited; idempotent retries do not count."""
    async with running(config(data_dir, sessions_per_minute=3)) as app:
        async with (
            ScriptClient.connect(app.url, name="alice") as alice,
            ScriptClient.connect(app.url, name="alice") as again,
        ):
            for n in range(3):
                await alice.call("create_session", document_id="d", section_id="s", idempotency_key=f"k{n}")
            retry = await again.request("create_session", document_id="d", section_id="s", idempotency_key="k0")
            assert retry["type"] == "session_created"
            over = await again.request("create_session", document_id="d", section_id="s")
            assert over["code"] == "rate_limited" and over["temporary"] is True
        async with ScriptClient.connect(app.url, name="bob") as bob:
            assert (await bob.request("create_session", document_id="d", section_id="s"))["type"] == "session_created"


async def test_connections_per_user(data_dir):
    """Past the per-user connection limit the handshake is refused with 429; others still connect."""
    async with running(config(data_dir, max_connections_per_user=2)) as app:
        async with ScriptClient.connect(app.url, name="alice"), ScriptClient.connect(app.url, name="alice"):
            assert await refused_status(app.url, name="alice") == 429
            async with ScriptClient.connect(app.url, name="bob"):
                pass
        async with ScriptClient.connect(app.url, name="alice") as alice:
            assert (await alice.request("ping"))["type"] == "pong"


async def raw_handshake(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket handshake by hand, so that nothing answers the server's pings afterwards."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /ws?name=silent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return reader, writer


async def test_silent_peer_is_dropped(data_dir):
    """A peer that never answers pings is disconnected after the ping timeout."""
    async with running(config(data_dir, ping_interval_s=0.2, ping_timeout_s=0.2)) as app:
        reader, writer = await raw_handshake(app.port)
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass  # the welcome and the pings, until the server gives up on us
        writer.close()


async def test_handshake_timeout(data_dir):
    """A connection that never completes the opening handshake is closed after open_timeout."""
    async with running(config(data_dir, open_timeout_s=0.3)) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        writer.write(b"GET /ws HTTP/1.1\r\n")
        async with asyncio.timeout(10):
            await reader.read()
        writer.close()


@pytest.mark.timeout(60)
def test_rate_limit_zero_turns_off_every_rate_limit():
    """--rate-limit 0 (benchmarks, trusted harnesses) also lifts the session quota, unless it is set."""
    assert resolved_config("--rate-limit", "0")["sessions_per_minute"] == "0"
    assert resolved_config("--rate-limit", "0", "--sessions-per-minute", "5")["sessions_per_minute"] == "5"
    assert resolved_config()["sessions_per_minute"] == "300"
    assert (
        resolved_config(env={"SECTIONCHAT_ALLOWED_ORIGIN": "https://a.example,https://b.example"})["allowed_origins"]
        == '["https://a.example", "https://b.example"]'
    )
