"""Scenario files for `sectionchat script`: the schema, loading and checking, with the line of every problem.

    scenario = load_scenario("examples/chat.yaml")   # or ScenarioError(problems)

A scenario names some clients (ClientSpec) and lists steps (Step): a sleep, a
client command (connect, disconnect, reconnect) or a client's Action. Loading
reads the YAML (1.2 booleans, no timestamps), converts it to the msgspec
Structs and checks everything that can be checked before running: unknown
keys, expected shapes, `${name}` references to values no earlier step saves,
steps of clients that are not connected at that point. Every problem is a
`file:line: where: what` string. Matching is client/matching.py, running
client/script.py; the format is documented in docs/harness.md.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import yaml

from client.matching import (
    ABSENT,
    ANY,
    NAME,
    OPERATORS,
    TYPE_NAMES,
    is_matcher_key,
    is_number,
    join_path,
    parse_path,
    references,
    render,
)
from protocol.codec import SUBPROTOCOLS

__all__ = [
    "ACTION_KEYS",
    "API_KEYS",
    "ApiCall",
    "ApiSpec",
    "CLIENT_COMMANDS",
    "Action",
    "ClientSpec",
    "Scenario",
    "ScenarioError",
    "ScenarioSpec",
    "Step",
    "load_scenario",
    "yaml_scalar",
]

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


def yaml_scalar(text: str) -> Any:
    """`text` read as the scenario files read it (`3` is a number, `no` a string)."""
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


class ApiSpec(msgspec.Struct, forbid_unknown_fields=True):
    """`api: {url, key}`: the HTTP API that `api` steps call (--api-url and --api-key win over these)."""

    url: str | None = None  # e.g. http://127.0.0.1:8766
    key: str | None = None


class ScenarioSpec(msgspec.Struct, forbid_unknown_fields=True):
    clients: dict[str, Any]  # name -> ClientSpec, checked one by one to name the client in errors
    steps: list[Any]
    name: str | None = None
    description: str | None = None
    timeout: PositiveSeconds | None = None
    api: ApiSpec | None = None


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


class ApiCall(msgspec.Struct, forbid_unknown_fields=True):
    """`- api: {method, path, ...}`: one HTTP API call, its expected `{status, body}` and what to save of it."""

    method: str
    path: str  # starts with /api/; a ${NAME} in it is percent-encoded
    query: dict[str, Any] | None = None
    body: Any = msgspec.UNSET
    key: str | None = None  # this call's API key instead of the run's (e.g. a wrong one, for 401)
    expect: Any = msgspec.UNSET  # a shape of {status, body, headers}; without it, any 2xx passes
    save: dict[str, str] | None = None  # paths in {status, body, headers}
    timeout: PositiveSeconds | None = None


ACTION_KEYS = [f.encode_name for f in msgspec.structs.fields(Action)]
API_KEYS = [f.encode_name for f in msgspec.structs.fields(ApiCall)]
M = TypeVar("M", bound=msgspec.Struct)
API_METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")
CLIENT_COMMANDS = ("connect", "disconnect", "reconnect")
RESERVED_NAMES = {"sleep", "api", *ACTION_KEYS}


@dataclass
class Step:
    index: int  # 1-based
    line: int
    source: list[str]  # the step's lines in the file, for reports
    kind: str  # "sleep" | "command" | "action" | "api"
    client: str | None = None
    seconds: float = 0.0
    command: str | None = None
    action: Action | None = None
    api: ApiCall | None = None


@dataclass
class Scenario:
    path: str
    name: str
    timeout: float | None
    clients: dict[str, ClientSpec]
    steps: list[Step]
    lines: list[str] = field(repr=False, default_factory=list)
    api: ApiSpec | None = None

    @property
    def uses_api(self) -> bool:
        return any(step.kind == "api" for step in self.steps)


class ScenarioError(Exception):
    """The scenario file is not valid; `problems` are `file:line: where: what` strings."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------
# Checking expected shapes and generated frames.


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
    dollar = [key for key in shape if is_matcher_key(key)]
    if dollar and len(dollar) != len(shape):
        problems.append(
            f"{where}: a mapping holds either fields or $ matchers, not both ({', '.join(map(str, shape))})"
        )
    elif dollar:
        for operator, argument in shape.items():
            _check_operator(operator, argument, where, problems)
    else:
        for key, sub in shape.items():
            _check_shape(sub, join_path(where, key), problems, in_object=True)


def _check_operator(operator: str, argument: Any, where: str, problems: list[str]) -> None:
    check = _OPERATOR_CHECKS.get(operator)
    if check is None:
        hint = difflib.get_close_matches(operator, OPERATORS, 1)
        known = f"did you mean {hint[0]}?" if hint else "known: " + ", ".join(OPERATORS)
        problems.append(f"{where}: unknown matcher {operator} ({known})")
    else:
        check(argument, f"{where}.{operator}", problems)


# The argument of each `$` operator; each takes (argument, where, problems).


def _check_regex(argument: Any, at: str, problems: list[str]) -> None:
    if not isinstance(argument, str):
        problems.append(f"{at}: needs a string")
    elif "${" not in argument:
        try:
            re.compile(argument)
        except re.error as error:
            problems.append(f"{at}: not a regular expression: {error}")


def _check_type(argument: Any, at: str, problems: list[str]) -> None:
    names = [argument] if isinstance(argument, str) else argument
    if not isinstance(names, list) or not names or any(name not in TYPE_NAMES for name in names):
        problems.append(f"{at}: one of {', '.join(TYPE_NAMES)} (or a list of them), not {render(argument)}")


def _check_len(argument: Any, at: str, problems: list[str]) -> None:
    if not isinstance(argument, int) or isinstance(argument, bool) or argument < 0:
        problems.append(f"{at}: needs a whole number >= 0")


def _check_contains(argument: Any, at: str, problems: list[str]) -> None:
    if isinstance(argument, list):
        _check_shape(argument, at, problems)
    elif not isinstance(argument, str):
        problems.append(f"{at}: needs a list of shapes (for arrays) or a string (for strings)")


def _check_number(argument: Any, at: str, problems: list[str]) -> None:
    if not is_number(argument) and not (isinstance(argument, str) and argument.startswith("${")):
        problems.append(f"{at}: needs a number")


_OPERATOR_CHECKS = {
    "$regex": _check_regex,
    "$type": _check_type,
    "$len": _check_len,
    "$contains": _check_contains,
    **{comparison: _check_number for comparison in ("$gt", "$gte", "$lt", "$lte")},
}
assert set(_OPERATOR_CHECKS) == set(OPERATORS), "every matcher has its check"


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
            _check_generators(sub, join_path(where, key), problems)
    elif isinstance(frame, list):
        for index, sub in enumerate(frame):
            _check_generators(sub, join_path(where, index), problems)


# ---------------------------------------------------------------------------
# Where things are in the file.


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


def _at(path: str, node: yaml.Node | None) -> str:
    return f"{path}:{node.start_mark.line + 1}" if node is not None else path


# ---------------------------------------------------------------------------
# Loading a scenario file.


def load_scenario(path: str, predefined: set[str] = frozenset()) -> Scenario:  # type: ignore[assignment]
    """Read and check a scenario file; raise ScenarioError listing every problem with its line."""
    root, data, lines = _read_yaml(path)
    spec = _convert(data, root, path)
    problems: list[str] = []
    clients_node = _node_child(root, "clients")
    steps_node = _node_child(root, "steps")
    clients = {
        name: _check_client(name, raw, _at(path, _node_child(clients_node, name)), problems)
        for name, raw in spec.clients.items()
    }
    if not clients:
        problems.append(f"{_at(path, clients_node)}: clients: name at least one client, e.g. `alice: {{name: alice}}`")
    if not spec.steps:
        problems.append(f"{_at(path, steps_node)}: steps: list at least one step")
    flow = _Flow(clients, {"run_id", *predefined}, problems)
    steps: list[Step] = []
    for position, raw in enumerate(spec.steps):
        node = _node_child(steps_node, position)
        where = f"{_at(path, node)}: step {position + 1}"
        step = _parse_step(raw, position + 1, where, clients, problems)
        if step is None:
            continue
        step.line = node.start_mark.line + 1 if node is not None else 0
        step.source = _source_lines(node, lines) if node is not None else []
        steps.append(step)
        flow.follow(step, where)
    if problems:
        raise ScenarioError(problems)
    return Scenario(
        path=path,
        name=spec.name or Path(path).stem,
        timeout=spec.timeout,
        clients=clients,
        steps=steps,
        lines=lines,
        api=spec.api,
    )


def _read_yaml(path: str) -> tuple[yaml.Node | None, dict[Any, Any], list[str]]:
    """The file's root node (for lines), its data and its lines."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ScenarioError([f"{path}: cannot read: {error.strerror or error}"]) from None
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
    return root, data, text.splitlines()


def _convert(data: dict[Any, Any], root: yaml.Node | None, path: str) -> ScenarioSpec:
    try:
        return msgspec.convert(data, ScenarioSpec)
    except msgspec.ValidationError as error:
        where, message = _validation_problem(error)
        node = root
        for part in re.findall(r"[^.\[\]]+", where):
            child = _node_child(node, int(part) if part.isdigit() else part)
            if child is None:
                break
            node = child
        raise ScenarioError([f"{_at(path, node)}: {where or 'scenario'}: {message}"]) from None


def _check_client(name: str, raw: Any, at: str, problems: list[str]) -> ClientSpec:
    """The client `name` (a default one if it is not valid, so that its steps are still checked)."""
    try:
        client = msgspec.convert(raw, ClientSpec | None)
    except msgspec.ValidationError as error:
        field_name, message = _validation_problem(error)
        problems.append(f"{at}: clients.{name}{'.' + field_name if field_name else ''}: {message}")
        client = None
    if name in RESERVED_NAMES:
        problems.append(f"{at}: clients.{name}: `{name}` is a step keyword; name the client otherwise")
    elif not NAME.fullmatch(name):
        problems.append(f"{at}: clients.{name}: a client name is letters, digits and _ (not starting with a digit)")
    client = client or ClientSpec()
    if client.subprotocol not in (None, *SUBPROTOCOLS):
        problems.append(f"{at}: clients.{name}.subprotocol: {' or '.join(SUBPROTOCOLS)}")
    return client


class _Flow:
    """What the steps so far leave behind: which clients are connected, which variables are saved."""

    def __init__(self, clients: dict[str, ClientSpec], known: set[str], problems: list[str]):
        self.connected = {name: client.connect for name, client in clients.items()}
        self.known = known
        self.problems = problems

    def follow(self, step: Step, where: str) -> None:
        if step.kind == "command":
            self._command(step, where)
        elif step.kind == "action":
            self._action(step, where)
        elif step.kind == "api":
            assert step.api is not None
            call = step.api
            self._known([call.path, call.query, call.body, call.key, call.expect], where)
            self.known.update(call.save or {})

    def _known(self, used: list[Any], where: str) -> None:
        for name in references(used):
            if name not in self.known:
                hint = difflib.get_close_matches(name, sorted(self.known), 1)
                self.problems.append(
                    f"{where}: ${{{name}}} is not saved by any earlier step"
                    + (f" (did you mean ${{{hint[0]}}}?)" if hint else "")
                )

    def _command(self, step: Step, where: str) -> None:
        assert step.client is not None
        if step.command == "connect" and self.connected[step.client]:
            self.problems.append(f"{where}: {step.client} is already connected here (use reconnect)")
        if step.command == "disconnect" and not self.connected[step.client]:
            self.problems.append(f"{where}: {step.client} is not connected here")
        self.connected[step.client] = step.command != "disconnect"

    def _action(self, step: Step, where: str) -> None:
        assert step.client is not None and step.action is not None
        if not self.connected[step.client]:
            self.problems.append(
                f"{where}: {step.client} is not connected here (add a `{step.client}: connect` or `reconnect` step)"
            )
        action = step.action
        used = [
            action.send,
            action.send_raw,
            action.expect,
            action.expect_reply,
            action.expect_event,
            action.expect_no_event,
            action.expect_welcome,
            action.expect_close,
        ]
        self._known(used, where)
        self.known.update(action.save or {})
        if action.expect_close is not msgspec.UNSET:
            self.connected[step.client] = False


# ---------------------------------------------------------------------------
# Parsing one step.


def _parse_step(raw: Any, index: int, where: str, clients: dict[str, ClientSpec], problems: list[str]) -> Step | None:
    if not isinstance(raw, dict) or not raw:
        problems.append(
            f"{where}: a step is a mapping such as `- alice: {{send: {{type: ping}}, expect: {{type: pong}}}}` or `- sleep: 0.1`"
        )
        return None
    if "sleep" in raw:
        return _parse_sleep(raw, index, where, problems)
    if "api" in raw and "api" not in clients:
        return _parse_api(raw, index, where, problems)
    client = _step_client(raw, where, clients, problems)
    if client is None:
        return None
    value = raw[client]
    extra = {key: sub for key, sub in raw.items() if key != client}
    if isinstance(value, str):
        return _parse_command(client, value, extra, index, where, problems)
    if not isinstance(value, dict):
        problems.append(
            f"{where}: {client}: give a mapping of actions ({', '.join(ACTION_KEYS)}) or one of {', '.join(CLIENT_COMMANDS)}"
        )
        return None
    action = _parse_action(client, value, extra, where, problems)
    return Step(index, 0, [], "action", client=client, action=action) if action is not None else None


def _parse_sleep(raw: dict[Any, Any], index: int, where: str, problems: list[str]) -> Step | None:
    seconds = raw["sleep"]
    if len(raw) != 1:
        problems.append(f"{where}: a sleep step has nothing else (found {', '.join(map(str, raw))})")
    elif not is_number(seconds) or seconds < 0 or not math.isfinite(seconds):
        problems.append(f"{where}: sleep: a number of seconds >= 0")
    else:
        return Step(index, 0, [], "sleep", seconds=float(seconds))
    return None


def _step_client(raw: dict[Any, Any], where: str, clients: dict[str, ClientSpec], problems: list[str]) -> str | None:
    """The one client that a step names."""
    named = [key for key in raw if key in clients]
    if len(named) == 1:
        return named[0]
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


def _parse_api(raw: dict[Any, Any], index: int, where: str, problems: list[str]) -> Step | None:
    """`- api: {method, path, ...}` with the keys beside it (`expect`, `save`, `timeout`)."""
    value = raw["api"]
    if not isinstance(value, dict):
        problems.append(f"{where}: api: give a mapping such as `{{method: GET, path: /api/v1/sessions/ID}}`")
        return None
    extra = {key: sub for key, sub in raw.items() if key != "api"}
    call = _merged(ApiCall, "api", value, extra, API_KEYS, " of an api step", where, problems)
    if call is None:
        return None
    before = len(problems)
    _check_api(call, where, problems)
    return Step(index, 0, [], "api", api=call) if len(problems) == before else None


def _check_api(call: ApiCall, where: str, problems: list[str]) -> None:
    if call.method.upper() not in API_METHODS:
        problems.append(f"{where}: api.method: one of {', '.join(API_METHODS)}, not {call.method!r}")
    if not call.path.startswith("/"):
        problems.append(f"{where}: api.path: a path that starts with /, e.g. /api/v1/sessions")
    for name, value in (call.query or {}).items():
        if isinstance(value, dict | list):
            problems.append(f"{where}: api.query.{name}: a query parameter is a string, number or boolean")
    if call.body is not _UNSET:
        _check_generators(call.body, f"{where}: api.body", problems)
    if call.expect is not _UNSET:
        if not isinstance(call.expect, dict):
            problems.append(f"{where}: api.expect: a shape of {{status, body, headers}}, e.g. {{status: 201}}")
        else:
            for key in call.expect:
                if key not in ("status", "body", "headers"):
                    problems.append(f"{where}: api.expect.{key}: an api step's reply has status, body and headers")
            _check_shape(call.expect, f"{where}: api.expect", problems)
    for name, path in (call.save or {}).items():
        if not NAME.fullmatch(name) or name == "run_id":
            problems.append(f"{where}: save.{name}: a variable name is letters, digits and _ (and not run_id)")
        if parse_path(path) is None:
            problems.append(f"{where}: save.{name}: {path!r} is not a path like body.session.session_id")


def _parse_command(
    client: str, value: str, extra: dict[Any, Any], index: int, where: str, problems: list[str]
) -> Step | None:
    if value not in CLIENT_COMMANDS:
        problems.append(
            f"{where}: {client}: {value!r} is not one of {', '.join(CLIENT_COMMANDS)} (or a mapping of actions)"
        )
        return None
    if extra:
        problems.append(f"{where}: `{client}: {value}` takes nothing else (found {', '.join(map(str, extra))})")
        return None
    return Step(index, 0, [], "command", client=client, command=value)


def _merged(
    kind: type[M],
    name: str,
    value: dict[Any, Any],
    extra: dict[Any, Any],
    known: Sequence[str],
    what: str,
    where: str,
    problems: list[str],
) -> M | None:
    """`- name: {...}` and the keys beside it as one `kind`; None (and the problems said) if they are not one."""
    merged = dict(value)
    for key, sub in extra.items():
        if key in merged:
            problems.append(f"{where}: `{key}` is given twice (inside and beside {name}: ...)")
            return None
        merged[key] = sub
    unknown = [str(key) for key in merged if key not in known]
    for key in unknown:
        hint = difflib.get_close_matches(key, known, 1)
        problems.append(
            f"{where}: unknown key `{key}`{what}"
            + (f" (did you mean `{hint[0]}`?)" if hint else f"; known: {', '.join(known)}")
        )
    if unknown:
        return None
    try:
        return msgspec.convert(merged, kind)
    except msgspec.ValidationError as error:
        field_name, message = _validation_problem(error)
        problems.append(f"{where}: {name}.{field_name}: {message}" if field_name else f"{where}: {name}: {message}")
        return None


def _parse_action(
    client: str, value: dict[Any, Any], extra: dict[Any, Any], where: str, problems: list[str]
) -> Action | None:
    """The action of `- client: {...}` with the keys beside it (`- client: {...}, save: ...`)."""
    action = _merged(Action, client, value, extra, ACTION_KEYS, "", where, problems)
    if action is None:
        return None
    before = len(problems)
    _check_action(client, action, where, problems)
    return action if len(problems) == before else None


_UNSET = msgspec.UNSET


def _check_action(client: str, action: Action, where: str, problems: list[str]) -> None:
    if action.send is not None and action.send_raw is not None:
        problems.append(f"{where}: send or send_raw, not both")
    if action.send is not None:
        _check_generators(action.send, f"{where}: send", problems)
    if action.expect is not _UNSET:
        _check_expect(action, where, problems)
    for key in ("expect_reply", "expect_event", "expect_no_event", "expect_welcome"):
        shape = getattr(action, key)
        if shape is not _UNSET:
            _check_shape(shape, f"{where}: {key}", problems)
    if action.for_ is not None and action.expect_no_event is _UNSET:
        problems.append(f"{where}: `for` is how long expect_no_event watches; this step has none")
    _check_close(action.expect_close, where, problems)
    if action.save:
        _check_save(action, action.save, where, problems)
    if not _does_something(action):
        problems.append(
            f"{where}: {client} does nothing: give send, send_raw, expect_reply, expect_event, expect_no_event, expect_close or expect_welcome"
        )


def _check_expect(action: Action, where: str, problems: list[str]) -> None:
    if action.send is None and action.send_raw is None:
        problems.append(f"{where}: `expect` checks the reply to this step's request: add `send` (or use expect_event)")
    elif action.send is not None and "id" in action.send and action.send["id"] is None:
        problems.append(f"{where}: a request without id gets a reply without reply_to: use expect_event, not expect")
    _check_shape(action.expect, f"{where}: expect", problems)


def _check_close(close: Any, where: str, problems: list[str]) -> None:
    if close is not _UNSET and not (
        (isinstance(close, int) and not isinstance(close, bool)) or close == ANY or isinstance(close, dict)
    ):
        problems.append(f'{where}: expect_close: a close code (1008), "$any", or a shape of {{code, reason}}')
    if isinstance(close, dict):
        _check_shape(close, f"{where}: expect_close", problems)


def _check_save(action: Action, save: dict[str, str], where: str, problems: list[str]) -> None:
    if all(
        shape is _UNSET for shape in (action.expect, action.expect_reply, action.expect_event, action.expect_welcome)
    ):
        problems.append(
            f"{where}: `save` reads the frame matched by expect, expect_reply, expect_event or expect_welcome; this step has none"
        )
    for name, path in save.items():
        if not NAME.fullmatch(name) or name == "run_id":
            problems.append(f"{where}: save.{name}: a variable name is letters, digits and _ (and not run_id)")
        if parse_path(path) is None:
            problems.append(
                f"{where}: save.{name}: {path!r} is not a path like session.session_id or sessions[0].title"
            )


def _does_something(action: Action) -> bool:
    return action.expect is not _UNSET or any(
        [
            action.send is not None,
            action.send_raw is not None,
            action.expect_event is not _UNSET,
            action.expect_reply is not _UNSET,
            action.expect_no_event is not _UNSET,
            action.expect_close is not _UNSET,
            action.expect_welcome is not _UNSET,
        ]
    )
