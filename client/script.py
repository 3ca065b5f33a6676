"""`sectionchat script`: scripted WebSocket clients against a sectionchat server.

    sectionchat script SCENARIO.yaml [SCENARIO.yaml ...] --url ws://127.0.0.1:8765/ws [--record FILE]

A scenario names some clients and lists steps: send a request and match its
reply, wait for an event of some shape, check that none comes, expect the server
to close the connection, disconnect, reconnect, sleep. Expectations are partial
matches with a few `$` matchers; values saved from frames feed later steps as
`${name}`. The format is documented in docs/harness.md.

Exit codes: 0 every scenario passed; 1 a step failed (mismatch, timeout, closed
connection, server unreachable); 2 bad command line or scenario file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import difflib
import json
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from protocol.codec import MSGPACK_SUBPROTOCOL, SUBPROTOCOLS

__all__ = ["main", "amain", "load_scenario", "match", "ScenarioError"]

Frame = dict[str, Any]

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_NO_EVENT_S = 0.5
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# ---------------------------------------------------------------------------
# YAML: YAML 1.2 booleans (only true/false) and no timestamps, so that `no`,
# `on` and `2026-11-25` stay the strings a JSON frame would carry.


class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml_scalar(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ---------------------------------------------------------------------------
# The scenario schema.

Seconds = Annotated[float, msgspec.Meta(ge=0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]


class ClientSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One named socket: `alice: {name: alice}`."""

    name: str | None = None  # the `name` query parameter (open mode); none: the server picks anon-…
    token: str | None = None  # a JWT for token mode, sent as the `token` query parameter
    subprotocol: str | None = None  # e.g. sectionchat.v1.msgpack
    connect: bool = True  # false: stays unconnected until a `connect` step


class ScenarioSpec(msgspec.Struct, forbid_unknown_fields=True):
    clients: dict[str, Any]  # name -> ClientSpec, checked one by one to name the client in errors
    steps: list[Any]
    name: str | None = None
    description: str | None = None
    timeout: PositiveSeconds | None = None


class Action(msgspec.Struct, forbid_unknown_fields=True):
    """What one client does in one step, in this order."""

    send: dict[str, Any] | None = None
    send_raw: str | None = None
    expect: Any = msgspec.UNSET
    expect_reply: Any = msgspec.UNSET
    expect_welcome: Any = msgspec.UNSET
    expect_event: Any = msgspec.UNSET
    expect_no_event: Any = msgspec.UNSET
    for_: Seconds | None = msgspec.field(default=None, name="for")
    expect_close: Any = msgspec.UNSET
    save: dict[str, str] | None = None
    timeout: PositiveSeconds | None = None


ACTION_KEYS = [f.encode_name for f in msgspec.structs.fields(Action)]
CLIENT_COMMANDS = ("connect", "disconnect", "reconnect")
RESERVED_NAMES = {"sleep", *ACTION_KEYS}


@dataclass
class Step:
    index: int  # 1-based
    line: int
    source: list[str]  # the step's lines in the file, for reports
    kind: str  # "sleep" | "command" | "action"
    client: str | None = None
    seconds: float = 0.0
    command: str | None = None
    action: Action | None = None


@dataclass
class Scenario:
    path: str
    name: str
    timeout: float | None
    clients: dict[str, ClientSpec]
    steps: list[Step]
    lines: list[str] = field(repr=False, default_factory=list)


class ScenarioError(Exception):
    """The scenario file is not valid; `problems` are `file:line: where: what` strings."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------
# Matching.

ANY = "$any"
ABSENT = "$absent"
TYPE_NAMES = ("string", "integer", "number", "boolean", "null", "object", "array")
OPERATORS = ("$regex", "$type", "$len", "$contains", "$gt", "$gte", "$lt", "$lte")


def _is_operator(shape: Any) -> bool:
    return (
        isinstance(shape, dict) and bool(shape) and all(isinstance(key, str) and key.startswith("$") for key in shape)
    )


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if _is_number(expected) and _is_number(actual):
        return expected == actual
    return type(expected) is type(actual) and expected == actual


def render(value: Any, limit: int = 200) -> str:
    """A value as compact JSON, shortened past `limit` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def match(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """The differences between a frame and an expected shape, one `path: what` line each ([] when it matches).

    Objects match partially (only the listed fields); lists element-wise with the
    same length; scalars by value (a boolean never equals a number). The string
    `"$any"` matches anything present and `"$absent"` requires a field to be
    missing; a mapping of `$` operators tests one value (see OPERATORS).
    """
    if isinstance(expected, str) and expected == ANY:
        return []
    if _is_operator(expected):
        return _match_operators(expected, actual, path)
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {render(actual)}"]
        problems: list[str] = []
        for key, sub in expected.items():
            where = _join(path, key)
            if isinstance(sub, str) and sub == ABSENT:
                if key in actual:
                    problems.append(f"{where}: expected no such field, got {render(actual[key])}")
            elif key not in actual:
                problems.append(f"{where}: missing, expected {render(sub)}")
            else:
                problems.extend(match(sub, actual[key], where))
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: expected an array, got {render(actual)}"]
        problems = []
        if len(expected) != len(actual):
            problems.append(f"{path}: expected {len(expected)} items, got {len(actual)}")
        for index, (sub, item) in enumerate(zip(expected, actual, strict=False)):
            problems.extend(match(sub, item, _join(path, index)))
        return problems
    if _equal(expected, actual):
        return []
    return [f"{path}: expected {render(expected)}, got {render(actual)}"]


def _match_operators(operators: dict[str, Any], actual: Any, path: str) -> list[str]:
    problems: list[str] = []
    for operator, argument in operators.items():
        if operator == "$regex":
            if not isinstance(actual, str):
                problems.append(f"{path}: expected a string matching /{argument}/, got {render(actual)}")
            elif re.search(argument, actual) is None:
                problems.append(f"{path}: expected a match for /{argument}/, got {render(actual)}")
        elif operator == "$type":
            names = [argument] if isinstance(argument, str) else list(argument)
            kind = _type_name(actual)
            if not (kind in names or (kind == "integer" and "number" in names)):
                problems.append(f"{path}: expected type {' or '.join(names)}, got {kind} {render(actual)}")
        elif operator == "$len":
            if not isinstance(actual, str | list | dict):
                problems.append(f"{path}: expected something of length {argument}, got {render(actual)}")
            elif len(actual) != argument:
                problems.append(f"{path}: expected length {argument}, got {len(actual)}: {render(actual)}")
        elif operator == "$contains":
            if isinstance(argument, str):
                if not isinstance(actual, str) or argument not in actual:
                    problems.append(f"{path}: expected a string containing {render(argument)}, got {render(actual)}")
            elif not isinstance(actual, list):
                problems.append(f"{path}: expected an array, got {render(actual)}")
            else:
                for item in argument:
                    if not any(not match(item, element) for element in actual):
                        problems.append(f"{path}: expected an item matching {render(item)}, got {render(actual)}")
        elif operator in ("$gt", "$gte", "$lt", "$lte"):
            holds = {
                "$gt": lambda a, b: a > b,
                "$gte": lambda a, b: a >= b,
                "$lt": lambda a, b: a < b,
                "$lte": lambda a, b: a <= b,
            }[operator]
            sign = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[operator]
            if not _is_number(actual) or not holds(actual, argument):
                problems.append(f"{path}: expected a number {sign} {render(argument)}, got {render(actual)}")
    return problems


def _check_shape(shape: Any, where: str, problems: list[str], in_object: bool = False) -> None:
    """Schema errors in an expected shape (unknown operators, bad regexes, misplaced $absent)."""
    if isinstance(shape, str):
        if shape == ABSENT and not in_object:
            problems.append(f'{where}: "$absent" only makes sense as the value of a field')
        return
    if isinstance(shape, list):
        for index, item in enumerate(shape):
            _check_shape(item, f"{where}[{index}]", problems)
        return
    if not isinstance(shape, dict):
        return
    dollar = [key for key in shape if isinstance(key, str) and key.startswith("$")]
    if dollar and len(dollar) != len(shape):
        problems.append(
            f"{where}: a mapping holds either fields or $ matchers, not both ({', '.join(map(str, shape))})"
        )
        return
    if not dollar:
        for key, sub in shape.items():
            _check_shape(sub, _join(where, key), problems, in_object=True)
        return
    for operator, argument in shape.items():
        at = f"{where}.{operator}"
        if operator not in OPERATORS:
            hint = difflib.get_close_matches(operator, OPERATORS, 1)
            known = f"did you mean {hint[0]}?" if hint else "known: " + ", ".join(OPERATORS)
            problems.append(f"{where}: unknown matcher {operator} ({known})")
        elif operator == "$regex":
            if not isinstance(argument, str):
                problems.append(f"{at}: needs a string")
            elif "${" not in argument:
                try:
                    re.compile(argument)
                except re.error as error:
                    problems.append(f"{at}: not a regular expression: {error}")
        elif operator == "$type":
            names = [argument] if isinstance(argument, str) else argument
            if not isinstance(names, list) or not names or any(name not in TYPE_NAMES for name in names):
                problems.append(f"{at}: one of {', '.join(TYPE_NAMES)} (or a list of them), not {render(argument)}")
        elif operator == "$len":
            if not isinstance(argument, int) or isinstance(argument, bool) or argument < 0:
                problems.append(f"{at}: needs a whole number >= 0")
        elif operator == "$contains":
            if isinstance(argument, list):
                _check_shape(argument, at, problems)
            elif not isinstance(argument, str):
                problems.append(f"{at}: needs a list of shapes (for arrays) or a string (for strings)")
        elif not _is_number(argument) and not (isinstance(argument, str) and argument.startswith("${")):
            problems.append(f"{at}: needs a number")


# ---------------------------------------------------------------------------
# Variables: `${name}` in any string of a frame or shape. A string that is
# exactly one `${name}` becomes the saved value itself (an int stays an int);
# `$${` is a literal `${`.

_VARIABLE = re.compile(r"\$(\$?)\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        for found in _VARIABLE.finditer(value):
            if not found.group(1):
                yield found.group(2)
    elif isinstance(value, dict):
        for sub in value.values():
            yield from _references(sub)
    elif isinstance(value, list):
        for sub in value:
            yield from _references(sub)


def substitute(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = _VARIABLE.fullmatch(value)
        if whole and not whole.group(1):
            return variables[whole.group(2)]

        def replace(found: re.Match[str]) -> str:
            if found.group(1):
                return "${" + found.group(2) + "}"
            saved = variables[found.group(2)]
            return saved if isinstance(saved, str) else json.dumps(saved)

        return _VARIABLE.sub(replace, value)
    if isinstance(value, dict):
        if set(value) == {"$repeat"}:
            text, count = substitute(value["$repeat"], variables)
            return str(text) * int(count)
        return {key: substitute(sub, variables) for key, sub in value.items()}
    if isinstance(value, list):
        return [substitute(sub, variables) for sub in value]
    return value


def _check_generators(frame: Any, where: str, problems: list[str]) -> None:
    if isinstance(frame, dict):
        if "$repeat" in frame:
            argument = frame["$repeat"]
            if len(frame) != 1 or not (
                isinstance(argument, list) and len(argument) == 2 and isinstance(argument[1], int | str)
            ):
                problems.append(f"{where}: write {{$repeat: [TEXT, COUNT]}}")
            return
        for key, sub in frame.items():
            _check_generators(sub, _join(where, key), problems)
    elif isinstance(frame, list):
        for index, sub in enumerate(frame):
            _check_generators(sub, _join(where, index), problems)


# Paths for `save`: `session.session_id`, `sessions[0].title`, `$.offset`, `sessions.0.title`.
_PATH_PART = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def parse_path(text: str) -> list[str | int] | None:
    text = text.strip()
    if text.startswith("$"):
        text = text[1:]
    parts: list[str | int] = []
    position = 0
    while position < len(text):
        found = _PATH_PART.match(text, position)
        if found is None or found.end() == position:
            return None
        name, index = found.groups()
        parts.append(int(index) if index is not None else (int(name) if name.isdigit() else name))
        position = found.end()
    return parts or None


def lookup(frame: Any, parts: list[str | int]) -> Any:
    value = frame
    for part in parts:
        if isinstance(value, list) and isinstance(part, int) and -len(value) <= part < len(value):
            value = value[part]
        elif isinstance(value, dict) and str(part) in value:
            value = value[str(part)]
        else:
            raise KeyError(part)
    return value


# ---------------------------------------------------------------------------
# Loading and checking a scenario file.


def _validation_problem(error: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.clients[...]`" as ("clients...", "expected int, got str")."""
    message, _, where = str(error).partition(" - at `$")
    where = where.rstrip("`").lstrip(".")
    message = message.replace("`", "")
    message = message[:1].lower() + message[1:]
    return where, message


def _node_child(node: yaml.Node | None, key: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == key:
                return value_node
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        return node.value[key]
    return None


def _content_end(node: yaml.Node) -> yaml.Mark:
    """Where a node's own text ends (a block collection's end mark is where the next item starts)."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
        return _content_end(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
        return _content_end(node.value[-1])
    return node.end_mark


def _source_lines(node: yaml.Node, lines: list[str]) -> list[str]:
    start = node.start_mark.line
    mark = _content_end(node)
    end = mark.line + (1 if mark.column else 0)
    chosen = lines[start : max(end, start + 1)]
    while len(chosen) > 1 and (not chosen[-1].strip() or chosen[-1].lstrip().startswith("#")):
        chosen.pop()
    return chosen


def load_scenario(path: str, predefined: set[str] = frozenset()) -> Scenario:  # type: ignore[assignment]
    """Read and check a scenario file; raise ScenarioError listing every problem with its line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ScenarioError([f"{path}: cannot read: {error.strerror or error}"]) from None
    lines = text.splitlines()
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ScenarioError([f"{where}: not valid YAML: {getattr(error, 'problem', None) or error}"]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ScenarioError([f"{path}: a scenario is a mapping with `clients` and `steps` (see docs/harness.md)"])

    def at(node: yaml.Node | None) -> str:
        return f"{path}:{node.start_mark.line + 1}" if node is not None else path

    try:
        spec = msgspec.convert(data, ScenarioSpec)
    except msgspec.ValidationError as error:
        where, message = _validation_problem(error)
        node: yaml.Node | None = root
        for part in re.findall(r"[^.\[\]]+", where):
            child = _node_child(node, int(part) if part.isdigit() else part)
            if child is None:
                break
            node = child
        raise ScenarioError([f"{at(node)}: {where or 'scenario'}: {message}"]) from None

    problems: list[str] = []
    clients_node = _node_child(root, "clients")
    steps_node = _node_child(root, "steps")
    clients: dict[str, ClientSpec] = {}
    for name, raw_client in spec.clients.items():
        node = _node_child(clients_node, name)
        try:
            client = msgspec.convert(raw_client, ClientSpec | None)
        except msgspec.ValidationError as error:
            field_name, message = _validation_problem(error)
            problems.append(f"{at(node)}: clients.{name}{'.' + field_name if field_name else ''}: {message}")
            client = None  # keep the name, so that its steps are still checked
        if name in RESERVED_NAMES:
            problems.append(f"{at(node)}: clients.{name}: `{name}` is a step keyword; name the client otherwise")
        elif not _NAME.fullmatch(name):
            problems.append(
                f"{at(node)}: clients.{name}: a client name is letters, digits and _ (not starting with a digit)"
            )
        client = client or ClientSpec()
        if client.subprotocol not in (None, *SUBPROTOCOLS):
            problems.append(f"{at(node)}: clients.{name}.subprotocol: {' or '.join(SUBPROTOCOLS)}")
        clients[name] = client
    if not clients:
        problems.append(f"{at(clients_node)}: clients: name at least one client, e.g. `alice: {{name: alice}}`")
    if not spec.steps:
        problems.append(f"{at(steps_node)}: steps: list at least one step")

    known = {"run_id", *predefined}
    connected = {name: client.connect for name, client in clients.items()}
    steps: list[Step] = []
    for position, raw in enumerate(spec.steps):
        node = _node_child(steps_node, position)
        where = f"{at(node)}: step {position + 1}"
        source = _source_lines(node, lines) if node is not None else []
        step = _parse_step(raw, position + 1, where, clients, problems)
        if step is None:
            continue
        step.line = node.start_mark.line + 1 if node is not None else 0
        step.source = source
        steps.append(step)
        # What a client can do depends on whether it is connected at that point.
        if step.kind == "command":
            assert step.client is not None
            if step.command == "connect" and connected[step.client]:
                problems.append(f"{where}: {step.client} is already connected here (use reconnect)")
            if step.command == "disconnect" and not connected[step.client]:
                problems.append(f"{where}: {step.client} is not connected here")
            connected[step.client] = step.command != "disconnect"
        elif step.kind == "action":
            assert step.client is not None and step.action is not None
            if not connected[step.client]:
                problems.append(
                    f"{where}: {step.client} is not connected here (add a `{step.client}: connect` or `reconnect` step)"
                )
            action = step.action
            for name in _references(
                [
                    action.send,
                    action.send_raw,
                    action.expect,
                    action.expect_reply,
                    action.expect_event,
                    action.expect_no_event,
                    action.expect_welcome,
                    action.expect_close,
                ]
            ):
                if name not in known:
                    hint = difflib.get_close_matches(name, sorted(known), 1)
                    problems.append(
                        f"{where}: ${{{name}}} is not saved by any earlier step"
                        + (f" (did you mean ${{{hint[0]}}}?)" if hint else "")
                    )
            known.update(action.save or {})
            if action.expect_close is not msgspec.UNSET:
                connected[step.client] = False
    if problems:
        raise ScenarioError(problems)
    return Scenario(
        path=path, name=spec.name or Path(path).stem, timeout=spec.timeout, clients=clients, steps=steps, lines=lines
    )


def _parse_step(raw: Any, index: int, where: str, clients: dict[str, ClientSpec], problems: list[str]) -> Step | None:
    if not isinstance(raw, dict) or not raw:
        problems.append(
            f"{where}: a step is a mapping such as `- alice: {{send: {{type: ping}}, expect: {{type: pong}}}}` or `- sleep: 0.1`"
        )
        return None
    if "sleep" in raw:
        seconds = raw["sleep"]
        if len(raw) != 1:
            problems.append(f"{where}: a sleep step has nothing else (found {', '.join(map(str, raw))})")
        elif not _is_number(seconds) or seconds < 0 or not math.isfinite(seconds):
            problems.append(f"{where}: sleep: a number of seconds >= 0")
        else:
            return Step(index, 0, [], "sleep", seconds=float(seconds))
        return None
    named = [key for key in raw if key in clients]
    if len(named) != 1:
        others = [str(key) for key in raw if key not in ACTION_KEYS]
        if named:
            problems.append(f"{where}: one client per step (this one names {', '.join(named)})")
        else:
            hint = difflib.get_close_matches(others[0], list(clients) + ["sleep"], 1) if others else []
            problems.append(
                f"{where}: names no client"
                + (f": unknown {', '.join(others)}" if others else "")
                + (f" (did you mean {hint[0]}?)" if hint else "")
                + f"; the clients are {', '.join(clients)}"
            )
        return None
    client = named[0]
    value = raw[client]
    extra = {key: sub for key, sub in raw.items() if key != client}
    if isinstance(value, str):
        if value not in CLIENT_COMMANDS:
            problems.append(
                f"{where}: {client}: {value!r} is not one of {', '.join(CLIENT_COMMANDS)} (or a mapping of actions)"
            )
            return None
        if extra:
            problems.append(f"{where}: `{client}: {value}` takes nothing else (found {', '.join(map(str, extra))})")
            return None
        return Step(index, 0, [], "command", client=client, command=value)
    if not isinstance(value, dict):
        problems.append(
            f"{where}: {client}: give a mapping of actions ({', '.join(ACTION_KEYS)}) or one of {', '.join(CLIENT_COMMANDS)}"
        )
        return None
    merged = dict(value)
    for key, sub in extra.items():
        if key in merged:
            problems.append(f"{where}: `{key}` is given twice (inside and beside {client}: ...)")
            return None
        merged[key] = sub
    unknown = [str(key) for key in merged if key not in ACTION_KEYS]
    if unknown:
        for key in unknown:
            hint = difflib.get_close_matches(key, ACTION_KEYS, 1)
            problems.append(
                f"{where}: unknown key `{key}`"
                + (f" (did you mean `{hint[0]}`?)" if hint else f"; known: {', '.join(ACTION_KEYS)}")
            )
        return None
    try:
        action = msgspec.convert(merged, Action)
    except msgspec.ValidationError as error:
        field_name, message = _validation_problem(error)
        problems.append(f"{where}: {client}.{field_name}: {message}" if field_name else f"{where}: {client}: {message}")
        return None
    before = len(problems)
    unset = msgspec.UNSET
    if action.send is not None and action.send_raw is not None:
        problems.append(f"{where}: send or send_raw, not both")
    if action.send is not None:
        _check_generators(action.send, f"{where}: send", problems)
    if action.expect is not unset:
        if action.send is None and action.send_raw is None:
            problems.append(
                f"{where}: `expect` checks the reply to this step's request: add `send` (or use expect_event)"
            )
        elif action.send is not None and "id" in action.send and action.send["id"] is None:
            problems.append(
                f"{where}: a request without id gets a reply without reply_to: use expect_event, not expect"
            )
        _check_shape(action.expect, f"{where}: expect", problems)
    for key in ("expect_reply", "expect_event", "expect_no_event", "expect_welcome"):
        shape = getattr(action, key)
        if shape is not unset:
            _check_shape(shape, f"{where}: {key}", problems)
    if action.for_ is not None and action.expect_no_event is unset:
        problems.append(f"{where}: `for` is how long expect_no_event watches; this step has none")
    close = action.expect_close
    if close is not unset and not (
        (isinstance(close, int) and not isinstance(close, bool)) or close == ANY or isinstance(close, dict)
    ):
        problems.append(f'{where}: expect_close: a close code (1008), "$any", or a shape of {{code, reason}}')
    if isinstance(close, dict):
        _check_shape(close, f"{where}: expect_close", problems)
    if action.save:
        if all(
            shape is unset for shape in (action.expect, action.expect_reply, action.expect_event, action.expect_welcome)
        ):
            problems.append(
                f"{where}: `save` reads the frame matched by expect, expect_reply, expect_event or expect_welcome; this step has none"
            )
        for name, path in action.save.items():
            if not _NAME.fullmatch(name) or name == "run_id":
                problems.append(f"{where}: save.{name}: a variable name is letters, digits and _ (and not run_id)")
            if parse_path(path) is None:
                problems.append(
                    f"{where}: save.{name}: {path!r} is not a path like session.session_id or sessions[0].title"
                )
    if action.expect is unset and not any(
        [
            action.send is not None,
            action.send_raw is not None,
            action.expect_event is not unset,
            action.expect_reply is not unset,
            action.expect_no_event is not unset,
            close is not unset,
            action.expect_welcome is not unset,
        ]
    ):
        problems.append(
            f"{where}: {client} does nothing: give send, send_raw, expect_reply, expect_event, expect_no_event, expect_close or expect_welcome"
        )
    if len(problems) != before:
        return None
    return Step(index, 0, [], "action", client=client, action=action)


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


class Runner:
    def __init__(
        self,
        scenario: Scenario,
        url: str,
        timeout: float | None,
        variables: dict[str, Any],
        record: Recorder,
        verbose: bool = False,
    ):
        self.scenario = scenario
        self.verbose = verbose
        self.default_timeout = timeout or scenario.timeout or DEFAULT_TIMEOUT_S
        self.variables = {"run_id": secrets.token_hex(4), **variables}
        self.record = record
        self.peers = {name: Peer(name, spec, url, record) for name, spec in scenario.clients.items()}
        self._ids = 0

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

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def _run_step(self, step: Step) -> None:
        if step.kind == "sleep":
            await asyncio.sleep(step.seconds)
            return
        assert step.client is not None
        peer = self.peers[step.client]
        if step.kind == "command":
            if step.command in ("disconnect", "reconnect"):
                await peer.close()
            if step.command in ("connect", "reconnect"):
                await peer.open(self.default_timeout)
            return
        action = step.action
        assert action is not None
        if not peer.connected:
            raise StepFailed(f"{peer.name} is not connected{peer._close_text()}", self._unread(peer))
        timeout = action.timeout or self.default_timeout
        unset = msgspec.UNSET
        matched: Frame | None = None
        sent: Frame | None = None
        request_id: Any = None
        try:
            if action.send is not None:
                request: Frame = substitute(action.send, self.variables)
                if "id" not in request:
                    request = (
                        {"type": request.pop("type"), "id": self._next_id(), **request}
                        if "type" in request
                        else {"id": self._next_id(), **request}
                    )
                elif request["id"] is None:
                    del request["id"]
                request_id = request.get("id")
                sent = request
                await peer.send(request)
            elif action.send_raw is not None:
                await peer.send_raw(substitute(action.send_raw, self.variables))

            if action.expect is not unset:
                shape = substitute(action.expect, self.variables)
                if sent is not None:
                    what = f"the reply to {sent.get('type', 'the request')} id {render(request_id)}"

                    def wanted(frame: Frame) -> bool:
                        return "reply_to" in frame and _same_id(frame["reply_to"], request_id)
                else:
                    what = "the reply to the raw frame (the next frame with reply_to, or an error)"

                    def wanted(frame: Frame) -> bool:
                        return "reply_to" in frame or frame.get("type") == "error"

                reply = await self._take(peer, wanted, timeout, what, shape)
                differences = match(shape, reply)
                if differences:
                    raise StepFailed(
                        f"{peer.name} got a reply that does not match",
                        self._sent(peer, sent)
                        + [
                            "  expected a reply matching:",
                            *_pretty(shape),
                            "  got:",
                            *_pretty(reply),
                            "  differences:",
                            *("    " + line for line in differences),
                        ],
                    )
                matched = reply

            if action.expect_reply is not unset:
                shape = substitute(action.expect_reply, self.variables)
                reply = await self._take(
                    peer,
                    lambda frame: "reply_to" in frame and not match(shape, frame),
                    timeout,
                    "a reply matching",
                    shape,
                )
                matched = matched or reply

            if action.expect_welcome is not unset:
                shape = substitute(action.expect_welcome, self.variables)
                differences = match(shape, peer.welcome)
                if differences:
                    raise StepFailed(
                        f"{peer.name}'s welcome does not match",
                        [
                            "  expected a welcome matching:",
                            *_pretty(shape),
                            "  got:",
                            *_pretty(peer.welcome),
                            "  differences:",
                            *("    " + line for line in differences),
                        ],
                    )
                matched = matched or peer.welcome

            if action.expect_event is not unset:
                shape = substitute(action.expect_event, self.variables)
                event = await self._take(
                    peer,
                    lambda frame: _is_event(frame) and not match(shape, frame),
                    timeout,
                    "an event matching",
                    shape,
                )
                matched = matched or event

            if action.expect_no_event is not unset:
                shape = substitute(action.expect_no_event, self.variables)
                duration = action.for_ if action.for_ is not None else DEFAULT_NO_EVENT_S
                unexpected: Frame | None
                try:
                    unexpected = await peer.take(lambda frame: _is_event(frame) and not match(shape, frame), duration)
                except _ClosedWhileWaiting:
                    unexpected = None  # a closed connection receives no event
                if unexpected is not None:
                    raise StepFailed(
                        f"{peer.name} got an event it should not have within {duration:g} s",
                        ["  expected no event matching:", *_pretty(shape), "  got:", *_pretty(unexpected)],
                    )

            if action.expect_close is not unset:
                expected = substitute(action.expect_close, self.variables)
                if not await peer.wait_closed(timeout):
                    raise StepFailed(
                        f"timed out after {timeout:g} s waiting for the server to close {peer.name}'s connection",
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
                        ["  differences:", *("    " + line for line in differences)],
                    )
        except _ClosedWhileWaiting as closed:
            raise StepFailed(
                f"{peer.name}'s connection was closed by the server{closed}",
                self._sent(peer, sent) + self._unread(peer),
            ) from None

        for name, path in (action.save or {}).items():
            assert matched is not None
            parts = parse_path(path)
            assert parts is not None
            try:
                self.variables[name] = lookup(matched, parts)
            except KeyError:
                raise StepFailed(f"save.{name}: the frame has no {path}", ["  frame:", *_pretty(matched)]) from None

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
        runner = Runner(scenario, url, args.timeout, variables, record, verbose=args.verbose)
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
    variables: dict[str, Any] = {}
    for item in args.var:
        name, equals, value = item.partition("=")
        if not equals or not _NAME.fullmatch(name):
            print(f"sectionchat script: --var {item!r}: write NAME=VALUE", file=sys.stderr)
            return EXIT_USAGE
        try:
            variables[name] = _yaml_scalar(value) if value else ""
        except yaml.YAMLError:
            variables[name] = value
    scenarios, problems = [], []
    for path in args.scenarios:
        try:
            scenarios.append(load_scenario(path, set(variables)))
        except ScenarioError as error:
            problems += error.problems
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(
            f"sectionchat script: {len(problems)} problem(s) in the scenario file(s); nothing was run", file=sys.stderr
        )
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
