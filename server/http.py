# Plain HTTP on the WebSocket port: the browser client, its assets, health.
#
# Static files are read once at startup into a table of url -> response body,
# so a request path is only ever looked up, never joined onto the filesystem.
#
# Methods: GET, and HEAD (the GET answer without its body, Content-Length kept);
# any other method on a path that exists is 405 with `Allow: GET, HEAD`, on one
# that does not 404. websockets' HTTP parser refuses a request that has a body
# (Content-Length other than 0, or Transfer-Encoding) before any hook sees it,
# by closing the connection without an answer: only body-less requests reach us.

from __future__ import annotations

import dataclasses
import email.utils
import http
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Response

from .metrics import Metrics

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def response(status: int, body: bytes, content_type: str, *, cache: bool = False) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-cache" if cache else "no-store"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def json_response(status: int, document: object) -> Response:
    return response(status, msgspec.json.encode(document), "application/json")


def not_found() -> Response:
    return response(404, b"not found\n", "text/plain; charset=utf-8")


ALLOWED_METHODS = ("GET", "HEAD")


def method_not_allowed(allowed: tuple[str, ...] = ALLOWED_METHODS) -> Response:
    refused = response(405, b"method not allowed\n", "text/plain; charset=utf-8")
    refused.headers["Allow"] = ", ".join(allowed)
    return refused


def without_body(answer: Response) -> Response:
    """The answer to HEAD: GET's status and headers (Content-Length included), no body."""
    return dataclasses.replace(answer, body=b"")


def load_static(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """Every file under `directory` as url path -> (body, content type)."""
    files: dict[str, tuple[bytes, str]] = {}
    if not directory.is_dir():
        return files
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if content_type.startswith("text/") or content_type in ("application/javascript", "application/json"):
                content_type += "; charset=utf-8"
            files["/static/" + path.relative_to(directory).as_posix()] = (path.read_bytes(), content_type)
    if "/static/index.html" in files:
        files["/"] = files["/static/index.html"]
    return files


class HttpRoutes:
    """Answers the plain HTTP requests that reach the WebSocket port."""

    def __init__(
        self,
        health: Callable[[], Awaitable[tuple[int, dict[str, object]]]],
        metrics: Metrics,
        static: dict[str, tuple[bytes, str]],
    ):
        self._health = health
        self._metrics = metrics
        self._static = static

    async def __call__(self, path: str, method: str = "GET") -> Response:
        if method == "GET":
            return await self._get(path)
        if method == "HEAD":
            return without_body(await self._get(path))
        # Methods are case-sensitive: "get" is not GET.
        return method_not_allowed() if self._exists(path) else not_found()

    def _exists(self, path: str) -> bool:
        return path in ("/healthz", "/metrics") or path in self._static

    async def _get(self, path: str) -> Response:
        if path == "/healthz":
            return json_response(*await self._health())
        if path == "/metrics":
            return response(200, self._metrics.render(), self._metrics.content_type)
        found = self._static.get(path)
        if found is None:
            return not_found()
        asset = response(200, found[0], found[1], cache=True)
        # Public files: an editor on another origin may import sectionchat.js as a module.
        asset.headers["Access-Control-Allow-Origin"] = "*"
        return asset
