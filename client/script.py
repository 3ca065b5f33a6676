"""`sectionchat script`: scripted WebSocket clients against a sectionchat server.

    sectionchat script SCENARIO.yaml [SCENARIO.yaml ...] --url ws://127.0.0.1:8765/ws [--record FILE]

A scenario names some clients and lists steps: send a request and match its
reply, wait for an event of some shape, check that none comes, expect the server
to close the connection, disconnect, reconnect, sleep. Expectations are partial
matches with a few `$` matchers; values saved from frames feed later steps as
`${name}`. The format is documented in docs/harness.md.

This module runs scenarios: the scripted connections (Peer), the transcript
(Recorder), one handler per step kind (Runner), the report and the command
line. Loading and checking a scenario file is client/scenario.py, matching
frames and `${name}` variables client/matching.py.

Exit codes: 0 every scenario passed; 1 a step failed (mismatch, timeout, closed
connection, server unreachable); 2 bad command line or scenario file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import msgspec
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from yarl import URL

from client.matching import NAME, lookup, match, parse_path, render, substitute
from client.scenario import Action, ClientSpec, Scenario, ScenarioError, Step, load_scenario, yaml_scalar
from protocol.codec import MSGPACK_SUBPROTOCOL

__all__ = ["main", "amain", "load_scenario", "match", "ScenarioError"]

Frame = dict[str, Any]

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_NO_EVENT_S = 0.5
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# ---------------------------------------------------------------------------
# Running.


class StepFailed(Exception):
    """A step did not get what it expected; `details` are the report's lines."""

    def __init__(self, summary: str, details: list[str] | None = None):
        super().__init__(summary)
        self.summary = summary
        self.details = details or []


class Recorder:
    """`--record`: one JSON object per line for everything sent and received."""

    def __init__(self, stream: TextIO | None):
        self.stream = stream
        self.started = time.monotonic()
        self.scenario = ""

    def __call__(self, client: str, direction: str, frame: Any = None, **extra: Any) -> None:
        if self.stream is None:
            return
        entry = {
            "time": round(time.monotonic() - self.started, 6),
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "scenario": self.scenario,
            "client": client,
            "direction": direction,
            "frame": frame,
            **extra,
        }
        self.stream.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        self.stream.flush()


def _pretty(frame: Any, indent: str = "    ") -> list[str]:
    return [indent + line for line in json.dumps(frame, indent=2, ensure_ascii=False, default=str).splitlines()]


def normalize_url(url: str) -> str:
    parts = urlsplit(url if "://" in url else "ws://" + url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"not a ws:// URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class Peer:
    """One named client's connection, its unread frames and how it ended."""

    def __init__(self, name: str, spec: ClientSpec, url: str, record: Recorder):
        self.name = name
        self.spec = spec
        self.url = url
        self.record = record
        self.websocket: ClientConnection | None = None
        self.welcome: Frame = {}
        self.inbox: list[Frame] = []  # received and not yet taken by a step, in arrival order
        self.closed: tuple[int, str] | None = None
        self._arrival = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._binary = spec.subprotocol == MSGPACK_SUBPROTOCOL

    @property
    def connected(self) -> bool:
        return self.websocket is not None and self.closed is None

    def _address(self) -> tuple[str, str]:
        query = []
        if self.spec.name is not None:
            query.append("name=" + quote(self.spec.name, safe=""))
        if self.spec.token is not None:
            query.append("token=" + quote(self.spec.token, safe=""))
        joiner = "&" if "?" in self.url else "?"
        address = self.url + (joiner + "&".join(query) if query else "")
        shown = address.replace(quote(self.spec.token, safe=""), "***") if self.spec.token else address
        return address, shown

    async def open(self, timeout: float) -> None:
        address, shown = self._address()
        self.inbox, self.closed, self.welcome = [], None, {}
        options: dict[str, Any] = {"open_timeout": timeout, "compression": None, "max_size": None}
        if self.spec.subprotocol:
            options["subprotocols"] = [self.spec.subprotocol]
        try:
            self.websocket = await connect(address, **options)
        except InvalidStatus as error:
            body = error.response.body.decode(errors="replace").strip() if error.response.body else ""
            raise StepFailed(
                f"{self.name} could not connect to {shown}: HTTP {error.response.status_code} {body}".rstrip()
            ) from None
        except (OSError, InvalidHandshake, TimeoutError) as error:
            raise StepFailed(f"{self.name} could not connect to {shown}: {error or type(error).__name__}") from None
        self.record(self.name, "open", url=shown)
        try:
            first = await asyncio.wait_for(self._receive(), timeout)
        except (ConnectionClosed, TimeoutError):
            raise StepFailed(
                f"{self.name} connected to {shown} but got no welcome frame within {timeout:g} s"
            ) from None
        if first.get("type") != "welcome":
            raise StepFailed(f"{self.name}: the first frame is not a welcome", ["  got:", *_pretty(first)])
        self.welcome = first
        self._reader = asyncio.create_task(self._read())

    async def _receive(self) -> Frame:
        assert self.websocket is not None
        data = await self.websocket.recv()
        try:
            frame = msgspec.msgpack.decode(data) if isinstance(data, bytes) else msgspec.json.decode(data)
        except msgspec.DecodeError:
            frame = {"$undecodable": data if isinstance(data, str) else data.hex()}
        self.record(self.name, "recv", frame)
        return frame if isinstance(frame, dict) else {"$not_an_object": frame}

    async def _read(self) -> None:
        assert self.websocket is not None
        try:
            while True:
                self.inbox.append(await self._receive())
                self._arrival.set()
        except ConnectionClosed:
            code = self.websocket.close_code if self.websocket.close_code is not None else 1006
            self.closed = (code, self.websocket.close_reason or "")
            self.record(self.name, "close", code=code, reason=self.closed[1])
            self._arrival.set()

    async def send(self, frame: Frame) -> None:
        assert self.websocket is not None
        data: str | bytes = msgspec.msgpack.encode(frame) if self._binary else json.dumps(frame, ensure_ascii=False)
        self.record(self.name, "send", frame)
        await self._send(data)

    async def send_raw(self, text: str) -> None:
        self.record(self.name, "send", None, raw=text)
        await self._send(text)

    async def _send(self, data: str | bytes) -> None:
        assert self.websocket is not None
        try:
            await self.websocket.send(data)
        except ConnectionClosed:
            await self._settle()
            raise StepFailed(f"{self.name} cannot send: the connection is closed{self._close_text()}") from None

    async def _settle(self) -> None:
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    def _close_text(self) -> str:
        if self.closed is None:
            return ""
        code, reason = self.closed
        return f" (code {code}" + (f", reason {reason!r})" if reason else ")")

    async def take(self, wanted: Callable[[Frame], bool], timeout: float) -> Frame | None:
        """The first unread frame that `wanted` accepts, waiting up to `timeout`; None on timeout.

        Other frames stay unread for later steps. Raises StepFailed if the
        connection closes first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for index, frame in enumerate(self.inbox):
                if wanted(frame):
                    return self.inbox.pop(index)
            if self.closed is not None:
                raise _ClosedWhileWaiting(self._close_text())
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_closed(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self._reader) if self._reader else asyncio.sleep(0), timeout)
        except TimeoutError:
            return False
        return self.closed is not None

    async def close(self) -> None:
        if self.websocket is not None:
            await self.websocket.close()
            await self._settle()
        self.websocket = None


class _ClosedWhileWaiting(Exception):
    pass


def _is_event(frame: Frame) -> bool:
    return "reply_to" not in frame


def _same_id(left: Any, right: Any) -> bool:
    return type(left) is type(right) and left == right


def _differences(differences: list[str]) -> list[str]:
    return ["  differences:", *("    " + line for line in differences)]


def _mismatch(what: str, shape: Any, got: Frame, differences: list[str]) -> list[str]:
    return [f"  expected {what} matching:", *_pretty(shape), "  got:", *_pretty(got), *_differences(differences)]


# An action's key is given unless it has its default: None for send and send_raw, UNSET for the expects.
_NOT_GIVEN = {field.name: field.default for field in msgspec.structs.fields(Action)}


@dataclass
class _Turn:
    """One action step as it runs: what it has sent, and the frame its `save` reads."""

    peer: Peer
    action: Action
    timeout: float
    sent: Frame | None = None
    matched: Frame | None = None


@dataclass
class ApiTarget:
    """The HTTP API that `api` steps call: its base URL (http://HOST:PORT) and key."""

    url: str
    key: str | None


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


class Runner:
    def __init__(
        self,
        scenario: Scenario,
        url: str,
        timeout: float | None,
        variables: dict[str, Any],
        record: Recorder,
        verbose: bool = False,
        api: ApiTarget | None = None,
    ):
        self.scenario = scenario
        self.api = api
        self._http: aiohttp.ClientSession | None = None
        self.verbose = verbose
        self.default_timeout = timeout or scenario.timeout or DEFAULT_TIMEOUT_S
        self.variables = {"run_id": secrets.token_hex(4), **variables}
        self.record = record
        self.peers = {name: Peer(name, spec, url, record) for name, spec in scenario.clients.items()}
        self._ids = 0
        # The handler of each kind of step (Step.kind).
        self._steps: dict[str, Callable[[Step], Awaitable[None]]] = {
            "sleep": self._sleep,
            "command": self._command,
            "action": self._action,
            "api": self._api,
        }
        # The parts of an action by their key (Action's fields), in the order they run.
        self._parts: dict[str, Callable[[_Turn, Any], Awaitable[None]]] = {
            "send": self._send,
            "send_raw": self._send_raw,
            "expect": self._expect,
            "expect_reply": self._expect_reply,
            "expect_welcome": self._expect_welcome,
            "expect_event": self._expect_event,
            "expect_no_event": self._expect_no_event,
            "expect_close": self._expect_close,
        }

    async def run(self) -> None:
        try:
            for name, peer in self.peers.items():
                if self.scenario.clients[name].connect:
                    try:
                        await peer.open(self.default_timeout)
                    except StepFailed as failure:
                        failure.summary = "before the first step: " + failure.summary
                        raise
            for step in self.scenario.steps:
                started = time.monotonic()
                try:
                    await self._run_step(step)
                except StepFailed as failure:
                    failure.step = step  # type: ignore[attr-defined]
                    raise
                if self.verbose:
                    first = step.source[0].strip() if step.source else step.kind
                    print(
                        f"  ok step {step.index} (line {step.line}, {time.monotonic() - started:.2f} s): {first}",
                        flush=True,
                    )
        finally:
            await asyncio.gather(*(peer.close() for peer in self.peers.values()), return_exceptions=True)
            if self._http is not None:
                await self._http.close()

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def _run_step(self, step: Step) -> None:
        await self._steps[step.kind](step)

    async def _sleep(self, step: Step) -> None:
        await asyncio.sleep(step.seconds)

    async def _command(self, step: Step) -> None:
        assert step.client is not None
        peer = self.peers[step.client]
        if step.command in ("disconnect", "reconnect"):
            await peer.close()
        if step.command in ("connect", "reconnect"):
            await peer.open(self.default_timeout)

    async def _action(self, step: Step) -> None:
        """Each part of the action that the step gives, in order; then its `save`."""
        assert step.client is not None and step.action is not None
        peer = self.peers[step.client]
        if not peer.connected:
            raise StepFailed(f"{peer.name} is not connected{peer._close_text()}", self._unread(peer))
        turn = _Turn(peer, step.action, step.action.timeout or self.default_timeout)
        try:
            for key, part in self._parts.items():
                value = getattr(step.action, key)
                if value is not _NOT_GIVEN[key]:
                    await part(turn, substitute(value, self.variables))
        except _ClosedWhileWaiting as closed:
            raise StepFailed(
                f"{peer.name}'s connection was closed by the server{closed}",
                self._sent(peer, turn.sent) + self._unread(peer),
            ) from None
        self._save(turn)

    # The parts of an action; each gets the value of its key with the variables substituted.

    async def _send(self, turn: _Turn, request: Frame) -> None:
        if "id" not in request:
            request = (
                {"type": request.pop("type"), "id": self._next_id(), **request}
                if "type" in request
                else {"id": self._next_id(), **request}
            )
        elif request["id"] is None:
            del request["id"]
        turn.sent = request
        await turn.peer.send(request)

    async def _send_raw(self, turn: _Turn, text: str) -> None:
        await turn.peer.send_raw(text)

    async def _expect(self, turn: _Turn, shape: Any) -> None:
        peer, sent = turn.peer, turn.sent
        if sent is not None:
            request_id = sent.get("id")
            what = f"the reply to {sent.get('type', 'the request')} id {render(request_id)}"

            def wanted(frame: Frame) -> bool:
                return "reply_to" in frame and _same_id(frame["reply_to"], request_id)
        else:
            what = "the reply to the raw frame (the next frame with reply_to, or an error)"

            def wanted(frame: Frame) -> bool:
                return "reply_to" in frame or frame.get("type") == "error"

        reply = await self._take(peer, wanted, turn.timeout, what, shape)
        differences = match(shape, reply)
        if differences:
            raise StepFailed(
                f"{peer.name} got a reply that does not match",
                self._sent(peer, sent) + _mismatch("a reply", shape, reply, differences),
            )
        turn.matched = reply

    async def _expect_reply(self, turn: _Turn, shape: Any) -> None:
        reply = await self._take(
            turn.peer,
            lambda frame: "reply_to" in frame and not match(shape, frame),
            turn.timeout,
            "a reply matching",
            shape,
        )
        turn.matched = turn.matched or reply

    async def _expect_welcome(self, turn: _Turn, shape: Any) -> None:
        peer = turn.peer
        differences = match(shape, peer.welcome)
        if differences:
            raise StepFailed(
                f"{peer.name}'s welcome does not match", _mismatch("a welcome", shape, peer.welcome, differences)
            )
        turn.matched = turn.matched or peer.welcome

    async def _expect_event(self, turn: _Turn, shape: Any) -> None:
        event = await self._take(
            turn.peer,
            lambda frame: _is_event(frame) and not match(shape, frame),
            turn.timeout,
            "an event matching",
            shape,
        )
        turn.matched = turn.matched or event

    async def _expect_no_event(self, turn: _Turn, shape: Any) -> None:
        duration = turn.action.for_ if turn.action.for_ is not None else DEFAULT_NO_EVENT_S
        unexpected: Frame | None
        try:
            unexpected = await turn.peer.take(lambda frame: _is_event(frame) and not match(shape, frame), duration)
        except _ClosedWhileWaiting:
            unexpected = None  # a closed connection receives no event
        if unexpected is not None:
            raise StepFailed(
                f"{turn.peer.name} got an event it should not have within {duration:g} s",
                ["  expected no event matching:", *_pretty(shape), "  got:", *_pretty(unexpected)],
            )

    async def _expect_close(self, turn: _Turn, expected: Any) -> None:
        peer = turn.peer
        if not await peer.wait_closed(turn.timeout):
            raise StepFailed(
                f"timed out after {turn.timeout:g} s waiting for the server to close {peer.name}'s connection",
                self._unread(peer),
            )
        assert peer.closed is not None
        code, reason = peer.closed
        if isinstance(expected, dict):
            differences = match(expected, {"code": code, "reason": reason})
        else:
            differences = match(expected, code, "$.code")
        if differences:
            raise StepFailed(
                f"{peer.name}'s connection was closed with code {code}" + (f" ({reason})" if reason else ""),
                _differences(differences),
            )

    def _save(self, turn: _Turn) -> None:
        if turn.action.save:
            assert turn.matched is not None
            self._save_from(turn.action.save, turn.matched, "frame")

    def _save_from(self, save: dict[str, str], matched: Any, what: str) -> None:
        for name, path in save.items():
            parts = parse_path(path)
            assert parts is not None
            try:
                self.variables[name] = lookup(matched, parts)
            except KeyError:
                raise StepFailed(f"save.{name}: the {what} has no {path}", [f"  {what}:", *_pretty(matched)]) from None

    # An HTTP API call: `- api: {method, path, query, body, key}` with `expect: {status, body, headers}`.

    async def _api(self, step: Step) -> None:
        assert step.api is not None and self.api is not None
        call = step.api
        method = call.method.upper()
        encoded = {name: quote(_query_value(value), safe="") for name, value in self.variables.items()}
        request: Frame = {"method": method, "path": substitute(call.path, encoded)}
        if call.query:
            request["query"] = {
                name: _query_value(value) for name, value in substitute(call.query, self.variables).items()
            }
        if call.body is not msgspec.UNSET:
            request["body"] = substitute(call.body, self.variables)
        key = substitute(call.key, self.variables) if call.key is not None else self.api.key
        reply = await self._api_call(request, key, call.timeout or self.default_timeout)
        shown = {name: reply[name] for name in ("status", "body")}
        sent = ["  api sent:", *_pretty(request)]
        if call.expect is msgspec.UNSET:
            if not 200 <= reply["status"] < 300:
                raise StepFailed(
                    f"api {method} {request['path']} answered {reply['status']}", sent + ["  got:", *_pretty(shown)]
                )
        else:
            expect = substitute(call.expect, self.variables)
            differences = match(expect, reply)
            if differences:
                if "headers" in expect:
                    shown = reply
                raise StepFailed(
                    f"api {method} {request['path']} got a reply that does not match",
                    sent + _mismatch("a reply", expect, shown, differences),
                )
        if call.save:
            self._save_from(call.save, reply, "reply")

    async def _api_call(self, request: Frame, key: str | None, timeout: float) -> Frame:
        """{status, body, headers} of one HTTP call (body: the JSON, else the text; header names in lower case)."""
        assert self.api is not None
        if self._http is None:
            self._http = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = None
        if "body" in request:
            data = json.dumps(request["body"], ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        url = URL(self.api.url.rstrip("/") + request["path"], encoded=True)  # the path is percent-encoded already
        self.record("api", "send", request)
        try:
            async with self._http.request(
                request["method"],
                url,
                params=request.get("query"),
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                content = await response.read()
                status, reply_headers = (
                    response.status,
                    {name.lower(): value for name, value in response.headers.items()},
                )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise StepFailed(
                f"api {request['method']} {self.api.url}{request['path']} failed: {error or type(error).__name__}",
                ["  api sent:", *_pretty(request)],
            ) from None
        body: Any
        try:
            body = json.loads(content) if content else None
        except ValueError:
            body = content.decode(errors="replace")
        self.record("api", "recv", {"status": status, "body": body})
        return {"status": status, "body": body, "headers": reply_headers}

    async def _take(self, peer: Peer, wanted: Callable[[Frame], bool], timeout: float, what: str, shape: Any) -> Frame:
        frame = await peer.take(wanted, timeout)
        if frame is not None:
            return frame
        what += ":" if what.endswith(" matching") else ", matching:"
        raise StepFailed(
            f"timed out after {timeout:g} s waiting for {peer.name} to receive {what}",
            _pretty(shape) + self._unread(peer, shape),
        )

    @staticmethod
    def _sent(peer: Peer, sent: Frame | None) -> list[str]:
        return [f"  {peer.name} sent:", *_pretty(sent)] if sent is not None else []

    @staticmethod
    def _unread(peer: Peer, shape: Any = None) -> list[str]:
        if not peer.inbox:
            return [f"  {peer.name} has no unread frames (frames taken by earlier steps are not shown)"]
        lines = [f"  {peer.name} received these frames that no step has taken yet (oldest first):"]
        wanted_type = shape.get("type") if isinstance(shape, dict) and isinstance(shape.get("type"), str) else None
        for frame in peer.inbox[-20:]:
            lines.append("    " + render(frame, 300))
            if wanted_type is not None and frame.get("type") == wanted_type:
                lines += ["      differs at " + line for line in match(shape, frame)]
        if len(peer.inbox) > 20:
            lines.insert(1, f"    ({len(peer.inbox) - 20} older frames not shown)")
        return lines


# ---------------------------------------------------------------------------
# The command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sectionchat script",
        description="Run scripted WebSocket clients against a sectionchat server (format: docs/harness.md).",
        epilog="Exit codes: 0 all scenarios passed, 1 a step failed, 2 bad command line or scenario file.",
    )
    parser.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario YAML file(s), run in order")
    parser.add_argument(
        "--url",
        default=os.environ.get("SECTIONCHAT_URL", DEFAULT_URL),
        help=f"the server's WebSocket URL (default: $SECTIONCHAT_URL or {DEFAULT_URL}); ws://HOST:PORT means ws://HOST:PORT/ws",
    )
    parser.add_argument(
        "--api-url",
        default=os.environ.get("SECTIONCHAT_API_URL"),
        metavar="URL",
        help="the HTTP API's base URL for `api` steps, e.g. http://127.0.0.1:8766 (default: $SECTIONCHAT_API_URL, else the scenario's api.url)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SECTIONCHAT_API_KEY"),
        metavar="KEY",
        help="the API key `api` steps send (default: $SECTIONCHAT_API_KEY, else the scenario's api.key)",
    )
    parser.add_argument(
        "--record", metavar="FILE", help="write a JSON-lines transcript of every frame sent and received"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help=f"default seconds a step waits (default: the scenario's `timeout`, else {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="predefine ${NAME} (VALUE is read as a YAML scalar: 3 is a number); repeatable",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print each step as it passes")
    return parser


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _report(scenario: Scenario, failure: StepFailed, started: float) -> list[str]:
    step: Step | None = getattr(failure, "step", None)
    elapsed = time.monotonic() - started
    lines = []
    if step is None:
        lines.append(f"FAIL {scenario.path} ({scenario.name}): {failure.summary}")
    else:
        lines.append(
            f"FAIL {scenario.path} ({scenario.name}): step {step.index} of {len(scenario.steps)}, line {step.line}"
        )
        width = len(str(step.line + len(step.source)))
        lines += [f"  {number:>{width}} | {text}" for number, text in enumerate(step.source, step.line)]
        lines.append(f"  {failure.summary}")
    lines += failure.details
    lines.append(f"  ({elapsed:.2f} s into the scenario)")
    return lines


async def _run_all(
    scenarios: list[Scenario], args: argparse.Namespace, variables: dict[str, Any], record: Recorder
) -> int:
    url = normalize_url(args.url)
    failed = 0
    for scenario in scenarios:
        record.scenario = scenario.name
        runner = Runner(
            scenario, url, args.timeout, variables, record, verbose=args.verbose, api=_api_target(scenario, args)
        )
        started = time.monotonic()
        if args.verbose:
            print(
                f"RUN  {scenario.path} ({scenario.name}) against {url}, run_id {runner.variables['run_id']}", flush=True
            )
        try:
            await runner.run()
        except StepFailed as failure:
            failed += 1
            print("\n".join(_report(scenario, failure, started)), flush=True)
            continue
        print(
            f"PASS {scenario.path} ({scenario.name}): {_count(len(scenario.steps), 'step')}, "
            f"{_count(len(scenario.clients), 'client')}, {time.monotonic() - started:.2f} s",
            flush=True,
        )
    if len(scenarios) > 1:
        print(f"{len(scenarios) - failed} of {len(scenarios)} scenarios passed", flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def _api_target(scenario: Scenario, args: argparse.Namespace) -> ApiTarget | None:
    """Where this scenario's `api` steps go: the command line (or environment) first, then its `api` section."""
    spec = scenario.api
    url = args.api_url or (spec.url if spec is not None else None)
    key = args.api_key or (spec.key if spec is not None else None)
    return ApiTarget(url, key) if url else None


def _check_api_targets(scenarios: list[Scenario], args: argparse.Namespace) -> bool:
    """Every scenario with `api` steps has an http(s) URL to send them to (else a message, and False)."""
    fine = True
    for scenario in scenarios:
        target = _api_target(scenario, args)
        if not scenario.uses_api:
            continue
        if target is None:
            print(
                f"sectionchat script: {scenario.path} has api steps: give --api-url (or $SECTIONCHAT_API_URL, "
                "or api.url in the file)",
                file=sys.stderr,
            )
            fine = False
        elif urlsplit(target.url).scheme not in ("http", "https") or not urlsplit(target.url).netloc:
            print(f"sectionchat script: --api-url: not an http:// URL: {target.url!r}", file=sys.stderr)
            fine = False
    return fine


def main(argv: list[str]) -> int:
    """`sectionchat script ARGV…`: returns the exit code (0 passed, 1 failed, 2 bad usage or file)."""
    try:
        return asyncio.run(amain(argv))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output left (`| head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


async def amain(argv: list[str]) -> int:
    """`main` for callers already inside an event loop (e.g. an async test)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    try:
        normalize_url(args.url)
    except ValueError as error:
        print(f"sectionchat script: --url: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout is not None and not (args.timeout > 0 and math.isfinite(args.timeout)):
        print("sectionchat script: --timeout must be a positive number of seconds", file=sys.stderr)
        return EXIT_USAGE
    variables = _variables(args.var)
    if variables is None:
        return EXIT_USAGE
    scenarios = _load_all(args.scenarios, set(variables))
    if scenarios is None or not _check_api_targets(scenarios, args):
        return EXIT_USAGE
    stream = None
    if args.record:
        try:
            stream = open(args.record, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as error:
            print(f"sectionchat script: --record {args.record}: {error.strerror or error}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return await _run_all(scenarios, args, variables, Recorder(stream))
    finally:
        if stream is not None:
            stream.close()


def _variables(items: list[str]) -> dict[str, Any] | None:
    """The `--var NAME=VALUE` options; None (and a message) when one is not."""
    variables: dict[str, Any] = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not NAME.fullmatch(name):
            print(f"sectionchat script: --var {item!r}: write NAME=VALUE", file=sys.stderr)
            return None
        try:
            variables[name] = yaml_scalar(value) if value else ""
        except yaml.YAMLError:
            variables[name] = value
    return variables


def _load_all(paths: list[str], predefined: set[str]) -> list[Scenario] | None:
    """Every scenario file; None (and every problem in every file) when one is not valid."""
    scenarios, problems = [], []
    for path in paths:
        try:
            scenarios.append(load_scenario(path, predefined))
        except ScenarioError as error:
            problems += error.problems
    if not problems:
        return scenarios
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"sectionchat script: {len(problems)} problem(s) in the scenario file(s); nothing was run", file=sys.stderr)
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
