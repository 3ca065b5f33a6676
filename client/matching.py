"""Matching for `sectionchat script`: frames against expected shapes, `${name}` variables, `save` paths.

    match({"type": "pong"}, {"type": "pong", "reply_to": 1})   # [] (it matches)

Objects match partially, lists element-wise, scalars by value; `"$any"`,
`"$absent"` and a mapping of `$` operators (OPERATORS) test one value.
`substitute` fills `${name}` into a frame or shape from saved values,
`references` lists the names a value uses, and `parse_path`/`lookup` read the
value a `save` names. No I/O; the scenario file is checked in client/scenario.py
and run in client/script.py. The format is documented in docs/harness.md.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "ABSENT",
    "ANY",
    "NAME",
    "OPERATORS",
    "TYPE_NAMES",
    "is_number",
    "join_path",
    "lookup",
    "match",
    "parse_path",
    "references",
    "render",
    "substitute",
]

ANY = "$any"
ABSENT = "$absent"
TYPE_NAMES = ("string", "integer", "number", "boolean", "null", "object", "array")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a client or variable name


def is_matcher_key(key: Any) -> bool:
    """`$regex` and the like; `${name}` is a field named by a saved value (a session id, say), not a matcher."""
    return isinstance(key, str) and key.startswith("$") and not key.startswith("${")


def _is_operator(shape: Any) -> bool:
    return isinstance(shape, dict) and bool(shape) and all(is_matcher_key(key) for key in shape)


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


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if is_number(expected) and is_number(actual):
        return expected == actual
    return type(expected) is type(actual) and expected == actual


def render(value: Any, limit: int = 200) -> str:
    """A value as compact JSON, shortened past `limit` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def join_path(path: str, key: Any) -> str:
    """`path` followed by a field name or an index, as the reports write it: `$.a`, `$[0]`, `$["a b"]`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if NAME.fullmatch(str(key)):
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
        return _match_object(expected, actual, path)
    if isinstance(expected, list):
        return _match_array(expected, actual, path)
    if _equal(expected, actual):
        return []
    return [f"{path}: expected {render(expected)}, got {render(actual)}"]


def _match_object(expected: dict[Any, Any], actual: Any, path: str) -> list[str]:
    if not isinstance(actual, dict):
        return [f"{path}: expected an object, got {render(actual)}"]
    problems: list[str] = []
    for key, sub in expected.items():
        where = join_path(path, key)
        if isinstance(sub, str) and sub == ABSENT:
            if key in actual:
                problems.append(f"{where}: expected no such field, got {render(actual[key])}")
        elif key not in actual:
            problems.append(f"{where}: missing, expected {render(sub)}")
        else:
            problems.extend(match(sub, actual[key], where))
    return problems


def _match_array(expected: list[Any], actual: Any, path: str) -> list[str]:
    if not isinstance(actual, list):
        return [f"{path}: expected an array, got {render(actual)}"]
    problems = []
    if len(expected) != len(actual):
        problems.append(f"{path}: expected {len(expected)} items, got {len(actual)}")
    for index, (sub, item) in enumerate(zip(expected, actual, strict=False)):
        problems.extend(match(sub, item, join_path(path, index)))
    return problems


# ---------------------------------------------------------------------------
# The `$` operators: each takes (argument, actual value, path) and returns its differences.


def _match_regex(argument: str, actual: Any, path: str) -> list[str]:
    if not isinstance(actual, str):
        return [f"{path}: expected a string matching /{argument}/, got {render(actual)}"]
    if re.search(argument, actual) is None:
        return [f"{path}: expected a match for /{argument}/, got {render(actual)}"]
    return []


def _match_type(argument: str | list[str], actual: Any, path: str) -> list[str]:
    names = [argument] if isinstance(argument, str) else list(argument)
    kind = _type_name(actual)
    if kind in names or (kind == "integer" and "number" in names):
        return []
    return [f"{path}: expected type {' or '.join(names)}, got {kind} {render(actual)}"]


def _match_len(argument: int, actual: Any, path: str) -> list[str]:
    if not isinstance(actual, str | list | dict):
        return [f"{path}: expected something of length {argument}, got {render(actual)}"]
    if len(actual) != argument:
        return [f"{path}: expected length {argument}, got {len(actual)}: {render(actual)}"]
    return []


def _match_contains(argument: str | list[Any], actual: Any, path: str) -> list[str]:
    if isinstance(argument, str):
        if not isinstance(actual, str) or argument not in actual:
            return [f"{path}: expected a string containing {render(argument)}, got {render(actual)}"]
        return []
    if not isinstance(actual, list):
        return [f"{path}: expected an array, got {render(actual)}"]
    return [
        f"{path}: expected an item matching {render(item)}, got {render(actual)}"
        for item in argument
        if not any(not match(item, element) for element in actual)
    ]


def _comparison(sign: str, holds: Callable[[Any, Any], bool]) -> Callable[[Any, Any, str], list[str]]:
    def compare(argument: Any, actual: Any, path: str) -> list[str]:
        if not is_number(actual) or not holds(actual, argument):
            return [f"{path}: expected a number {sign} {render(argument)}, got {render(actual)}"]
        return []

    return compare


_MATCHERS: dict[str, Callable[[Any, Any, str], list[str]]] = {
    "$regex": _match_regex,
    "$type": _match_type,
    "$len": _match_len,
    "$contains": _match_contains,
    "$gt": _comparison(">", operator.gt),
    "$gte": _comparison(">=", operator.ge),
    "$lt": _comparison("<", operator.lt),
    "$lte": _comparison("<=", operator.le),
}
OPERATORS = tuple(_MATCHERS)


def _match_operators(operators: dict[str, Any], actual: Any, path: str) -> list[str]:
    problems: list[str] = []
    for name, argument in operators.items():
        matcher = _MATCHERS.get(name)
        if matcher is not None:  # the loader reports unknown operators
            problems.extend(matcher(argument, actual, path))
    return problems


# ---------------------------------------------------------------------------
# Variables: `${name}` in any string of a frame or shape. A string that is
# exactly one `${name}` becomes the saved value itself (an int stays an int);
# `$${` is a literal `${`. `{$repeat: [TEXT, COUNT]}` is TEXT COUNT times.

_VARIABLE = re.compile(r"\$(\$?)\{([^}]*)\}")


def references(value: Any) -> Iterator[str]:
    """The names of the `${name}` variables that a frame or shape uses."""
    if isinstance(value, str):
        for found in _VARIABLE.finditer(value):
            if not found.group(1):
                yield found.group(2)
    elif isinstance(value, dict):
        for key, sub in value.items():
            yield from references(key)
            yield from references(sub)
    elif isinstance(value, list):
        for sub in value:
            yield from references(sub)


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
        return {substitute(key, variables): substitute(sub, variables) for key, sub in value.items()}
    if isinstance(value, list):
        return [substitute(sub, variables) for sub in value]
    return value


# ---------------------------------------------------------------------------
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
