"""Plain HTTP on the WebSocket port: the page, its assets, health, 404."""

from __future__ import annotations

import asyncio

import msgspec


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, body


async def test_root_serves_the_browser_client(app):
    """GET / is static/index.html."""
    status, headers, body = await http_get(app.port, "/")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert b"<html" in body.lower()
    assert (await http_get(app.port, "/static/index.html"))[2] == body
    status, headers, _ = await http_get(app.port, "/static/sectionchat.js")
    assert status == 200 and "javascript" in headers["content-type"]
    assert headers["access-control-allow-origin"] == "*"  # importable by editors on other origins


async def test_healthz(app):
    """/healthz is JSON and 200 while serving."""
    status, headers, body = await http_get(app.port, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert msgspec.json.decode(body)["status"] == "serving"


async def test_unknown_paths_are_404(app):
    """Unknown paths, and paths that try to leave static/, get 404."""
    for path in ("/nope", "/static/", "/static/../server/app.py", "/static/%2e%2e/pyproject.toml", "/ws/extra"):
        status, _, _ = await http_get(app.port, path)
        assert status == 404, path
