"""Plain HTTP on the WebSocket port: the page, its assets, health, 404."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from conftest import http_get, raw_http


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


def request_line(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


@pytest.mark.timeout(30)
async def test_head_is_get_without_body(app):
    """HEAD answers as GET does, with GET's Content-Length, and no body."""
    for path in ("/", "/static/sectionchat.js", "/healthz", "/metrics", "/nope"):
        get_status, get_headers, get_body = await raw_http(app.port, request_line("GET", path))
        status, headers, body = await raw_http(app.port, request_line("HEAD", path))
        assert status == get_status, path
        assert body == b"", path
        assert headers["content-type"] == get_headers["content-type"], path
        if path != "/metrics":  # the metrics text changes between two scrapes
            assert int(headers["content-length"]) == len(get_body) > 0, path


@pytest.mark.timeout(30)
async def test_other_methods_are_405(app):
    """Methods other than GET and HEAD on the HTTP paths are 405 with `Allow: GET, HEAD`; unknown paths stay 404."""
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "get"):
        for path in ("/", "/static/sectionchat.js", "/healthz", "/metrics"):
            status, headers, body = await raw_http(app.port, request_line(method, path, "Content-Length: 0"))
            assert status == 405, (method, path)
            assert headers["allow"] == "GET, HEAD", (method, path)
            assert int(headers["content-length"]) == len(body)
        status, _, _ = await raw_http(app.port, request_line(method, "/nope"))
        assert status == 404, method
    # The WebSocket endpoint takes only GET (the opening handshake).
    status, headers, _ = await raw_http(app.port, request_line("POST", "/ws?name=alice"))
    assert status == 405 and headers["allow"] == "GET"
    status, headers, body = await raw_http(app.port, request_line("HEAD", "/ws"))
    assert status == 405 and headers["allow"] == "GET"


@pytest.mark.timeout(30)
async def test_a_request_body_is_refused_without_an_answer(app):
    """websockets' parser refuses a request with a body before any hook: the connection closes unanswered, the server lives on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(request_line("POST", "/healthz", "Content-Length: 3") + b"abc")
    await writer.drain()
    assert await reader.read() == b""
    writer.close()
    assert (await http_get(app.port, "/healthz"))[0] == 200
