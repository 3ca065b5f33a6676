# The assistant service: receives sectionchat's webhooks on POST /hook, and
# answers every message that mentions it with a summary of its session, posted
# through the HTTP API. What the answer says is summary.py's; this module owns
# the HTTP on both sides, the command line, and when (not) to answer.
#
# Rules kept here:
# - Every webhook is verified with standardwebhooks before anything else: a
#   bad or missing signature (or a stale timestamp) is 401, a malformed
#   signature header or body 400. A verified one is answered 204 at once; the
#   answer is made in a task of its own, so a slow reply (a real model) never
#   holds up the server's deliveries.
# - Answered: a `message` event whose message is addressed to the assistant,
#   is not its own (it never answers itself), is not a tombstone, and was sent
#   at most --max-age seconds ago (a new webhook URL is sent a section's whole
#   history: old mentions are not answered). Every other event is ignored.
# - Webhooks come at least once. The answer's client_msg_id is derived from the
#   triggering message's id, so a repeat that reaches the API stores nothing new
#   (the API answers 200 with the first answer); a repeat that comes while the
#   first is being answered is dropped here.
# - The summary covers the session up to the triggering message, read with
#   GET .../messages paged by after_seq. An API failure that may pass (no
#   answer, 429, 5xx) is retried with backoff, with the same client_msg_id;
#   others (the session closed or gone) are logged and dropped. Once a
#   webhook is acknowledged the server does not send it again: an answer in
#   progress when this process dies is lost.

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from .summary import Message, addressed_to, summarize

logger = logging.getLogger("assistant")

PAGE = 200  # the largest history page the API serves
TIMEOUT_S = 10.0  # per API request
ATTEMPTS = 6  # per answer; the waits between them: 1, 2, 4, 8, 16 s
BACKOFF_S = 1.0
STOP_GRACE_S = 5.0  # answers in progress get this long to finish when the service stops


@dataclasses.dataclass(frozen=True)
class Settings:
    api_key: str
    webhook_secret: str
    api_url: str = "http://127.0.0.1:8766"
    host: str = "127.0.0.1"
    port: int = 8790
    name: str = "assistant"
    max_age: float = 3600.0  # seconds; 0: answer mentions of any age


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m examples.assistant",
        description="Answer @assistant in sectionchat sessions with a summary, from the server's webhooks.",
    )
    env = environ.get
    parser.add_argument("--api-url", default=env("ASSISTANT_API_URL", Settings.api_url),
                        help="the chat server's HTTP API (ASSISTANT_API_URL; default %(default)s)")  # fmt: skip
    parser.add_argument("--api-key", default=env("ASSISTANT_API_KEY"),
                        help="one of the server's --api-key values (ASSISTANT_API_KEY; required)")  # fmt: skip
    parser.add_argument("--webhook-secret", default=env("ASSISTANT_WEBHOOK_SECRET"),
                        help="the server's --webhook-secret, whsec_... (ASSISTANT_WEBHOOK_SECRET; required)")  # fmt: skip
    parser.add_argument("--host", default=env("ASSISTANT_HOST", Settings.host),
                        help="address to listen on for webhooks (ASSISTANT_HOST; default %(default)s)")  # fmt: skip
    parser.add_argument("--port", type=int, default=env("ASSISTANT_PORT", str(Settings.port)),
                        help="port to listen on, 0 picks a free one (ASSISTANT_PORT; default %(default)s)")  # fmt: skip
    parser.add_argument("--name", default=env("ASSISTANT_NAME", Settings.name),
                        help="the user it answers to and writes as (ASSISTANT_NAME; default %(default)s)")  # fmt: skip
    parser.add_argument("--max-age", type=float, default=env("ASSISTANT_MAX_AGE", str(Settings.max_age)),
                        help="ignore mentions older than this many seconds, 0 for none (ASSISTANT_MAX_AGE; default %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("--api-key (or ASSISTANT_API_KEY) is required")
    try:
        Webhook(args.webhook_secret or "")
    except Exception:
        parser.error("--webhook-secret (or ASSISTANT_WEBHOOK_SECRET) must be whsec_ followed by a base64 key")
    return Settings(**vars(args))


def reply_id(message: Message) -> str:
    """The answer's client_msg_id: one per triggering message, whatever the number of deliveries."""
    return "assistant-re-" + message["message_id"]


def to_answer(event: Any, name: str, max_age: float = 0.0, now: datetime | None = None) -> Message | None:
    """The message a verified webhook asks `name` to answer, or None."""
    if not isinstance(event, dict) or event.get("type") != "message":
        return None
    message = event.get("message")
    if not isinstance(message, dict) or message.get("author") == name or message.get("deleted_at") is not None:
        return None
    if not addressed_to(message, name):
        return None
    if max_age > 0:
        try:
            age = (now or datetime.now(UTC)) - datetime.fromisoformat(message["sent_at"])
        except (KeyError, TypeError, ValueError):
            return None
        if age.total_seconds() > max_age:
            return None
    return message


class ApiError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status}: {reason}" if status else reason)
        self.status = status

    @property
    def temporary(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500  # 0: no answer at all


class Assistant:
    """The webhook endpoint and the answers it starts."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.api_url = settings.api_url.rstrip("/")  # may be set after start (tests)
        self.verifier = Webhook(settings.webhook_secret)
        self.in_flight: dict[str, asyncio.Task[None]] = {}  # triggering message id -> its answer
        self.outcomes: Counter[str] = Counter()  # created, repeated (the API had it already), failed
        self.port = 0
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The webhook URL to give the chat server (--webhook)."""
        return f"http://{self.settings.host}:{self.port}/hook"

    async def start(self) -> int:
        """Listen on the settings' host and port; return the port (useful with 0)."""
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.settings.host, self.settings.port).start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # no new webhooks
        await self.drain(STOP_GRACE_S)
        for task in list(self.in_flight.values()):
            task.cancel()
        await asyncio.gather(*self.in_flight.values(), return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the answers in progress."""
        if self.in_flight:
            await asyncio.wait(list(self.in_flight.values()), timeout=timeout)

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = self.verifier.verify(body, dict(request.headers))
        except WebhookVerificationError as error:
            return web.Response(status=401, text=f"{error}\n")
        except ValueError as error:  # a malformed signature header, or a body that is not UTF-8 JSON
            return web.Response(status=400, text=f"malformed webhook: {error}\n")
        message = to_answer(event, self.settings.name, self.settings.max_age)
        if message is not None and message["message_id"] not in self.in_flight:
            task = asyncio.create_task(self.answer(message))
            self.in_flight[message["message_id"]] = task
            task.add_done_callback(lambda _: self.in_flight.pop(message["message_id"], None))
        return web.Response(status=204)

    async def answer(self, message: Message) -> None:
        """Post the summary in the message's session, retrying failures that may pass."""
        where = f"session {message['session_id']} #{message['seq']}"
        for attempt in range(1, ATTEMPTS + 1):
            try:
                status = await self._answer_once(message)
            except ApiError as error:
                if not error.temporary or attempt == ATTEMPTS:
                    logger.warning("not answering %s: %s", where, error)
                    self.outcomes["failed"] += 1
                    return
                delay = BACKOFF_S * 2 ** (attempt - 1)
                logger.info("answering %s failed (%s); retrying in %.0f s", where, error, delay)
                await asyncio.sleep(delay)
            except Exception:
                logger.exception("not answering %s", where)
                self.outcomes["failed"] += 1
                return
            else:
                self.outcomes["created" if status == 201 else "repeated"] += 1
                logger.info("answered %s (HTTP %d)", where, status)
                return

    async def _answer_once(self, message: Message) -> int:
        session = quote(message["session_id"], safe="")
        history = await self.read_session(message["session_id"], message["seq"])
        reply = {
            "user": self.settings.name,
            "text": summarize(history, self.settings.name),
            "client_msg_id": reply_id(message),
            "mentions": [message["author"]],
        }
        status, _ = await self._api("POST", f"/api/v1/sessions/{session}/messages", json=reply)
        return status

    async def read_session(self, session_id: str, up_to_seq: int) -> list[Message]:
        """The session's messages from the first to `up_to_seq`, a page at a time."""
        path = f"/api/v1/sessions/{quote(session_id, safe='')}/messages"
        messages: list[Message] = []
        after = 0
        while True:
            _, page = await self._api("GET", path, params={"after_seq": str(after), "limit": str(PAGE)})
            messages += [m for m in page["messages"] if m["seq"] <= up_to_seq]
            if not page["has_more"] or not page["messages"] or page["messages"][-1]["seq"] >= up_to_seq:
                return messages
            after = page["messages"][-1]["seq"]

    async def _api(self, method: str, path: str, **options: Any) -> tuple[int, Any]:
        assert self._http is not None, "start() first"
        headers = {"Authorization": f"Bearer {self.settings.api_key}"}
        try:
            async with self._http.request(method, self.api_url + path, headers=headers, **options) as response:
                status, body = response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise ApiError(0, f"{method} {path}: {str(error) or type(error).__name__}") from error
        if not 200 <= status < 300:
            reason = body.get("error", {}).get("message", "") if isinstance(body, dict) else ""
            raise ApiError(status, f"{method} {path}: {reason}")
        return status, body


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM."""
    assistant = Assistant(settings)
    try:
        port = await assistant.start()
    except OSError as error:
        reason = os.strerror(error.errno).lower() if error.errno else str(error)
        raise SystemExit(f"assistant: cannot listen on {settings.host}:{settings.port}: {reason}") from None
    logger.info("assistant listening on %s:%d (webhooks at /hook); API %s", settings.host, port, settings.api_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await assistant.stop()


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(settings))
