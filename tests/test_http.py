"""Plain HTTP on the WebSocket port: the page, its assets, health, 404."""

from __future__ import annotations

import msgspec
from conftest import http_get


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
