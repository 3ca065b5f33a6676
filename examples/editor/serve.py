"""The editor example's own little backend: serves the built page and shares documents.

Not part of sectionchat. It stands in for what a real editor already has (its
collaboration service: Y.js, Hocuspocus, Liveblocks…): it serves `dist/` and keeps
each document's content in memory, so that everyone who opens a document sees the
author's edits. The chat itself goes straight from the page to the sectionchat
server. Standard library only:

    python3 serve.py [--host 127.0.0.1] [--port 8080]

    GET /doc/<id>?after=N   long-polls (up to 25 s) until the version passes N, then
                            answers {"version", "content"} (version 0: content null)
    PUT /doc/<id>           {"base": N, "content": …}: 200 {"version": N + 1}, or 409
                            with the current {"version", "content"} when N is not it
"""

from __future__ import annotations

import argparse
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DIST = Path(__file__).resolve().parent / "dist"
POLL_SECONDS = 25.0
MAX_BODY = 1 << 20


class Documents:
    """Each document's latest content and version; waiters are woken on every change."""

    def __init__(self) -> None:
        self._docs: dict[str, tuple[int, object]] = {}
        self._changed = threading.Condition()
        self.closing = False

    def get(self, doc_id: str, after: int, timeout: float) -> tuple[int, object]:
        with self._changed:
            self._changed.wait_for(lambda: self.closing or self._docs.get(doc_id, (0, None))[0] > after, timeout)
            return self._docs.get(doc_id, (0, None))

    def put(self, doc_id: str, base: int, content: object) -> tuple[bool, int, object]:
        with self._changed:
            version, current = self._docs.get(doc_id, (0, None))
            if base != version:
                return False, version, current
            self._docs[doc_id] = (version + 1, content)
            self._changed.notify_all()
            return True, version + 1, content

    def close(self) -> None:
        with self._changed:
            self.closing = True
            self._changed.notify_all()


class Handler(SimpleHTTPRequestHandler):
    documents: Documents

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read their own output
        pass

    def _doc_id(self) -> str | None:
        path = urlsplit(self.path).path
        return unquote(path[len("/doc/") :]) if path.startswith("/doc/") and len(path) > len("/doc/") else None

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        doc_id = self._doc_id()
        if doc_id is None:
            super().do_GET()
            return
        query = parse_qs(urlsplit(self.path).query)
        try:
            after = int(query.get("after", ["-1"])[0])
        except ValueError:
            self._json(400, {"error": "after must be an integer"})
            return
        version, content = self.documents.get(doc_id, after, POLL_SECONDS if after >= 0 else 0)
        self._json(200, {"version": version, "content": content})

    def do_PUT(self) -> None:
        doc_id = self._doc_id()
        length = int(self.headers.get("Content-Length") or 0)
        if doc_id is None or not 0 < length <= MAX_BODY:
            self._json(400 if doc_id else 404, {"error": "PUT /doc/<id> with a JSON body of at most 1 MiB"})
            return
        try:
            body = json.loads(self.rfile.read(length))
            base, content = int(body["base"]), body["content"]
        except (ValueError, KeyError, TypeError):
            self._json(400, {"error": 'the body is {"base": version, "content": document}'})
            return
        stored, version, current = self.documents.put(doc_id, base, content)
        self._json(200 if stored else 409, {"version": version} if stored else {"version": version, "content": current})

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away during a long poll


class EditorServer:
    """The server in a thread: `with EditorServer(port=0) as server: server.url`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, directory: Path = DIST):
        self.documents = Documents()
        handler = type("BoundHandler", (Handler,), {"documents": self.documents})
        self.httpd = ThreadingHTTPServer((host, port), partial(handler, directory=str(directory)))
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="editor-example", daemon=True)

    def __enter__(self) -> EditorServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.documents.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    if not (DIST / "index.html").exists():
        raise SystemExit("serve.py: build the page first: npm ci && npm run build")
    with EditorServer(args.host, args.port) as server:
        print(f"editor example on {server.url}?ws=ws://127.0.0.1:8765/ws&doc=handbook&name=alice", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
