"""Fuzzing with Hypothesis: the decoder on its own (no event loop), then a live server.

Decoder: whatever arrives, `Codec.decode` returns a request Struct or raises
ChatError (`bad_request`/`unknown_type`) with a message, and the error can be
encoded back as the server's reply. Structure-aware frames (valid and invalid
ids, lengths, numbers, surrogates, nesting, trailing garbage, wrong types) must
land in the right outcome class, and a field error must name its path.

Live server: Hypothesis-generated frames over one JSON and one MessagePack
connection (two users); after every frame the server answers as the codec
predicts and the connection still answers `ping`, while a polite client on other
connections keeps creating sessions and sending messages, and its subscriber
sees every event in order. A valid request gets the answer PROTOCOL.md's rules
give against a model of the arena's sessions (ChatModel: who created them,
whether they are closed, each message's author, text, mentions, reactions and
whether it is deleted), in the order the rules are checked, and its reply holds
what the model says; every `mentioned` event due arrives.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import itertools
import json
import math
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from conftest import NO_RATE_LIMITS, ServerProcess
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus

from client import ScriptClient
from protocol import JSON, MSGPACK, ChatError
from protocol.codec import MSGPACK_SUBPROTOCOL, Codec
from protocol.messages import (
    REQUEST_TYPES,
    ClientRequest,
    CloseSession,
    CreateSession,
    DeleteMessage,
    EditMessage,
    Error,
    GetSession,
    History,
    ListSessions,
    MarkRead,
    MoveSessions,
    Ping,
    Pong,
    React,
    ReopenSession,
    SendMessage,
    Session,
    Subscribe,
    Typing,
    Unsubscribe,
    UnwatchDocument,
    UpdateSession,
    WatchDocument,
)

DECODER_EXAMPLES = 300
LIVE_EXAMPLES = 150
MAX_FRAME_BYTES = 65536

DECODER_SETTINGS = settings(max_examples=DECODER_EXAMPLES, deadline=None, database=None)

REQUEST_CLASSES: dict[str, type] = {cls.__struct_config__.tag: cls for cls in ClientRequest.__args__}
DECODE_ERROR_CODES = {"bad_request", "unknown_type"}

# Ids, keys and titles: any Unicode but control characters (Cc is exactly C0,
# DEL and C1) and surrogates (not representable in UTF-8). Text and request ids
# may hold control characters.
SAFE_CHARS = st.characters(exclude_categories=("Cs", "Cc"))
ANY_CHARS = st.characters(exclude_categories=("Cs",))
CONTROL_CHARS = [chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)]
TRICKY_CHARS = ["a", "é", "\u2028", "\u2029", "\ufeff", "\ufffd", "\uffff", "\U0001f600", "\U0010ffff", '"', "\\", "/"]
# Escapes that decode to lone or misordered UTF-16 surrogates: not Unicode text.
SURROGATE_ESCAPES = [
    "\\ud800",
    "\\udbff",
    "\\udc00",
    "\\udfff",
    "\\udc00\\ud800",
    "\\ud800\\ud800",
    "\\ud800\\u0041",
    "\\uDFFF",
]
HUGE_INTS = [2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63), -(2**63) - 1, -(10**30)]


def valid_request_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and 1 <= len(value) <= 64)


def check_decode(codec: Codec, data: str | bytes) -> ChatError | ClientRequest:
    """The codec's contract: a request Struct or a ChatError, and whatever it is, the server can answer it."""
    try:
        result = codec.decode(data)
    except ChatError as error:
        assert error.code in DECODE_ERROR_CODES, error
        assert isinstance(error.message, str) and error.message.strip(), error
        assert error.reply_to is None or valid_request_id(error.reply_to), error.reply_to
        codec.encode(Error(code=error.code, message=error.message, temporary=error.temporary, reply_to=error.reply_to))
        return error
    assert isinstance(result, tuple(REQUEST_CLASSES.values())), result
    assert result.id is None or valid_request_id(result.id)
    codec.encode(Pong(reply_to=result.id))
    return result


# Structure-aware frames ------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What a field accepts, as protocol/messages.py declares it."""

    name: str
    base: str = "str"  # str, int, bool, enum, names (a list of user names), object (JSON), cursor, reqid
    min_len: int = 0  # strings, and each name of a list
    max_len: int | None = None
    no_control: bool = False
    lo: int = 0  # ints: the least; names: the fewest in one list
    hi: int = 0  # ints: the largest; names: the most in one list
    choices: tuple[str, ...] = ()  # enums

    @property
    def is_str(self) -> bool:
        return self.base == "str"


ID = Kind("id", "str", 1, 128, True)
KEY = Kind("key", "str", 1, 64, True)
TITLE = Kind("title", "str", 0, 200, True)
TEXT = Kind("text", "str", 1, None, False)
REACTION = Kind("reaction", "str", 1, 32, False)  # any characters, control characters included
COUNT = Kind("count", "int", lo=0, hi=2**53)
LIMIT = Kind("limit", "int", lo=1, hi=200)
SEQ = Kind("seq", "int", lo=1, hi=2**53)
SESSION_LIMIT = Kind("session limit", "int", lo=1, hi=1000)
BOOL = Kind("bool", "bool")
ORDER = Kind("order", "enum", choices=("created", "activity"))
USER_NAMES = Kind("user names", "names", 1, 64, True, hi=20)
SESSION_IDS = Kind("session ids", "names", 1, 64, True, lo=1, hi=1000)
METADATA = Kind("metadata", "object")  # any JSON object; its size (METADATA_LIMIT) is the chat's: too_large
CURSOR = Kind("cursor", "cursor", 1, 1024)  # and one the server handed out for the same other fields
REQID = Kind("reqid", "reqid")

# PROTOCOL.md's limits that the chat logic checks (not the decoder).
METADATA_LIMIT = 4096  # bytes of compact UTF-8 JSON, non-ASCII unescaped
REACTION_LIMIT = 20  # distinct reactions on one message


@dataclass(frozen=True)
class Field:
    kind: Kind
    required: bool
    nullable: bool


SCHEMA: dict[str, dict[str, Field]] = {
    "create_session": {
        "document_id": Field(ID, True, False),
        "section_id": Field(ID, True, False),
        "title": Field(TITLE, False, True),
        "idempotency_key": Field(KEY, False, True),
        "metadata": Field(METADATA, False, True),
    },
    "get_session": {"session_id": Field(KEY, True, False)},
    "list_sessions": {
        "document_id": Field(ID, True, False),
        "section_id": Field(ID, False, True),
        "limit": Field(SESSION_LIMIT, False, False),
        "cursor": Field(CURSOR, False, True),
        "closed": Field(BOOL, False, True),
        "order": Field(ORDER, False, False),
    },
    "send_message": {
        "session_id": Field(KEY, True, False),
        "text": Field(TEXT, True, False),
        "client_msg_id": Field(KEY, False, True),
        "mentions": Field(USER_NAMES, False, True),
    },
    "edit_message": {
        "session_id": Field(KEY, True, False),
        "seq": Field(SEQ, True, False),
        "text": Field(TEXT, True, False),
        "mentions": Field(USER_NAMES, False, True),
    },
    "delete_message": {"session_id": Field(KEY, True, False), "seq": Field(SEQ, True, False)},
    "react": {
        "session_id": Field(KEY, True, False),
        "seq": Field(SEQ, True, False),
        "reaction": Field(REACTION, True, False),
        "on": Field(BOOL, False, False),
    },
    "update_session": {
        "session_id": Field(KEY, True, False),
        "title": Field(TITLE, False, True),  # absent: unchanged; null: cleared
        "metadata": Field(METADATA, False, True),
    },
    "reopen_session": {"session_id": Field(KEY, True, False)},
    "mark_read": {"session_id": Field(KEY, True, False), "seq": Field(COUNT, True, False)},  # 0..last_seq: the chat's
    "watch_document": {"document_id": Field(ID, True, False)},
    "move_sessions": {
        "document_id": Field(ID, True, False),
        "from_section_id": Field(ID, True, False),
        "to_section_id": Field(ID, True, False),
        "session_ids": Field(SESSION_IDS, False, True),
    },
    "unwatch_document": {"document_id": Field(ID, True, False)},
    "history": {
        "session_id": Field(KEY, True, False),
        "after_seq": Field(COUNT, False, True),
        "before_seq": Field(COUNT, False, True),
        "limit": Field(LIMIT, False, False),
    },
    "close_session": {"session_id": Field(KEY, True, False)},
    "subscribe": {
        "document_id": Field(ID, True, False),
        "section_id": Field(ID, True, False),
        "since_offset": Field(COUNT, False, True),
        "epoch": Field(KEY, False, True),
    },
    "unsubscribe": {"document_id": Field(ID, True, False), "section_id": Field(ID, True, False)},
    "typing": {"session_id": Field(KEY, True, False)},
    "ping": {},
}
ID_FIELD = Field(REQID, False, True)
assert set(SCHEMA) == REQUEST_TYPES


def _check_schema() -> None:
    """Every field of every request Struct is in SCHEMA, required exactly when the Struct has no default."""
    for tag, fields in SCHEMA.items():
        declared = {info.name: info for info in msgspec.structs.fields(REQUEST_CLASSES[tag]) if info.name != "id"}
        assert set(fields) == set(declared), f"{tag}: SCHEMA has {sorted(fields)}, the Struct {sorted(declared)}"
        for name, spec in fields.items():
            assert spec.required == declared[name].required, f"{tag}.{name}: required is {declared[name].required}"


_check_schema()


@dataclass
class Expect:
    """The outcome class a frame must land in."""

    request: Any = None  # the Struct it decodes to, when valid
    code: str | None = None  # otherwise the error code...
    fragments: tuple[str, ...] = ()  # ...one of which the message names (case-insensitive)
    reply_to: Any = None

    @property
    def ok(self) -> bool:
        return self.code is None


@dataclass
class Frame:
    raw: str
    expect: Expect
    note: str = ""  # what was done to it, for reading failures

    def __repr__(self) -> str:
        return f"Frame({self.note}: {self.raw[:300]!r}{'…' if len(self.raw) > 300 else ''})"


def encode_string(value: str, style: str) -> str:
    """A JSON string literal: plain UTF-8, ASCII with escapes, or every character escaped."""
    if style == "utf8":
        return json.dumps(value, ensure_ascii=False)
    if style == "ascii":
        return json.dumps(value, ensure_ascii=True)
    units = value.encode("utf-16-be")
    return '"' + "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2)) + '"'


string_styles = st.sampled_from(["utf8", "ascii", "escaped"])


def encode_json(value: Any, style: str) -> str:
    """A JSON text for `value`, its strings (keys included) in one of the string styles."""
    if isinstance(value, str):
        return encode_string(value, style)
    if isinstance(value, dict):
        return "{" + ",".join(f"{encode_string(k, style)}:{encode_json(v, style)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode_json(v, style) for v in value) + "]"
    return json.dumps(value)


def json_size(value: Any) -> int:
    """The bytes of `value` as compact UTF-8 JSON without escaping non-ASCII: how PROTOCOL.md measures metadata."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode())


def sized_metadata(size: int, char: str = "x") -> dict[str, str]:
    """A metadata object of exactly `size` bytes (as json_size counts them), mostly `char`."""
    each = json_size(char) - 2
    room = size - json_size({"pad": ""})
    value = {"pad": char * (room // each) + "x" * (room % each)}
    assert json_size(value) == size, (size, char)
    return value


# Characters whose JSON takes 1 to 6 bytes: the limit counts UTF-8 bytes and escapes, not characters.
SIZING_CHARS = ["x", "é", "\U0001f600", "\n", '"', "\x01", "\u2028", "\x7f"]
SIZES_NEAR_THE_LIMIT = [METADATA_LIMIT - 1, METADATA_LIMIT, METADATA_LIMIT + 1, METADATA_LIMIT + 200]


def metadata_objects(ints: st.SearchStrategy[int]) -> st.SearchStrategy[dict[str, Any]]:
    leaves = (
        st.none()
        | st.booleans()
        | ints
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(ANY_CHARS, max_size=20)
    )
    values = st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(ANY_CHARS, max_size=8), children, max_size=4),
        max_leaves=12,
    )
    return st.one_of(
        st.dictionaries(st.text(ANY_CHARS, max_size=8), values, max_size=5),
        st.builds(sized_metadata, st.sampled_from(SIZES_NEAR_THE_LIMIT), st.sampled_from(SIZING_CHARS)),
    )


# JSON takes integers of any size; metadata takes only those MessagePack carries too (others: bad_request).
METADATA_64_BIT_INTS = metadata_objects(st.integers(-(2**63), 2**64 - 1))

# The arena's users, so that mentions reach real connections; then any user name.
KNOWN_USERS = ["fuzz-json", "fuzz-msgpack", "polite", "observer"]
user_names = st.one_of(
    st.sampled_from(KNOWN_USERS),
    st.text(SAFE_CHARS, min_size=1, max_size=64),
    st.sampled_from(TRICKY_CHARS).map(lambda c: c * 64),
)
# A few reactions that come again and again, so that reacting twice and taking back happen.
COMMON_REACTIONS = ["+1", "\U0001f44d", "\U0001f389", "x" * 32, "\x00", " "]


def encode_names(names: list[str], style: str) -> str:
    return "[" + ",".join(encode_string(name, style) for name in names) + "]"


CURSOR_SLOT = object()  # a valid cursor depends on the other fields: `frames` fills it in


@st.composite
def listing_cursor(draw, listing: ListSessions) -> str:
    """A cursor as the server hands out for this listing (its fields, its order), after some session."""
    at = draw(st.sampled_from(["2026-11-25T08:00:00.000Z", "1970-01-01T00:00:00.000Z", ""]) | st.text(max_size=30))
    session = Session(
        session_id=draw(st.uuids().map(str) | st.text(SAFE_CHARS, min_size=1, max_size=64)),
        document_id=listing.document_id,
        section_id=listing.section_id or "s",
        title=None,
        created_by="u",
        created_at=at,
        closed=False,
        last_seq=0,
        last_activity_at=at,
    )
    return listing.cursor_after(session)


def is_cursor_shaped(text: str) -> bool:
    """Whether `text` decodes as a cursor does (base64 of a JSON triple), whatever listing it was for."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        msgspec.json.decode(raw, type=tuple[str, str, str])
    except (ValueError, msgspec.MsgspecError):
        return False
    return True


@st.composite
def valid_value(draw, kind: Kind, session_ids: tuple[str, ...] = ()) -> tuple[str, Any]:
    """(raw JSON, the Python value msgspec must decode it to)."""
    if session_ids and draw(st.integers(0, 9)) < 7:
        # Mostly real sessions, so that valid requests reach the chat logic and storage.
        value = draw(st.sampled_from(session_ids))
        return encode_string(value, draw(string_styles)), value
    if kind is TEXT and draw(st.integers(0, 9)) == 0:
        return '"' + "x" * 8001 + '"', "x" * 8001  # over max_text_chars: decodes, the chat says too_large
    if kind is REACTION and draw(st.booleans()):
        value = draw(st.sampled_from(COMMON_REACTIONS))
        return encode_string(value, draw(string_styles)), value
    if kind.is_str:
        chars = SAFE_CHARS if kind.no_control else ANY_CHARS
        cap = min(kind.max_len or 300, 300)
        candidates = [st.text(chars, min_size=kind.min_len, max_size=cap)]
        if kind.max_len is not None:  # exactly at the limit, in code points (astral ones included)
            candidates.append(st.sampled_from(TRICKY_CHARS).map(lambda c, n=kind.max_len: c * n))
        value = draw(st.one_of(candidates))
        return encode_string(value, draw(string_styles)), value
    if kind is REQID:
        return draw(
            st.one_of(
                st.text(ANY_CHARS, min_size=1, max_size=64).flatmap(
                    lambda s: string_styles.map(lambda style: (encode_string(s, style), s))
                ),
                st.integers().map(lambda n: (str(n), n)),
                st.sampled_from(HUGE_INTS).map(lambda n: (str(n), n)),
                st.just(("9" * 4300, int("9" * 4300))),  # the longest int Python converts by default
            )
        )
    if kind.base == "bool":
        value = draw(st.booleans())
        return json.dumps(value), value
    if kind.base == "enum":
        value = draw(st.sampled_from(kind.choices))
        return encode_string(value, draw(string_styles)), value
    if kind.base == "names":  # repeats included: the server removes them
        names = draw(st.lists(user_names, min_size=kind.lo, max_size=min(kind.hi, 30)))
        return encode_names(names, draw(string_styles)), names
    if kind.base == "object":
        value = draw(METADATA_64_BIT_INTS)  # past 64 bits is bad_request: MessagePack could not carry it
        return encode_json(value, draw(string_styles)), value
    if kind.base == "cursor":
        return "", CURSOR_SLOT
    if kind in (SEQ, COUNT) and draw(st.integers(0, 9)) < 7:
        value = draw(st.sampled_from([1, 1, 1, 2, 3, kind.lo]))  # the arena's sessions hold a few messages
        return str(value), value
    value = draw(st.one_of(st.integers(kind.lo, kind.hi), st.sampled_from([kind.lo, kind.hi])))
    raw = "-0" if value == 0 and draw(st.booleans()) else str(value)
    return raw, value


WRONG_TYPE_FOR_STR = [
    "5",
    "-1",
    "0",
    "1.5",
    "1e999",
    "-1e999",
    "1e2",
    "10000000000000000000000000000000",
    "true",
    "false",
    "[]",
    "{}",
    '["x"]',
    '{"a":"b"}',
    "[[[[[[[[[[1]]]]]]]]]]",
]
WRONG_TYPE_FOR_INT = [
    "1.0",
    "1.5",
    "-0.0",
    "1e2",
    "1e999",
    "-1e999",
    "0.1e1",
    "true",
    "false",
    '"5"',
    '""',
    "[]",
    "{}",
    "[1]",
    '{"n":1}',
]


WRONG_TYPE_FOR_BOOL = ["0", "1", '"true"', '"false"', '""', "1.0", "[]", "{}", "[true]", '"on"', '{"on":true}']
WRONG_TYPE_FOR_OBJECT = ['"x"', '""', '"{}"', "5", "-0", "1.5", "true", "false", "[]", '[{"a":1}]', '["a","b"]']
WRONG_TYPE_FOR_LIST = ['"fuzz-json"', '""', "5", "1.5", "true", "{}", '{"0":"u"}']
WRONG_TYPE_FOR_NAME = ["5", "1.5", "null", "true", "[]", '["u"]', "{}"]
UNKNOWN_ORDERS = ["", "Created", "ACTIVITY", "created ", " activity", "newest", "oldest", "activity\x00", "créated"]
# Numbers JSON can spell but a double cannot hold, inside an object of any JSON.
OUT_OF_RANGE_INSIDE = ['{"a":1e999}', '{"a":[-1e999]}', '{"k":{"n":1e400}}', '{"a":1,"b":[1,2,-1e999]}']
PATH = ("`$.{name}`",)  # the error names the field
MALFORMED = ("malformed", "surrogate", "escape")  # not Unicode text: the frame as a whole, no reply_to
TOO_DEEP = ("recursion", "nest", "deep")  # the envelope cannot read past it either: no reply_to


@functools.cache
def surrogate_string() -> st.SearchStrategy[str]:
    return st.tuples(
        st.text(SAFE_CHARS, max_size=5), st.sampled_from(SURROGATE_ESCAPES), st.text(SAFE_CHARS, max_size=5)
    ).map(lambda t: encode_string(t[0], "ascii")[:-1] + t[1] + encode_string(t[2], "ascii")[1:])


@functools.cache
def too_long_string(max_len: int) -> st.SearchStrategy[str]:
    random_text = st.text(SAFE_CHARS, min_size=max_len + 1, max_size=max_len + 30)
    if max_len > 256:  # a long random text costs much to draw: a random start, then padding
        random_text = st.text(SAFE_CHARS, max_size=30).map(lambda t, n=max_len: t + "c" * (n + 1 - len(t)))
    return st.one_of(
        random_text,
        st.sampled_from(TRICKY_CHARS).map(lambda c, n=max_len: c * (n + 1)),
    ).flatmap(lambda s: string_styles.map(lambda style: encode_string(s, style)))


@functools.cache
def with_control_character() -> st.SearchStrategy[str]:
    return st.tuples(
        st.text(SAFE_CHARS, max_size=10),
        st.sampled_from(CONTROL_CHARS),
        st.text(SAFE_CHARS, max_size=10),
        string_styles,
    ).map(lambda t: encode_string(t[0] + t[1] + t[2], t[3]))


@st.composite
def names_with_a_bad_one(draw, kind: Kind) -> tuple[str, tuple[str, ...], bool]:
    """A list of user names, one of them not a user name: the error names that item."""
    count = st.lists(user_names, max_size=min(kind.hi, 30) - 1)
    names = [encode_string(name, draw(string_styles)) for name in draw(count)]
    index = draw(st.integers(0, len(names)))
    bad = draw(
        st.one_of(
            st.just('""'),
            too_long_string(kind.max_len or 0),
            with_control_character(),
            st.sampled_from(WRONG_TYPE_FOR_NAME),
        )
    )
    names.insert(index, bad)
    return "[" + ",".join(names) + "]", (f"`$.{{name}}[{index}]`",), True


# Built once per kind: Hypothesis validates a strategy object the first time it draws from it.
@functools.cache
def string_options(kind: Kind) -> list[tuple[str, st.SearchStrategy[Any]]]:
    options: list[tuple[str, st.SearchStrategy[Any]]] = []
    options.append(
        (
            "wrong type",
            st.sampled_from(
                WRONG_TYPE_FOR_STR
                if kind is not REQID
                else ["1.5", "1e999", "-1e999", "true", "false", "[]", "{}", "[1]", '{"id":1}']
            ),
        )
    )
    options.append(("surrogate", surrogate_string()))
    if kind.min_len >= 1 or kind is REQID:
        options.append(("empty", st.just('""')))
    max_len = 64 if kind is REQID else kind.max_len
    if max_len is not None:
        options.append(("too long", too_long_string(max_len)))
    if kind.no_control:
        options.append(("control character", with_control_character()))
    if kind is REQID:
        options.append(("int over 4300 digits", st.integers(4301, 6000).map(lambda n: "9" * n)))
    if kind.base == "cursor":
        not_a_cursor = st.text(ANY_CHARS, min_size=1, max_size=200).filter(lambda s: not is_cursor_shaped(s))
        options.append(
            (
                "not a cursor",
                st.tuples(not_a_cursor, string_styles).map(lambda t: (encode_string(*t), ("`cursor`",), True)),
            )
        )
        # No document_id holds a control character, so this listing is never the frame's own.
        elsewhere = listing_cursor(ListSessions(document_id="\x00another listing"))
        options.append(("cursor of another listing", elsewhere.map(lambda c: (json.dumps(c), ("`cursor`",), True))))
    return options


@functools.cache
def object_options(max_depth: int) -> list[tuple[str, st.SearchStrategy[Any]]]:
    return [
        ("wrong type", st.sampled_from(WRONG_TYPE_FOR_OBJECT)),
        ("number out of range inside", st.sampled_from(OUT_OF_RANGE_INSIDE).map(lambda r: (r, ("`$.{name}[",), True))),
        (
            "integer outside 64 bits",
            st.sampled_from([2**64, -(2**63) - 1, 10**30]).map(lambda n: ('{"n":' + str(n) + "}", ("64 bits",), True)),
        ),
        (
            "surrogate",
            st.one_of(
                surrogate_string().map(lambda r: '{"k":' + r + "}"), surrogate_string().map(lambda r: "{" + r + ":1}")
            ),
        ),
        (
            "nested too deep",
            st.integers(8000, max_depth).map(lambda d: ('{"a":' + "[" * d + "]" * d + "}", TOO_DEEP, False)),
        ),
    ]


@functools.cache
def other_options(kind: Kind) -> list[tuple[str, st.SearchStrategy[Any]]]:
    """Invalid bools, enum values and lists of user names."""
    if kind.base == "bool":
        return [("wrong type", st.sampled_from(WRONG_TYPE_FOR_BOOL))]
    if kind.base == "enum":
        unknown = st.one_of(st.sampled_from(UNKNOWN_ORDERS), st.text(ANY_CHARS, max_size=12)).filter(
            lambda s: s not in kind.choices
        )
        return [
            ("unknown value", st.tuples(unknown, string_styles).map(lambda t: encode_string(*t))),
            ("wrong type", st.sampled_from(["5", "0", "1.5", "true", "[]", "{}", '["created"]'])),
            ("surrogate", surrogate_string()),
        ]
    # Short names when the list may be long: a list too long, not a frame too large.
    names = user_names if kind.hi <= 100 else st.text("abc", min_size=1, max_size=4)
    too_many = st.tuples(st.lists(names, min_size=kind.hi + 1, max_size=kind.hi + 5), string_styles)
    too_few = [("too few", st.just("[]"))] if kind.lo else []
    return too_few + [
        ("wrong type", st.sampled_from(WRONG_TYPE_FOR_LIST)),
        ("too many", too_many.map(lambda t: encode_names(*t))),
        ("a bad name", names_with_a_bad_one(kind)),
        ("surrogate", surrogate_string().map(lambda r: '["u",' + r + "]")),
    ]


@st.composite
def invalid_value(draw, kind: Kind, nullable: bool, max_depth: int = 20_000) -> tuple[str, str, tuple[str, ...], bool]:
    """(raw JSON, what is wrong, fragments one of which the error names ({name}: the field), whether reply_to survives)."""
    options: list[tuple[str, st.SearchStrategy[Any]]] = []
    if kind.is_str or kind is REQID or kind.base == "cursor":
        options += string_options(kind)  # a copy: `options` grows below
    elif kind.base in ("bool", "enum", "names"):
        options += other_options(kind)
    elif kind.base == "object":
        options += object_options(max_depth)
    else:
        options.append(("wrong type", st.sampled_from(WRONG_TYPE_FOR_INT)))
        options.append(("below range", st.one_of(st.integers(max_value=kind.lo - 1), st.just(-(10**30))).map(str)))
        options.append(
            (
                "above range",
                st.one_of(st.integers(min_value=kind.hi + 1), st.sampled_from([kind.hi + 1, 10**30, 2**64])).map(str),
            )
        )
        options.append(("int over 4300 digits", st.integers(4301, 6000).map(lambda n: "9" * n)))
    if not nullable:
        options.append(("null", st.just("null")))
    what = draw(st.sampled_from([name for name, _ in options]))
    drawn = draw(dict(options)[what])
    if isinstance(drawn, tuple):
        raw, fragments, reply_to_survives = drawn
    elif what == "surrogate":
        raw, fragments, reply_to_survives = drawn, MALFORMED, False
    else:
        raw, fragments, reply_to_survives = drawn, PATH, True
    return raw, what, fragments, reply_to_survives


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(ANY_CHARS, max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(ANY_CHARS, max_size=8), children, max_size=4),
    max_leaves=12,
)
# Values that are harmless in a field nobody reads.
extra_raw_values = st.one_of(
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False)),
    st.sampled_from(
        [
            "1e999",
            "-1e999",
            "1" + "0" * 40,
            "-0",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
            '"\\ud83d\\ude00"',
        ]
    ),
    st.integers(1, 200).map(lambda d: "[" * d + "]" * d),
)
whitespace = st.text(st.sampled_from(" \t\n\r"), max_size=3)
TRAILING_GARBAGE = ["x", "}", "]", "{}", ",", "1", '"', "\x00", "null", '{"type":"ping"}', "é", "\ufeff", "//", "/* */"]
UNKNOWN_TYPES = [
    "",
    "Ping",
    "PING",
    "ping ",
    " ping",
    "create-session",
    "createSession",
    "__proto__",
    "constructor",
    "error",
    "pong",
    "welcome",
    "message",
]
NON_STRING_TYPES = [
    "5",
    "-1",
    "1.5",
    "null",
    "true",
    "false",
    "[]",
    '["ping"]',
    "{}",
    '{"type":"ping"}',
    "10000000000000000000000000000000",
]

DEFECTS = (
    ["none"] * 4
    + ["bad value"] * 6
    + [
        "missing field",
        "trailing garbage",
        "both cursors",
        "deep nesting",
        "unknown type",
        "type not a string",
        "no type",
    ]
)


# Against a live server valid requests matter most: they reach the chat logic and storage.
LIVE_DEFECTS = ["none"] * 20 + DEFECTS


@st.composite
def frames(
    draw,
    session_ids: tuple[str, ...] = (),
    max_depth: int = 20_000,
    defects: list[str] = DEFECTS,
) -> Frame:
    """A request-shaped JSON text and the outcome it must have."""
    tag = draw(st.sampled_from(sorted(SCHEMA)))
    fields = {**SCHEMA[tag], "id": ID_FIELD}
    defect = draw(st.sampled_from(defects))

    present: dict[str, tuple[str, Any]] = {}
    for name, spec in fields.items():
        if spec.required or draw(st.booleans()):
            if spec.nullable and draw(st.integers(0, 4)) == 0:
                present[name] = ("null", None)
            else:
                ids = session_ids if name == "session_id" else ()
                present[name] = draw(valid_value(spec.kind, ids))
    if present.get("cursor", ("", None))[1] is CURSOR_SLOT:
        # A cursor is valid only for the listing's other fields, all of them valid here (a defect comes later).
        listing = ListSessions(**{n: v for n, (_, v) in present.items() if n not in ("cursor", "id")})
        cursor = draw(listing_cursor(listing))
        present["cursor"] = (encode_string(cursor, draw(string_styles)), cursor)
    if tag == "history" and defect != "both cursors":
        # Both cursors at once is a defect of its own; otherwise keep at most one.
        if (
            present.get("after_seq", ("null", None))[1] is not None
            and present.get("before_seq", ("null", None))[1] is not None
        ):
            del present[draw(st.sampled_from(["after_seq", "before_seq"]))]
    request_id = present.get("id", ("", None))[1]

    type_raw: str | None = encode_string(tag, draw(string_styles))
    extras: list[tuple[str, str]] = []
    trailing = draw(whitespace)
    note = f"{tag}, {defect}"
    expect: Expect

    if defect == "bad value":
        name = draw(st.sampled_from(sorted(fields)))
        spec = fields[name]
        raw, what, fragments, reply_to_survives = draw(invalid_value(spec.kind, spec.nullable, max_depth))
        present[name] = (raw, None)
        note = f"{tag}, bad value for {name}: {what}"
        # Not Unicode text, or nested past what the envelope reads: the frame is malformed as a
        # whole and no reply_to can be trusted. Otherwise the error names the field.
        reply_to_survives = reply_to_survives and name != "id" and valid_request_id(request_id)
        expect = Expect(
            code="bad_request",
            fragments=tuple(fragment.format(name=name) for fragment in fragments),
            reply_to=request_id if reply_to_survives else None,
        )
    elif defect == "missing field" and any(spec.required for spec in SCHEMA[tag].values()):
        name = draw(st.sampled_from(sorted(n for n, spec in SCHEMA[tag].items() if spec.required)))
        del present[name]
        note = f"{tag}, missing {name}"
        expect = Expect(code="bad_request", fragments=(f"missing required field `{name}`",), reply_to=request_id)
    elif defect == "trailing garbage":
        trailing += draw(st.sampled_from(TRAILING_GARBAGE)) + draw(whitespace)
        expect = Expect(code="bad_request", fragments=("trailing",))
    elif defect == "both cursors" and tag == "history":
        present["after_seq"] = draw(valid_value(COUNT))
        present["before_seq"] = draw(valid_value(COUNT))
        expect = Expect(code="bad_request", fragments=("together", "both", "cursor"), reply_to=request_id)
    elif defect == "deep nesting":
        # The limit is the interpreter's recursion limit less the stack in use (and
        # Hypothesis raises it while it runs), so stay well clear of it.
        depth = draw(st.integers(8000, max_depth))
        extras.append(("deep", "[" * depth + "]" * depth))
        note = f"{tag}, nesting {depth} deep"
        expect = Expect(code="bad_request", fragments=("recursion", "nest", "deep"))
    elif defect == "unknown type":
        unknown = draw(
            st.one_of(st.sampled_from(UNKNOWN_TYPES), st.text(ANY_CHARS, max_size=20)).filter(
                lambda s: s not in REQUEST_TYPES
            )
        )
        type_raw = encode_string(unknown, draw(string_styles))
        note = f"unknown type {unknown!r} with {tag}'s fields"
        fragments = (unknown,) if unknown.isalnum() else ()
        expect = Expect(code="unknown_type", fragments=fragments, reply_to=request_id)
    elif defect == "type not a string":
        type_raw = draw(st.sampled_from(NON_STRING_TYPES))
        expect = Expect(code="bad_request", fragments=("`$.type`",), reply_to=request_id)
    elif defect == "no type":
        type_raw = None
        expect = Expect(code="bad_request", fragments=("missing required field `type`",), reply_to=request_id)
    else:
        note = f"{tag}, valid"
        expect = Expect(request=REQUEST_CLASSES[tag](**{name: value for name, (_, value) in present.items()}))

    # Unknown fields are ignored, whatever they hold.
    taken = set(fields) | {"type", "deep"}
    for key, value in draw(st.lists(st.tuples(st.text(ANY_CHARS, max_size=10), extra_raw_values), max_size=3)):
        if key not in taken:
            taken.add(key)
            extras.append((key, value))

    items = [(name, raw) for name, (raw, _) in present.items()] + extras
    if type_raw is not None:
        items.append(("type", type_raw))
    items = draw(st.permutations(items))
    key_style = draw(string_styles)
    separator = draw(whitespace) + "," + draw(whitespace)
    body = separator.join(
        f"{encode_string(key, key_style)}{draw(whitespace)}:{draw(whitespace)}{raw}" for key, raw in items
    )
    return Frame(draw(whitespace) + "{" + draw(whitespace) + body + draw(whitespace) + "}" + trailing, expect, note)


def check_frame(frame: Frame) -> None:
    outcome = check_decode(JSON, frame.raw)
    expect = frame.expect
    if expect.ok:
        assert outcome == expect.request, f"{frame.note}: decoded to {outcome!r}"
        return
    assert isinstance(outcome, ChatError), f"{frame.note}: decoded to {outcome!r}, expected {expect.code}"
    assert outcome.code == expect.code, f"{frame.note}: {outcome}"
    if expect.fragments:
        assert any(
            f.lower() in outcome.message.lower() for f in expect.fragments
        ), f"{frame.note}: {outcome.message!r} names none of {expect.fragments}"
    assert (
        outcome.reply_to == expect.reply_to
    ), f"{frame.note}: reply_to {outcome.reply_to!r}, expected {expect.reply_to!r}"


def frame_of(
    raw: str, *, request: Any = None, code: str | None = None, fragments: tuple[str, ...] = (), reply_to: Any = None
) -> Frame:
    return Frame(raw, Expect(request, code, fragments, reply_to), "explicit example")


# 1a. Anything at all ----------------------------------------------------------------


@DECODER_SETTINGS
@given(st.text(ANY_CHARS | st.characters(categories=("Cs",)), max_size=200))
def test_any_text_decodes_or_is_a_chat_error(text):
    """Arbitrary text, lone surrogates included, never escapes as anything but ChatError."""
    check_decode(JSON, text)


@DECODER_SETTINGS
@given(
    st.text(st.sampled_from(list('{}[]":,. -+0123456789eE\\/ubfnrtalsxd\u00e9\U0001f600')) | ANY_CHARS, max_size=120)
)
def test_json_shaped_text_decodes_or_is_a_chat_error(text):
    """Text built from JSON's own punctuation gets much deeper into the parser than random Unicode."""
    check_decode(JSON, text)


@DECODER_SETTINGS
@given(st.binary(max_size=300))
def test_bytes_in_json_mode_are_bad_requests(data):
    """A binary frame in JSON mode is bad_request, whatever it holds; its bytes as (surrogate-escaped) text never crash."""
    error = check_decode(JSON, data)
    assert isinstance(error, ChatError) and error.code == "bad_request" and "binary" in error.message
    check_decode(JSON, data.decode("utf-8", errors="surrogateescape"))


@DECODER_SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_in_msgpack_mode(data):
    """Arbitrary bytes in MessagePack mode: a request or a ChatError, nothing else."""
    check_decode(MSGPACK, data)


def msgpack_objects_with(keys: list[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(ANY_CHARS, max_size=20)
        | st.binary(max_size=10)
        | st.sampled_from(sorted(REQUEST_TYPES)),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(keys) | st.text(max_size=5), children, max_size=5)
        | st.dictionaries(
            st.integers() | st.binary(max_size=4) | st.none() | st.sampled_from([b"type", "type"]), children, max_size=3
        ).filter(lambda d: all(not isinstance(k, int) or -(2**63) <= k < 2**64 for k in d)),
        max_leaves=15,
    )


# The live server gets the field names of revision 1.0 only: MessagePack `metadata` that is not
# JSON (NaN, bytes, non-string keys) is test_metadata_that_one_wire_format_cannot_carry's.
msgpack_objects = msgpack_objects_with(
    ["type", "id", "document_id", "section_id", "session_id", "text", "limit", "after_seq"]
)
msgpack_request_objects = msgpack_objects_with(
    sorted({"type", "id"} | {name for fields in SCHEMA.values() for name in fields})
)


@DECODER_SETTINGS
@given(msgpack_request_objects, st.data())
def test_msgpack_objects_decode_or_are_chat_errors(value, data):
    """Well-formed MessagePack of any shape (bytes, floats, nesting, known type names): request or ChatError."""
    encoded = msgspec.msgpack.encode(value)
    check_decode(MSGPACK, encoded)
    cut = data.draw(st.integers(0, max(0, len(encoded) - 1)))
    check_decode(MSGPACK, encoded[:cut])  # truncated
    check_decode(MSGPACK, encoded + data.draw(st.binary(min_size=1, max_size=4)))  # trailing bytes


# 1b. Structure-aware ----------------------------------------------------------------


# Cases worth keeping, each with the outcome it must have (see also REGRESSIONS below).
@DECODER_SETTINGS
@example(frame_of('{"type":"ping","id":"\\u0000"}', request=Ping(id="\x00")))
@example(frame_of('{"type":"ping","id":' + "9" * 4300 + "}", request=Ping(id=int("9" * 4300))))
@example(frame_of('{"type":"ping","id":' + "9" * 4301 + "}", code="bad_request", fragments=("`$.id`",)))
@example(frame_of('{"\\u0074\\u0079\\u0070\\u0065":"\\u0070ing","id":1}', request=Ping(id=1)))
@example(
    frame_of(
        '{"type":"create_session","id":1,"document_id":"' + "\U0001f600" * 128 + '","section_id":"s"}',
        request=CreateSession(id=1, document_id="\U0001f600" * 128, section_id="s"),
    )
)
@example(
    frame_of(
        '{"type":"create_session","id":1,"document_id":"' + "\U0001f600" * 129 + '","section_id":"s"}',
        code="bad_request",
        fragments=("`$.document_id`",),
        reply_to=1,
    )
)
@example(
    frame_of(
        '{"type":"create_session","id":1,"document_id":"\\ud83d\\ude00","section_id":"\\u2028"}',
        request=CreateSession(id=1, document_id="\U0001f600", section_id="\u2028"),
    )
)
@example(
    frame_of(
        '{"type":"create_session","id":2,"document_id":"a\\u0085b","section_id":"s"}',
        code="bad_request",
        fragments=("`$.document_id`", "control"),
        reply_to=2,
    )
)
@example(
    frame_of(
        '{"type":"create_session","id":2,"document_id":"d","section_id":"s\\n"}',
        code="bad_request",
        fragments=("`$.section_id`",),
        reply_to=2,
    )
)
@example(
    frame_of(
        '{"type":"create_session","id":2,"document_id":1e999,"section_id":"s"}',
        code="bad_request",
        fragments=("`$.document_id`",),
        reply_to=2,
    )
)
@example(
    frame_of(
        '{"type":"history","id":3,"session_id":"x","limit":-0}',
        code="bad_request",
        fragments=("`$.limit`",),
        reply_to=3,
    )
)
@example(
    frame_of(
        '{"type":"history","id":3,"session_id":"x","after_seq":-0}', request=History(id=3, session_id="x", after_seq=0)
    )
)
@example(
    frame_of(
        '{"type":"history","id":3,"session_id":"x","after_seq":9007199254740993}',
        code="bad_request",
        fragments=("`$.after_seq`",),
        reply_to=3,
    )
)
@example(
    frame_of(
        '{"type":"history","id":3,"session_id":"x","limit":5e0}',
        code="bad_request",
        fragments=("`$.limit`",),
        reply_to=3,
    )
)
@example(
    frame_of(
        '{"type":"send_message","id":4,"session_id":"s","text":"\\u0000\\n"}',
        request=SendMessage(id=4, session_id="s", text="\x00\n"),
    )
)
@example(
    frame_of(
        '{"type":"send_message","id":4,"session_id":"s","text":"\\udc00\\ud800"}',
        code="bad_request",
        fragments=("malformed",),
    )
)
@example(frame_of('{"type":"ping","id":5}\x00', code="bad_request", fragments=("trailing",)))
@example(frame_of('{"type":"ping","id":5,"x":1e999,"y":100000000000000000000000000000000}', request=Ping(id=5)))
@example(frame_of('{"type":"ping","id":6,"x":' + "[" * 500 + "]" * 500 + "}", request=Ping(id=6)))
@example(
    frame_of(
        '{"type":"ping","id":6,"x":' + "[" * 10000 + "]" * 10000 + "}", code="bad_request", fragments=("recursion",)
    )
)
@example(frame_of('{"type":"","id":7}', code="unknown_type", reply_to=7))
@example(frame_of('{"type":"Ping","id":7}', code="unknown_type", fragments=("Ping",), reply_to=7))
@example(
    frame_of(
        '{"type":10000000000000000000000000000000,"id":7}', code="bad_request", fragments=("`$.type`",), reply_to=7
    )
)
@example(
    frame_of(
        '{"type":"list_sessions","id":8,"document_id":"../../etc/passwd","section_id":null}',
        request=ListSessions(id=8, document_id="../../etc/passwd"),
    )
)
@example(
    frame_of(
        '{"type":"subscribe","id":9,"document_id":"d","section_id":"s","since_offset":9007199254740992,"epoch":null}',
        request=Subscribe(id=9, document_id="d", section_id="s", since_offset=2**53),
    )
)
@example(
    frame_of(
        '{"type":"react","id":10,"session_id":"s","seq":1,"reaction":"\\u0000"}',
        request=React(id=10, session_id="s", seq=1, reaction="\x00"),
    )
)
@example(
    frame_of(
        '{"type":"react","id":10,"session_id":"s","seq":1,"reaction":"' + "\U0001f600" * 33 + '"}',
        code="bad_request",
        fragments=("`$.reaction`",),
        reply_to=10,
    )
)
@example(
    frame_of(
        '{"type":"edit_message","id":11,"session_id":"s","seq":0,"text":"t"}',
        code="bad_request",
        fragments=("`$.seq`",),
        reply_to=11,
    )
)
@example(
    frame_of(
        '{"type":"send_message","id":12,"session_id":"s","text":"t","mentions":["a","b\\u0085"]}',
        code="bad_request",
        fragments=("`$.mentions[1]`",),
        reply_to=12,
    )
)
@example(
    frame_of(
        '{"type":"send_message","id":12,"session_id":"s","text":"t","mentions":["a","a"]}',
        request=SendMessage(id=12, session_id="s", text="t", mentions=["a", "a"]),
    )
)
@example(
    frame_of(
        '{"type":"list_sessions","id":13,"document_id":"d","order":"newest"}',
        code="bad_request",
        fragments=("`$.order`",),
        reply_to=13,
    )
)
@example(
    frame_of(
        '{"type":"list_sessions","id":13,"document_id":"d","cursor":"bm90IGEgY3Vyc29y"}',
        code="bad_request",
        fragments=("`cursor`",),
        reply_to=13,
    )
)
@example(
    frame_of(
        '{"type":"update_session","id":14,"session_id":"s","title":null}',
        request=UpdateSession(id=14, session_id="s", title=None),
    )
)
@example(frame_of('{"type":"update_session","id":14,"session_id":"s"}', request=UpdateSession(id=14, session_id="s")))
@example(
    frame_of(
        '{"type":"create_session","id":15,"document_id":"d","section_id":"s","metadata":{"n":100000000000000000000000000000}}',
        code="bad_request",
        fragments=("`metadata.n`", "64 bits"),
        reply_to=15,
    )
)
@example(
    frame_of(
        '{"type":"create_session","id":15,"document_id":"d","section_id":"s","metadata":[]}',
        code="bad_request",
        fragments=("`$.metadata`",),
        reply_to=15,
    )
)
@example(frame_of('{"type":"reopen_session","id":16,"session_id":"s"}', request=ReopenSession(id=16, session_id="s")))
@example(
    frame_of(
        '{"type":"delete_message","id":16,"session_id":"s","seq":9007199254740992}',
        request=DeleteMessage(id=16, session_id="s", seq=2**53),
    )
)
@example(
    frame_of(
        '{"type":"edit_message","id":16,"session_id":"s","seq":1,"text":"t","mentions":null}',
        request=EditMessage(id=16, session_id="s", seq=1, text="t"),
    )
)
@given(frames())
def test_structured_frames_land_in_the_right_outcome(frame):
    """Request-shaped frames, each valid or with one defect: valid ones decode exactly; each defect gets its error, naming the field."""
    check_frame(frame)


@DECODER_SETTINGS
@given(frames(), st.data())
def test_mutated_frames_never_crash_the_decoder(frame, data):
    """Request-shaped frames cut, spliced and corrupted at random: request or ChatError, never anything else."""
    raw = frame.raw
    at = data.draw(st.integers(0, len(raw)))
    mutation = data.draw(st.sampled_from(["truncate", "delete", "insert", "duplicate"]))
    if mutation == "truncate":
        raw = raw[:at]
    elif mutation == "delete":
        raw = raw[:at] + raw[at + 1 :]
    elif mutation == "insert":
        raw = (
            raw[:at]
            + data.draw(st.sampled_from(list('{}[]":,\\0e-') + SURROGATE_ESCAPES + CONTROL_CHARS[:3]))
            + raw[at:]
        )
    else:
        raw = raw[:at] + raw
    check_decode(JSON, raw)


@DECODER_SETTINGS
@given(frames())
def test_valid_requests_round_trip_through_msgpack(frame):
    """Every valid request, re-encoded as MessagePack, decodes to the same Struct in MessagePack mode."""
    if not frame.expect.ok:
        return
    request = frame.expect.request
    try:
        encoded = msgspec.msgpack.encode(request)
    except OverflowError:
        return  # an integer id beyond MessagePack's 64 bits cannot be sent in that mode at all
    assert MSGPACK.decode(encoded) == request


# Inputs found while fuzzing, with their outcome: (frame, code, fragment in the message, reply_to).
REGRESSIONS: list[tuple[str, str, str, Any]] = [
    # Duplicate `type` keys: the envelope sees the last, the decoder the first; still one clean error.
    ('{"type":"ping","type":"nope","id":1}', "unknown_type", "nope", 1),
    ('{"type":"nope","type":"ping","id":1}', "bad_request", "$.type", 1),
    # A lone surrogate anywhere makes the frame malformed, even in a field nobody reads.
    ('{"type":"ping","id":1,"x":"\\ud800"}', "bad_request", "malformed", None),
    ('{"type":"nope","id":"\\ud800"}', "bad_request", "", None),
    ('{"type":"create_session","id":1,"document_id":"\\ud800","section_id":"s"}', "bad_request", "", None),
    # A request id of any integer size msgspec will convert, and one beyond.
    ('{"type":"nope","id":1000000000000000000000000000000}', "unknown_type", "nope", 10**30),
    ('{"type":"nope","id":' + "9" * 4301 + "}", "bad_request", "", None),
    ('{"type":"ping","id":1.0}', "bad_request", "$.id", None),
    ('{"type":"ping","id":true}', "bad_request", "$.id", None),
    ('{"type":"ping","id":"' + "i" * 65 + '"}', "bad_request", "$.id", None),
    # Control characters: C0, DEL and C1 are refused in ids; other invisible characters are fine.
    ('{"type":"subscribe","id":2,"document_id":"d","section_id":"a\\u007f"}', "bad_request", "$.section_id", 2),
    ('{"type":"subscribe","id":2,"document_id":"d","section_id":"s","epoch":"\\u009f"}', "bad_request", "$.epoch", 2),
    (
        '{"type":"send_message","id":2,"session_id":"s","text":"t","client_msg_id":"a\\u0000"}',
        "bad_request",
        "$.client_msg_id",
        2,
    ),
    ('{"type":"create_session","id":2,"document_id":"d","section_id":"s","title":"\\r"}', "bad_request", "$.title", 2),
    # Numbers out of their bounds, or not integers.
    ('{"type":"history","id":3,"session_id":"x","before_seq":-1}', "bad_request", "$.before_seq", 3),
    ('{"type":"history","id":3,"session_id":"x","limit":null}', "bad_request", "$.limit", 3),
    ('{"type":"history","id":3,"session_id":"x","after_seq":1e999}', "bad_request", "$.after_seq", 3),
    (
        '{"type":"subscribe","id":3,"document_id":"d","section_id":"s","since_offset":1.0}',
        "bad_request",
        "$.since_offset",
        3,
    ),
    ('{"type":"history","id":3,"session_id":"x","after_seq":' + "9" * 5000 + "}", "bad_request", "$.after_seq", 3),
    # Nesting: refused cleanly, in a field nobody reads as in one that is typed.
    ('{"type":"ping","id":4,"x":' + "[" * 20000 + "]" * 20000 + "}", "bad_request", "recursion", None),
    ('{"type":"ping","id":4,"x":' + '{"a":' * 10000 + "1" + "}" * 10000 + "}", "bad_request", "recursion", None),
    # The typed field fails fast, but the envelope that looks for `id` cannot read past the nesting either.
    (
        '{"type":"create_session","id":4,"document_id":' + "[" * 20000 + "]" * 20000 + ',"section_id":"s"}',
        "bad_request",
        "$.document_id",
        None,
    ),
    # Not an object, or not JSON.
    ("", "bad_request", "", None),
    ("   ", "bad_request", "", None),
    ("null", "bad_request", "", None),
    ('"ping"', "bad_request", "", None),
    ("\ufeff" + '{"type":"ping"}', "bad_request", "", None),
    ('{"type":"ping",}', "bad_request", "", None),
    ("{'type':'ping'}", "bad_request", "", None),
    ('{"type":"ping"', "bad_request", "", None),
    ('{"type":"ping"}{"type":"ping"}', "bad_request", "trailing", None),
    ('{"type":"history","id":5,"session_id":"x","after_seq":0,"before_seq":0}', "bad_request", "together", 5),
    # Revision 1.1: seqs start at 1; reactions are 1-32 characters of anything; `on` is a plain bool.
    ('{"type":"edit_message","id":6,"session_id":"s","seq":0,"text":"t"}', "bad_request", "$.seq", 6),
    ('{"type":"delete_message","id":6,"session_id":"s","seq":9007199254740993}', "bad_request", "$.seq", 6),
    ('{"type":"react","id":6,"session_id":"s","seq":1,"reaction":""}', "bad_request", "$.reaction", 6),
    ('{"type":"react","id":6,"session_id":"s","seq":1,"reaction":"r","on":null}', "bad_request", "$.on", 6),
    ('{"type":"react","id":6,"session_id":"s","seq":1,"reaction":"r","on":1}', "bad_request", "$.on", 6),
    # Mentions: at most 20 user names, each 1-64 characters without control characters.
    (
        '{"type":"send_message","id":7,"session_id":"s","text":"t","mentions":["a","b\\u009f"]}',
        "bad_request",
        "$.mentions[1]",
        7,
    ),
    (
        '{"type":"send_message","id":7,"session_id":"s","text":"t","mentions":'
        + json.dumps([f"u{i}" for i in range(21)])
        + "}",
        "bad_request",
        "$.mentions",
        7,
    ),
    (
        '{"type":"edit_message","id":7,"session_id":"s","seq":1,"text":"t","mentions":[""]}',
        "bad_request",
        "$.mentions[0]",
        7,
    ),
    # Listing: an order it knows, a bool filter, 1-1000 sessions, and only cursors it handed out.
    ('{"type":"list_sessions","id":8,"document_id":"d","order":"newest"}', "bad_request", "$.order", 8),
    ('{"type":"list_sessions","id":8,"document_id":"d","closed":"true"}', "bad_request", "$.closed", 8),
    ('{"type":"list_sessions","id":8,"document_id":"d","limit":1001}', "bad_request", "$.limit", 8),
    ('{"type":"list_sessions","id":8,"document_id":"d","cursor":"bm90IGEgY3Vyc29y"}', "bad_request", "`cursor`", 8),
    # Metadata: a JSON object or null, whatever it holds, but JSON numbers a double holds.
    (
        '{"type":"create_session","id":9,"document_id":"d","section_id":"s","metadata":[]}',
        "bad_request",
        "$.metadata",
        9,
    ),
    ('{"type":"update_session","id":9,"session_id":"s","metadata":"{}"}', "bad_request", "$.metadata", 9),
    ('{"type":"update_session","id":9,"session_id":"s","metadata":{"a":1e999}}', "bad_request", "$.metadata[", 9),
    ('{"type":"update_session","id":9,"session_id":"s","title":"\\u0000"}', "bad_request", "$.title", 9),
    (
        '{"type":"create_session","id":9,"document_id":"d","section_id":"s","metadata":{"a":'
        + "[" * 10000
        + "]" * 10000
        + "}}",
        "bad_request",
        "recursion",
        None,
    ),
    ('{"type":"reopen_session","id":10}', "bad_request", "missing required field `session_id`", 10),
]


@pytest.mark.parametrize(
    ("raw", "code", "fragment", "reply_to"), REGRESSIONS, ids=[f"regression-{i}" for i in range(len(REGRESSIONS))]
)
def test_decoder_regressions(raw, code, fragment, reply_to):
    """Each saved interesting input keeps its outcome."""
    error = check_decode(JSON, raw)
    assert isinstance(error, ChatError), error
    assert (error.code, error.reply_to) == (code, reply_to), error
    assert fragment.lower() in error.message.lower()


def test_error_keeps_a_usable_id_when_type_is_an_out_of_range_number():
    """`{"type":1e999,"id":3}` is valid JSON with a usable id: the error should carry reply_to 3 so the client can match it."""
    error = check_decode(JSON, '{"type":1e999,"id":3}')
    assert isinstance(error, ChatError) and error.code == "bad_request"
    assert error.reply_to == 3


# 2. A live server ----------------------------------------------------------------

REPLIES: dict[type, tuple[str | None, frozenset[str]]] = {
    # request -> (the reply's type on success, the error codes it may get instead)
    CreateSession: ("session_created", frozenset({"rate_limited", "too_large"})),
    GetSession: ("session", frozenset({"not_found"})),
    ListSessions: ("sessions", frozenset()),
    SendMessage: ("message_ack", frozenset({"not_found", "conflict", "too_large", "rate_limited"})),
    History: ("history", frozenset({"not_found"})),
    CloseSession: ("session_closed", frozenset({"not_found", "conflict"})),
    Subscribe: ("subscribed", frozenset({"rate_limited", "too_large"})),
    Unsubscribe: ("unsubscribed", frozenset()),
    Typing: (None, frozenset({"not_found", "conflict", "rate_limited"})),
    Ping: ("pong", frozenset()),
    EditMessage: ("message_edited", frozenset({"not_found", "forbidden", "conflict", "too_large"})),
    DeleteMessage: ("message_deleted", frozenset({"not_found", "forbidden"})),
    React: ("reaction", frozenset({"not_found", "conflict", "too_large"})),
    UpdateSession: ("session_updated", frozenset({"not_found", "forbidden", "too_large"})),
    ReopenSession: ("session_reopened", frozenset({"not_found", "conflict"})),
    MarkRead: ("read_marked", frozenset({"not_found", "bad_request"})),  # bad_request: past the last seq
    WatchDocument: ("document", frozenset()),
    MoveSessions: ("sessions_moved", frozenset({"not_found", "bad_request", "too_large"})),
    UnwatchDocument: ("unwatched", frozenset()),
}
assert set(REPLIES) == set(REQUEST_CLASSES.values())
STORED_EVENTS = {
    "session_moved",
    "session_created",
    "message",
    "session_closed",
    "message_edited",
    "message_deleted",
    "reaction",
    "session_updated",
    "session_reopened",
}


def is_pushed_event(frame: dict) -> bool:
    """Frames the server pushes on its own: presence, typing, mentions, summaries, and stored events (which carry `offset`)."""
    return (
        frame["type"] in ("presence", "typing")
        or (frame["type"] in ("mentioned", "section_summary") and "reply_to" not in frame)
        or (frame["type"] in STORED_EVENTS and "offset" in frame and "reply_to" not in frame)
    )


# The chat as PROTOCOL.md describes it, over the arena's sessions ----------------------


def distinct(names: list[str] | None) -> list[str]:
    """Mentions as stored: repeats removed (the first of each kept)."""
    return list(dict.fromkeys(names or []))


@dataclass
class MessageModel:
    author: str
    text: str
    client_msg_id: str | None = None
    mentions: list[str] = field(default_factory=list)
    deleted: bool = False
    reactions: dict[str, list[str]] = field(default_factory=dict)  # reaction -> its users, in the order they gave it
    first_text: str = ""  # as sent

    def check(self, got: dict, seq: int) -> None:
        expected = (seq, self.author, self.text, self.mentions, self.reactions, self.deleted)
        actual = (
            got["seq"],
            got["author"],
            got["text"],
            got["mentions"],
            got["reactions"],
            got["deleted_at"] is not None,
        )
        assert actual == expected, f"message {actual!r:.300} where the model holds {expected!r:.300}"


@dataclass
class SessionModel:
    created_by: str
    closed: bool = False
    title: str | None = None
    metadata: dict[str, Any] | None = None
    messages: list[MessageModel] = field(default_factory=list)  # seq N at index N - 1

    def message(self, seq: int) -> MessageModel | None:
        return self.messages[seq - 1] if seq <= len(self.messages) else None  # seq >= 1 by its type

    def unread(self, user: str, marker: int) -> int:
        """PROTOCOL.md: messages past the user's marker that are neither the user's own nor deleted."""
        return sum(1 for m in self.messages[marker:] if m.author != user and not m.deleted)

    def unread_mentions(self, user: str, marker: int) -> int:
        return sum(1 for m in self.messages[marker:] if m.author != user and not m.deleted and user in m.mentions)

    def check(self, got: dict, session_id: str) -> None:
        expected = (session_id, self.created_by, self.closed, self.title, self.metadata, len(self.messages))
        actual = (got["session_id"], got["created_by"], got["closed"], got["title"], got["metadata"], got["last_seq"])
        assert actual == expected, f"session {actual!r:.300} where the model holds {expected!r:.300}"


def no_check(reply: dict) -> None:
    pass


@dataclass
class Outcome:
    """The answer a valid request must get: a reply type or an error code, and what a reply must hold."""

    answer: str | None  # None: no reply at all (typing)
    check: Callable[[dict], None] = no_check
    notifies: tuple[str, ...] = ()  # users due a `mentioned` event once the reply is in


class ChatModel:
    """The arena's sessions as the chat must hold them, and the answer PROTOCOL.md's rules give each request.

    The rules are checked in PROTOCOL.md's order: shape and bounds (too_large for
    text and metadata), the session exists, the seq exists, the user is the
    author or creator where that is required, a repeat that changes nothing gets
    the normal reply, the session is closed or the message deleted (conflict),
    a 21st distinct reaction. Open mode: nobody is a moderator, every document is
    granted. Sessions outside the arena are unknown to it (and to the fuzzer's ids).
    """

    def __init__(self, max_text_chars: int, max_subscriptions: int):
        self.max_text_chars = max_text_chars
        self.max_subscriptions = max_subscriptions
        self.sessions: dict[str, SessionModel] = {}
        self.created: dict[tuple[str, str, str, str], str] = {}  # (user, document, section, idempotency key) -> session
        self.subscribed: dict[str, set[tuple[str, str]]] = {"json": set(), "msgpack": set()}
        self.watched: dict[str, set[str]] = {"json": set(), "msgpack": set()}
        self.mentions_due: Counter[str] = Counter()
        # (user, session) -> the least and the most the user's read marker may be. Exact but for one
        # case PROTOCOL.md leaves open: a retry that returns another user's message (does it move
        # the retrier's marker?).
        self.markers: dict[tuple[str, str], tuple[int, int]] = {}

    def check_read_state(self, reply: dict, listed: list[dict], user: str) -> None:
        """`read` and `unread` of a `sessions` or `subscribed` reply: every listed session, the model's where it knows."""
        ids = {got["session_id"] for got in listed}
        assert set(reply["read"]) == ids == set(reply["unread"]), f"read {reply['read']}, unread {reply['unread']}"
        for session_id in ids & set(self.sessions):
            session, (low, high) = self.sessions[session_id], self.markers.get((user, session_id), (0, 0))
            read, unread = reply["read"][session_id], reply["unread"][session_id]
            assert low <= read <= high, f"{user}'s marker in {session_id} is {read}, the model's {low}..{high}"
            assert (
                session.unread(user, high) <= unread <= session.unread(user, low)
            ), f"{user} has {unread} unread in {session_id}; the model {session.unread(user, high)}..{session.unread(user, low)}"

    def predict(self, request: Any, user: str, mode: str) -> Outcome | None:
        """The outcome `request` from `user` must have now; None where the model cannot tell."""
        return getattr(self, "_" + request.__struct_config__.tag)(request, user, mode)

    def _create_session(self, request: CreateSession, user: str, mode: str) -> Outcome:
        if request.metadata is not None and json_size(request.metadata) > METADATA_LIMIT:
            return Outcome("too_large")
        key = request.idempotency_key
        earlier = None if key is None else self.created.get((user, request.document_id, request.section_id, key))

        def check(reply: dict) -> None:
            got = reply["session"]
            if earlier is not None:
                assert (
                    got["session_id"] == earlier
                ), f"a repeated idempotency key gave {got['session_id']}, not {earlier}"
                return
            actual = (got["document_id"], got["section_id"], got["title"], got["metadata"], got["created_by"])
            assert actual == (request.document_id, request.section_id, request.title, request.metadata, user), actual
            assert (got["closed"], got["last_seq"]) == (False, 0), got

        return Outcome("session_created", check)

    def _get_session(self, request: GetSession, user: str, mode: str) -> Outcome:
        session = self.sessions.get(request.session_id)
        if session is None:
            return Outcome("not_found")
        return Outcome("session", lambda reply: session.check(reply["session"], request.session_id))

    def _list_sessions(self, request: ListSessions, user: str, mode: str) -> Outcome:
        def check(reply: dict) -> None:
            listed = reply["sessions"]
            assert len(listed) <= request.limit and "next_cursor" in reply, reply
            ids = [got["session_id"] for got in listed]
            assert len(ids) == len(set(ids)), f"a session twice in one page: {ids}"
            for got in listed:
                assert got["document_id"] == request.document_id, got
                assert request.section_id is None or got["section_id"] == request.section_id, got
                assert request.closed is None or got["closed"] == request.closed, got
                if got["session_id"] in self.sessions:
                    self.sessions[got["session_id"]].check(got, got["session_id"])
            order = [got["created_at" if request.order == "created" else "last_activity_at"] for got in listed]
            assert order == sorted(order, reverse=request.order == "activity"), f"not in {request.order} order: {order}"
            self.check_read_state(reply, listed, user)

        return Outcome("sessions", check)

    def _send_message(self, request: SendMessage, user: str, mode: str) -> Outcome:
        if len(request.text) > self.max_text_chars:
            return Outcome("too_large")
        session = self.sessions.get(request.session_id)
        if session is None:
            return Outcome("not_found")
        if request.client_msg_id is not None:
            for seq, original in enumerate(session.messages, 1):
                if original.client_msg_id == request.client_msg_id:
                    return Outcome("message_ack", self._check_original(original, seq))
        if session.closed:
            return Outcome("conflict")
        mentions = distinct(request.mentions)
        seq = len(session.messages) + 1

        def check(reply: dict) -> None:
            got = reply["message"]
            MessageModel(user, request.text, request.client_msg_id, mentions).check(got, seq)
            assert (got["session_id"], got["client_msg_id"], got["edited_at"]) == (
                request.session_id,
                request.client_msg_id,
                None,
            ), got

        return Outcome("message_ack", check, tuple(name for name in mentions if name != user))

    @staticmethod
    def _check_original(original: MessageModel, seq: int) -> Callable[[dict], None]:
        """A retry's reply: the message stored first, as it is now or as first sent; a deleted one only as its tombstone."""
        deleted, texts, author = original.deleted, {original.text, original.first_text}, original.author

        def check(reply: dict) -> None:
            got = reply["message"]
            assert (got["seq"], got["author"]) == (seq, author), f"a retry answered with {got!r:.300}, not seq {seq}"
            if deleted:
                assert (got["text"], got["deleted_at"] is not None) == ("", True), f"a deleted message served: {got}"
            else:
                assert got["text"] in texts, f"a retry answered with text {got['text']!r:.100}, not {texts!r:.200}"

        return check

    def _history(self, request: History, user: str, mode: str) -> Outcome:
        session = self.sessions.get(request.session_id)
        if session is None:
            return Outcome("not_found")
        seqs = range(1, len(session.messages) + 1)
        if request.after_seq is not None:
            candidates = [seq for seq in seqs if seq > request.after_seq]
            page = candidates[: request.limit]
        else:
            before = request.before_seq if request.before_seq is not None else len(seqs) + 1
            candidates = [seq for seq in seqs if seq < before]
            page = candidates[-request.limit :]
        has_more = len(candidates) > len(page)

        def check(reply: dict) -> None:
            got = reply["messages"]
            assert reply["session_id"] == request.session_id, reply
            assert ([message["seq"] for message in got], reply["has_more"]) == (page, has_more), (
                f"history page {[message['seq'] for message in got]}, has_more {reply['has_more']}; "
                f"PROTOCOL.md gives {page}, {has_more}"
            )
            for message in got:
                session.messages[message["seq"] - 1].check(message, message["seq"])

        return Outcome("history", check)

    def _close_session(self, request: CloseSession, user: str, mode: str) -> Outcome:
        session = self.sessions.get(request.session_id)
        if session is None:
            return Outcome("not_found")
        if session.closed:
            return Outcome("conflict")
        closed = SessionModel(session.created_by, True, session.title, session.metadata, session.messages)
        return Outcome("session_closed", lambda reply: closed.check(reply["session"], request.session_id))

    def _reopen_session(self, request: ReopenSession, user: str, mode: str) -> Outcome:
        session = self.sessions.get(request.session_id)
        if session is None:
            return Outcome("not_found")
        if not session.closed:
            return Outcome("conflict")
        reopened = SessionModel(session.created_by, False, session.title, session.metadata, session.messages)
        return Outcome("session_reopened", lambda reply: reopened.check(reply["session"], request.session_id))

    def _update_session(self, request: UpdateSession, user: str, mode: str) -> Outcome:
        if isinstance(request.metadata, dict) and json_size(request.metadata) > METADATA_LIMIT:
            return Outcome("too_large")
        session = self.sessions.get(request.session_id)
        if session is None:
            return Outcome("not_found")
        if session.created_by != user:
            return Outcome("forbidden")
        title = session.title if request.title is msgspec.UNSET else request.title
        metadata = session.metadata if request.metadata is msgspec.UNSET else request.metadata
        updated = SessionModel(session.created_by, session.closed, title, metadata, session.messages)
        return Outcome("session_updated", lambda reply: updated.check(reply["session"], request.session_id))

    def _message_of(self, session_id: str, seq: int) -> tuple[SessionModel, MessageModel] | Outcome:
        session = self.sessions.get(session_id)
        message = None if session is None else session.message(seq)
        if session is None or message is None:
            return Outcome("not_found")
        return session, message

    def _edit_message(self, request: EditMessage, user: str, mode: str) -> Outcome:
        if len(request.text) > self.max_text_chars:
            return Outcome("too_large")
        found = self._message_of(request.session_id, request.seq)
        if isinstance(found, Outcome):
            return found
        session, message = found
        if message.author != user:
            return Outcome("forbidden")
        mentions = message.mentions if request.mentions is None else distinct(request.mentions)
        edited = MessageModel(user, request.text, message.client_msg_id, mentions, False, dict(message.reactions))
        if not message.deleted and (request.text, mentions) == (message.text, message.mentions):
            return Outcome("message_edited", lambda reply: edited.check(reply["message"], request.seq))
        if session.closed or message.deleted:
            return Outcome("conflict")

        def check(reply: dict) -> None:
            edited.check(reply["message"], request.seq)
            assert reply["message"]["edited_at"] is not None, reply

        newly = tuple(name for name in mentions if name not in message.mentions and name != user)
        return Outcome("message_edited", check, newly)

    def _delete_message(self, request: DeleteMessage, user: str, mode: str) -> Outcome:
        found = self._message_of(request.session_id, request.seq)
        if isinstance(found, Outcome):
            return found
        _, message = found
        if message.author != user:
            return Outcome("forbidden")
        tombstone = MessageModel(message.author, "", message.client_msg_id, [], True, {})
        return Outcome("message_deleted", lambda reply: tombstone.check(reply["message"], request.seq))

    def _react(self, request: React, user: str, mode: str) -> Outcome:
        found = self._message_of(request.session_id, request.seq)
        if isinstance(found, Outcome):
            return found
        session, message = found
        expected = (request.session_id, request.seq, request.reaction, user, request.on)

        def check(reply: dict) -> None:
            actual = (reply["session_id"], reply["seq"], reply["reaction"], reply["user"], reply["on"])
            assert actual == expected and isinstance(reply["at"], str), reply

        if (user in message.reactions.get(request.reaction, [])) == request.on:
            return Outcome("reaction", check)  # as the user already is: nothing changes
        if session.closed or message.deleted:
            return Outcome("conflict")
        if request.on and request.reaction not in message.reactions and len(message.reactions) >= REACTION_LIMIT:
            return Outcome("too_large")
        return Outcome("reaction", check)

    def room_for(self, mode: str, key: Any) -> bool:
        """Whether the connection may subscribe or watch (subscriptions and watched documents count together)."""
        taken = self.subscribed[mode] | self.watched[mode]
        return key in taken or len(taken) < self.max_subscriptions

    def _subscribe(self, request: Subscribe, user: str, mode: str) -> Outcome | None:
        key = (request.document_id, request.section_id)
        if not self.room_for(mode, key):
            return None  # PROTOCOL.md names no code for one subscription too many

        def check(reply: dict) -> None:
            assert (reply["document_id"], reply["section_id"]) == key, reply
            self.check_read_state(reply, reply["sessions"], user)
            for got in reply["sessions"]:
                if got["session_id"] in self.sessions:
                    self.sessions[got["session_id"]].check(got, got["session_id"])

        return Outcome("subscribed", check)

    def _watch_document(self, request: WatchDocument, user: str, mode: str) -> Outcome | None:
        if not self.room_for(mode, request.document_id):
            return None

        def check(reply: dict) -> None:
            assert reply["document_id"] == request.document_id, reply
            sections = [summary["section_id"] for summary in reply["sections"]]
            assert len(sections) == len(set(sections)), f"a section twice: {sections}"
            for summary in reply["sections"]:
                counts = [summary[name] for name in ("sessions", "open_sessions", "messages", "unread", "mentions")]
                assert summary["sessions"] >= 1 and all(n >= 0 for n in counts), f"not a summary: {summary}"
                assert (
                    summary["open_sessions"] <= summary["sessions"] and summary["mentions"] <= summary["unread"]
                ), summary

        return Outcome("document", check)

    def _move_sessions(self, request: MoveSessions, user: str, mode: str) -> Outcome | None:
        if request.from_section_id == request.to_section_id:
            return Outcome("bad_request")  # checked first
        ids = request.session_ids
        if ids is not None and len(set(ids)) != len(ids):
            return Outcome("bad_request")
        if request.document_id == "d":
            return None  # the arena's document: the model does not follow its sessions between sections
        if ids:
            return Outcome("not_found")  # no fuzzed id names a session (they are uuids)

        def check(reply: dict) -> None:  # sessions other frames created in that section moved, if any
            moved = (reply["document_id"], reply["from_section_id"], reply["to_section_id"])
            assert moved == (request.document_id, request.from_section_id, request.to_section_id), reply
            listed = [(got["document_id"], got["section_id"]) for got in reply["sessions"]]
            assert set(listed) <= {(request.document_id, request.to_section_id)}, reply
            assert len({got["session_id"] for got in reply["sessions"]}) == len(listed), reply

        return Outcome("sessions_moved", check)

    def _unwatch_document(self, request: UnwatchDocument, user: str, mode: str) -> Outcome:
        return Outcome("unwatched", lambda reply: assert_equal(reply["document_id"], request.document_id))

    def _mark_read(self, request: MarkRead, user: str, mode: str) -> Outcome:
        session = self.sessions.get(request.session_id)
        if session is None:
            return Outcome("not_found")
        if request.seq > len(session.messages):
            return Outcome("bad_request")  # PROTOCOL.md: from 0 to the session's last_seq
        low, high = self.markers.get((user, request.session_id), (0, 0))
        least, most = max(low, request.seq), max(high, request.seq)  # at or below the marker: the marker

        def check(reply: dict) -> None:
            assert reply["session_id"] == request.session_id, reply
            assert least <= reply["seq"] <= most, f"read_marked {reply['seq']}, the model's {least}..{most}"

        return Outcome("read_marked", check)

    def _unsubscribe(self, request: Unsubscribe, user: str, mode: str) -> Outcome:
        key = (request.document_id, request.section_id)
        return Outcome("unsubscribed", lambda reply: assert_equal((reply["document_id"], reply["section_id"]), key))

    def _typing(self, request: Typing, user: str, mode: str) -> Outcome:
        session = self.sessions.get(request.session_id)
        if session is None:
            return Outcome("not_found")
        return Outcome("conflict" if session.closed else None)

    def _ping(self, request: Ping, user: str, mode: str) -> Outcome:
        return Outcome("pong")

    def observe(self, request: Any, user: str, mode: str, reply: dict) -> None:
        """What a successful reply tells of the state now (the model follows the server even where a check failed)."""
        session = self.sessions.get(getattr(request, "session_id", ""))
        match request:
            case CreateSession(idempotency_key=str(key)):
                self.created.setdefault(
                    (user, request.document_id, request.section_id, key), reply["session"]["session_id"]
                )
            case Subscribe():
                self.subscribed[mode].add((request.document_id, request.section_id))
            case Unsubscribe():
                self.subscribed[mode].discard((request.document_id, request.section_id))
            case WatchDocument():
                self.watched[mode].add(request.document_id)
            case UnwatchDocument():
                self.watched[mode].discard(request.document_id)
        if session is None:
            return
        match request:
            case SendMessage() if reply["message"]["seq"] == len(session.messages) + 1:
                got = reply["message"]
                session.messages.append(
                    MessageModel(
                        got["author"], got["text"], got["client_msg_id"], got["mentions"], first_text=got["text"]
                    )
                )
                self.markers[(user, request.session_id)] = (got["seq"], got["seq"])  # sending moves the sender's marker
            case SendMessage() if reply["message"]["author"] != user:  # a retry answered with another's message
                low, high = self.markers.get((user, request.session_id), (0, 0))
                self.markers[(user, request.session_id)] = (low, max(high, reply["message"]["seq"]))
            case MarkRead():
                self.markers[(user, request.session_id)] = (reply["seq"], reply["seq"])
            case CloseSession() | ReopenSession() | UpdateSession():
                got = reply["session"]
                session.closed, session.title, session.metadata = got["closed"], got["title"], got["metadata"]
            case EditMessage() | DeleteMessage():
                message, got = session.messages[request.seq - 1], reply["message"]
                message.text, message.mentions, message.deleted = (
                    got["text"],
                    got["mentions"],
                    got["deleted_at"] is not None,
                )
                message.reactions = got["reactions"]
            case React():
                reactions = session.messages[request.seq - 1].reactions
                users = reactions.setdefault(reply["reaction"], [])
                if reply["on"] and reply["user"] not in users:
                    users.append(reply["user"])
                elif not reply["on"] and reply["user"] in users:
                    users.remove(reply["user"])
                if not users:
                    del reactions[reply["reaction"]]


def assert_equal(actual: Any, expected: Any) -> None:
    assert actual == expected, f"{actual!r:.300} != {expected!r:.300}"


def encode_for(mode: str, frame: dict) -> str | bytes:
    return msgspec.msgpack.encode(frame) if mode == "msgpack" else msgspec.json.encode(frame).decode()


@dataclass
class Arena:
    url: str
    attackers: dict[str, ScriptClient]
    polite: ScriptClient
    observer: ScriptClient
    polite_doc: str
    model: ChatModel
    session_ids: tuple[str, ...] = ()  # open sessions, then one closed one
    polite_offset: int = 0
    frames_sent: dict[str, int] = field(default_factory=lambda: {"text": 0, "binary": 0})
    answers: Counter = field(default_factory=Counter)
    mentioned: Counter = field(default_factory=Counter)  # `mentioned` events each attacker got
    examples: int = 0
    ids: itertools.count = field(default_factory=itertools.count)

    async def attacker(self, mode: str) -> ScriptClient:
        client = self.attackers[mode]
        if client.websocket.close_code is not None:
            # A previous example failed by closing it; start this one afresh so that
            # Hypothesis can tell which input does it.
            subprotocol = MSGPACK_SUBPROTOCOL if mode == "msgpack" else None
            client = self.attackers[mode] = await ScriptClient.open(
                self.url, name=f"fuzz-{mode}", subprotocol=subprotocol
            )
            self.model.subscribed[mode].clear()
        return client

    def pushed(self, mode: str, frame: dict) -> bool:
        """Whether the server pushed `frame` on its own; counts the `mentioned` events."""
        if frame["type"] == "mentioned" and "reply_to" not in frame:
            user, message = self.attackers[mode].user, frame["message"]
            assert user in message["mentions"] and message["author"] != user, f"{mode} got {frame!r:.600}"
            assert message["session_id"] in self.model.sessions, f"{mode} got {frame!r:.600}"
            self.mentioned[mode] += 1
        return is_pushed_event(frame)

    async def send_and_check(self, mode: str, payload: str | bytes) -> dict | None:
        """Send one frame; the answer must be the one predicted (returned, if there is one)."""
        client = await self.attacker(mode)
        codec = MSGPACK if mode == "msgpack" else JSON
        expected = check_decode(codec, payload)
        for frame in client.take_events():
            self.pushed(mode, frame)
        await client.send_raw(payload)
        self.frames_sent["binary" if isinstance(payload, bytes) else "text"] += 1
        probe = f"probe-{uuid.uuid4().hex}"
        try:
            pong = await client.request("ping", id=probe, timeout=5)
        except Exception as error:
            raise AssertionError(
                f"no pong after {payload!r:.300}: {error!r}, close code {client.websocket.close_code}"
            ) from None
        assert pong == {"type": "pong", "reply_to": probe}
        answers = [frame for frame in client.take_events() if not self.pushed(mode, frame)]
        self.answers.update(frame.get("code", frame["type"]) for frame in answers)
        context = f"{mode} frame {payload!r:.300} -> {answers!r:.600}"
        assert all(frame.get("code") != "internal" for frame in answers), context
        if isinstance(expected, ChatError):
            assert len(answers) == 1, context
            [answer] = answers
            assert answer["type"] == "error" and answer["code"] == expected.code, context
            assert answer["message"] and answer["temporary"] is False, context
            assert answer.get("reply_to") == expected.reply_to, context
            assert ("reply_to" in answer) == (expected.reply_to is not None), context
            return answer
        reply_type = REPLIES[type(expected)][0]
        outcome = self.model.predict(expected, client.user, mode)
        try:
            self.check_answer(expected, answers, outcome, context)
        finally:
            if len(answers) == 1 and answers[0]["type"] == reply_type:
                self.model.observe(expected, client.user, mode, answers[0])
        return answers[0] if answers else None

    def check_answer(self, request: Any, answers: list[dict], outcome: Outcome | None, context: str) -> None:
        reply_type, error_codes = REPLIES[type(request)]
        if outcome is not None and outcome.answer is None:
            assert not answers, f"{context}: PROTOCOL.md gives no reply"
            return
        if reply_type is None and not answers:
            return  # typing: no reply on success
        assert len(answers) == 1, context
        [answer] = answers
        if answer["type"] == "error":
            assert answer["code"] in error_codes, context
        else:
            assert answer["type"] == reply_type, context
        assert answer.get("reply_to") == request.id and ("reply_to" in answer) == (request.id is not None), context
        if outcome is None:
            return
        got = answer["code"] if answer["type"] == "error" else answer["type"]
        assert got == outcome.answer, f"{context}: PROTOCOL.md's rules give {outcome.answer}"
        if answer["type"] == "error":
            assert answer["message"] and answer["temporary"] is False, context
            return
        try:
            outcome.check(answer)
        except AssertionError as error:
            raise AssertionError(f"{context}: {error}") from None
        self.model.mentions_due.update(outcome.notifies)

    async def expect(self, mode: str, answer: str | None, type: str, **fields: Any) -> dict | None:
        """Send a valid request whose answer this test states; the model must agree, and then the server."""
        payload = encode_for(mode, {"type": type, "id": f"rule-{next(self.ids)}", **fields})
        request = (MSGPACK if mode == "msgpack" else JSON).decode(payload)
        outcome = self.model.predict(request, self.attackers[mode].user, mode)
        assert outcome is not None and outcome.answer == answer, f"the model gives {outcome} for {fields!r:.300}"
        return await self.send_and_check(mode, payload)

    async def new_session(self, mode: str, **fields: Any) -> str:
        """A session of the arena's (document "d", section "s"), created by `mode`'s user."""
        reply = await self.expect(mode, "session_created", "create_session", document_id="d", section_id="s", **fields)
        assert reply is not None
        session_id = reply["session"]["session_id"]
        self.model.sessions[session_id] = SessionModel(self.attackers[mode].user, metadata=fields.get("metadata"))
        return session_id

    async def keep_sessions(self) -> None:
        """Replace the open sessions the fuzzer closed, and close the closed one again if it reopened it."""
        modes = {client.user: mode for mode, client in self.attackers.items()}
        session_ids = list(self.session_ids)
        for index, session_id in enumerate(session_ids[:-1]):
            session = self.model.sessions[session_id]
            if session.closed:
                mode = modes[session.created_by]
                session_ids[index] = await self.new_session(mode)
                await self.expect(mode, "message_ack", "send_message", session_id=session_ids[index], text="anew")
        if not self.model.sessions[session_ids[-1]].closed:
            await self.expect("json", "session_closed", "close_session", session_id=session_ids[-1])
        self.session_ids = tuple(session_ids)

    async def check_mentions(self, timeout: float = 5.0) -> None:
        """Each attacker has had the `mentioned` events due to it (they come on another connection, so wait)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for mode, client in self.attackers.items():
                for frame in client.take_events():
                    self.pushed(mode, frame)
            due = {mode: self.model.mentions_due[client.user] for mode, client in self.attackers.items()}
            got = {mode: self.mentioned[mode] for mode in self.attackers}
            if got == due:
                return
            assert all(got[mode] <= due[mode] for mode in due), f"`mentioned` events {got}, only {due} due"
            assert asyncio.get_running_loop().time() < deadline, f"`mentioned` events {got}, {due} due"
            await asyncio.sleep(0.01)

    async def polite_round(self) -> None:
        """The polite client creates a session and posts; its subscriber sees both, in offset order."""
        n = self.examples
        created = await self.polite.call(
            "create_session", document_id=self.polite_doc, section_id="s", idempotency_key=f"k{n}", timeout=5
        )
        session_id = created["session"]["session_id"]
        ack = await self.polite.call(
            "send_message", session_id=session_id, text=f"still here {n}", client_msg_id=f"m{n}", timeout=5
        )
        assert ack["message"]["seq"] == 1
        event = await self.observer.next_event("session_created", timeout=5)
        assert (event["offset"], event["session"]["session_id"]) == (self.polite_offset + 1, session_id)
        event = await self.observer.next_event("message", timeout=5)
        assert (event["offset"], event["message"]) == (self.polite_offset + 2, ack["message"])
        self.polite_offset += 2


@pytest.fixture
async def arena(app):
    url = app.url
    attackers = {
        "json": await ScriptClient.open(url, name="fuzz-json"),
        "msgpack": await ScriptClient.open(url, name="fuzz-msgpack", subprotocol=MSGPACK_SUBPROTOCOL),
    }
    polite = await ScriptClient.open(url, name="polite")
    observer = await ScriptClient.open(url, name="observer")
    polite_doc = f"polite-{uuid.uuid4().hex}"
    await observer.call("subscribe", document_id=polite_doc, section_id="s")
    limits = attackers["json"].welcome["limits"]
    model = ChatModel(limits["max_text_chars"], limits["max_subscriptions"])
    arena = Arena(url, attackers, polite, observer, polite_doc, model)
    # Real sessions for the fuzzer to hit, in a section it may also subscribe to: one open
    # with a message of each user's, then one closed. Each user may edit only their own.
    sids = [await arena.new_session("json"), await arena.new_session("msgpack"), await arena.new_session("json")]
    await arena.expect("json", "message_ack", "send_message", session_id=sids[0], text="first")
    await arena.expect("msgpack", "message_ack", "send_message", session_id=sids[1], text="second")
    await arena.expect("json", "session_closed", "close_session", session_id=sids[2])
    arena.session_ids = tuple(sids)
    yield arena
    print(
        f"\narena: {arena.examples} Hypothesis examples, frames sent {arena.frames_sent}, answers {dict(arena.answers)}, mentions {dict(arena.mentioned)}, polite events seen in order: {arena.polite_offset}"
    )
    for client in (*arena.attackers.values(), polite, observer):
        await client.close()


def live_frames(session_ids: tuple[str, ...]) -> st.SearchStrategy[tuple[str, str | bytes]]:
    """(connection mode, payload) pairs; every payload under the frame limit."""
    structured = frames(session_ids, max_depth=20_000, defects=LIVE_DEFECTS)

    def as_msgpack(frame: Frame) -> bytes:
        try:
            return msgspec.msgpack.encode(json.loads(frame.raw))
        except (ValueError, TypeError, OverflowError, RecursionError, msgspec.MsgspecError):
            return msgspec.msgpack.encode({"type": "ping", "note": "unencodable frame"})

    return st.one_of(
        structured.map(lambda f: ("json", f.raw)),
        structured.map(lambda f: ("json", f.raw)),
        structured.map(lambda f: ("json", f.raw)),
        structured.map(lambda f: ("json", f.raw)),
        structured.map(lambda f: ("msgpack", as_msgpack(f))),
        structured.map(lambda f: ("msgpack", as_msgpack(f))),
        json_values.map(lambda v: ("json", json.dumps(v, ensure_ascii=False))),
        st.text(ANY_CHARS, max_size=200).map(lambda t: ("json", t)),
        st.binary(max_size=200).map(lambda b: ("json", b)),
        st.binary(max_size=200).map(lambda b: ("msgpack", b)),
        msgpack_objects.map(lambda v: ("msgpack", msgspec.msgpack.encode(v))),
        st.text(ANY_CHARS, max_size=50).map(lambda t: ("msgpack", t)),
    ).filter(lambda pair: len(pair[1] if isinstance(pair[1], bytes) else pair[1].encode()) < MAX_FRAME_BYTES - 1000)


@pytest.mark.timeout(60)
@settings(
    max_examples=LIVE_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
async def test_live_server_answers_every_fuzzed_frame(arena, data):
    """Each generated frame gets its predicted answer and the connection stays usable; the polite client never notices."""
    await arena.keep_sessions()
    batch = data.draw(st.lists(live_frames(arena.session_ids), min_size=1, max_size=6), label="frames")
    arena.examples += 1
    async with asyncio.timeout(20):
        polite = asyncio.create_task(arena.polite_round())
        try:
            for mode, payload in batch:
                await arena.send_and_check(mode, payload)
        finally:
            await polite
        await arena.check_mentions()


EDGE_LISTING = ListSessions(document_id="edge")  # the boundary test's list_sessions frames: their cursors
EDGE_CURSOR = EDGE_LISTING.cursor_after(
    Session(
        session_id=str(uuid.UUID(int=7)),
        document_id="edge",
        section_id="s",
        title=None,
        created_by="u",
        created_at="2026-11-25T08:00:00.000Z",
        closed=False,
        last_seq=0,
    )
)

BOUNDARY_VALUES: dict[Kind, list[Any]] = {
    ID: ["a", "x" * 128, "\U0001f600" * 128, "../../etc/passwd", "\u2028", " ", "\ufeff", "NUL\\0"],
    KEY: ["k", "k" * 64, "\U0010ffff" * 64],
    TITLE: ["", "t" * 200, "\U0001f600" * 200, None],
    TEXT: ["x", "\x00", "\n" * 10, "x" * 8000, "x" * 8001, "\U0001f600" * 8000, "\x7f\x9f\u2028"],
    REACTION: ["r", "x" * 32, "\U0001f600" * 32, "\x00", "\n", " "],
    COUNT: [0, 1, 2**53, None],
    LIMIT: [1, 200],
    SEQ: [1, 2, 2**53],
    SESSION_LIMIT: [1, 1000],
    BOOL: [True, False, None],
    ORDER: ["created", "activity"],
    USER_NAMES: [
        [],
        ["u"],
        ["x" * 64],
        ["\U0001f600" * 64],
        [f"user {i}" for i in range(20)],
        ["fuzz-msgpack", "fuzz-msgpack", "fuzz-json", "polite"],
        None,
    ],
    SESSION_IDS: [["s"], ["x" * 64], [f"s{i}" for i in range(1000)], ["s", "s"], None],
    METADATA: [
        {},
        {"anchor": {"quote": "é\u2028\x00", "at": [1, 2.5, -0.0, True, None]}, "n": 2**64 - 1, "m": -(2**63)},
        sized_metadata(METADATA_LIMIT),
        sized_metadata(METADATA_LIMIT + 1),
        sized_metadata(METADATA_LIMIT, "\U0001f600"),
        sized_metadata(METADATA_LIMIT + 1, "é"),
        sized_metadata(METADATA_LIMIT, "\x01"),
        sized_metadata(METADATA_LIMIT + 1, "\n"),
        None,
    ],
    CURSOR: [EDGE_CURSOR, None],
    REQID: [1, 0, -1, "i", "i" * 64, 2**63 - 1, -(2**63), 2**64 - 1, 10**30, "\x00", "\n"],
}
# Just past the edges (and the wrong kind of value): the codec's bad_request, from the server too.
BEYOND_VALUES: dict[Kind, list[Any]] = {
    ID: ["", "x" * 129, "\U0001f600" * 129, "a\x00", "\x9f", None, 1],
    KEY: ["", "k" * 65, "\x7f", None, 1],
    TITLE: ["t" * 201, "\n", 1],
    TEXT: ["", None, 1],
    REACTION: ["", "x" * 33, None, 1],
    COUNT: [-1, 2**53 + 1, 1.0, "1"],
    LIMIT: [0, 201, None],
    SEQ: [0, -1, 2**53 + 1, None, 1.0, "1"],
    SESSION_LIMIT: [0, 1001, None],
    BOOL: [0, 1, "true", [True]],
    ORDER: ["", "Created", "newest", None, 1],
    USER_NAMES: [[f"u{i}" for i in range(21)], [""], ["x" * 65], ["a\x00"], ["u", 1], ["u", None], "u", {}],
    SESSION_IDS: [[], [f"s{i}" for i in range(1001)], [""], ["x" * 65], ["a\x00"], ["s", 1], "s", {}],
    METADATA: [[], "x", 5, True, [{"a": 1}]],
    CURSOR: [
        "",
        "c" * 1025,
        "c" * 1024,
        EDGE_LISTING.cursor_after(Session("x", "d", "s", None, "u", "", False, 0))[:-2],
        1,
    ],
    REQID: ["", "i" * 65, 1.5, True, [1]],
}
assert (
    set(BOUNDARY_VALUES)
    == set(BEYOND_VALUES)
    == {spec.kind for fields in SCHEMA.values() for spec in fields.values()} | {REQID}
)
# Writes that end what others test (a deleted message, a reopened or closed session) come last.
LAST = ("delete_message", "reopen_session", "close_session")


@pytest.mark.timeout(60)
async def test_live_boundary_values(arena):
    """Every field of every request at the edges of what it accepts and just past them, on both wire formats: the predicted answer each time."""
    open_sid, _, closed_sid = arena.session_ids
    defaults = {ID: "edge", KEY: open_sid, TEXT: "t", SEQ: 1, COUNT: 1, REACTION: "+1"}
    sent = 0
    for tag, fields in sorted(
        SCHEMA.items(), key=lambda item: (LAST.index(item[0]) if item[0] in LAST else -1, item[0])
    ):
        for name, spec in {**fields, "id": ID_FIELD}.items():
            values = BOUNDARY_VALUES[spec.kind] + BEYOND_VALUES[spec.kind]
            if name == "session_id":
                values = values + [open_sid, closed_sid]
            for value in values:
                frame = {"type": tag} | {n: defaults[f.kind] for n, f in fields.items() if f.required}
                frame[name] = value
                for mode in ("json", "msgpack"):
                    try:
                        payload = encode_for(mode, frame)
                    except OverflowError:
                        continue  # 10**30 has no MessagePack encoding
                    await arena.send_and_check(mode, payload)
                    sent += 1
    await arena.check_mentions()
    print(f"\nboundary values: {sent} frames")


@pytest.mark.timeout(60)
async def test_live_chat_rules(arena):
    """The chat-level answers of revision 1.1's requests, each named: the model must give it, and the server."""
    mine, theirs, closed = arena.session_ids  # "first" by fuzz-json, "second" by fuzz-msgpack, closed
    expect, J, M = arena.expect, "json", "msgpack"
    nowhere = "no-such-session"

    # Shape and bounds first, then the session, then the seq, then the author.
    await expect(J, "too_large", "edit_message", session_id=nowhere, seq=1, text="x" * 8001)
    await expect(J, "not_found", "edit_message", session_id=nowhere, seq=1, text="x")
    await expect(J, "not_found", "edit_message", session_id=mine, seq=2, text="no such seq")
    await expect(M, "forbidden", "edit_message", session_id=mine, seq=1, text="not yours")
    await expect(J, "message_edited", "edit_message", session_id=mine, seq=1, text="first")  # changes nothing
    await expect(
        J, "message_edited", "edit_message", session_id=mine, seq=1, text="first, edited",
        mentions=["fuzz-msgpack", "fuzz-msgpack", "fuzz-json", "nobody here"],
    )  # fmt: skip
    await expect(J, "message_edited", "edit_message", session_id=mine, seq=1, text="again")  # mentions kept
    await expect(J, "not_found", "delete_message", session_id=mine, seq=2**53)
    await expect(J, "not_found", "react", session_id=nowhere, seq=1, reaction="+1")

    # Reactions: anyone's; as you already are changes nothing; at most 20 distinct ones.
    for on in (True, True, False, False):
        await expect(M, "reaction", "react", session_id=mine, seq=1, reaction="+1", on=on)
    for i in range(REACTION_LIMIT):
        await expect(J, "reaction", "react", session_id=mine, seq=1, reaction=f"r{i}")
    await expect(J, "too_large", "react", session_id=mine, seq=1, reaction="one too many")
    await expect(M, "reaction", "react", session_id=mine, seq=1, reaction="r0")  # not a new one
    await expect(J, "reaction", "react", session_id=mine, seq=1, reaction="r1", on=False)
    await expect(J, "reaction", "react", session_id=mine, seq=1, reaction="the 20th again")

    # update_session: the creator's; absent is unchanged, null clears; metadata up to 4,096 bytes.
    await expect(M, "forbidden", "update_session", session_id=mine, title="not yours")
    await expect(J, "session_updated", "update_session", session_id=mine, title="t", metadata={"at": [1, 2.5]})
    await expect(J, "too_large", "update_session", session_id=nowhere, metadata=sized_metadata(METADATA_LIMIT + 1, "é"))
    await expect(J, "session_updated", "update_session", session_id=mine, metadata=sized_metadata(METADATA_LIMIT, "é"))
    await expect(J, "session_updated", "update_session", session_id=mine)
    await expect(J, "session_updated", "update_session", session_id=mine, title=None, metadata=None)
    await expect(J, "session_updated", "update_session", session_id=closed, title="closed, and updated")
    await expect(M, "session_updated", "update_session", session_id=theirs, metadata={})
    await expect(J, "too_large", "create_session", document_id="d", section_id="s", metadata=sized_metadata(4097, "\n"))
    await expect(M, "session_created", "create_session", document_id="d2", section_id="s", metadata=sized_metadata(4096, "\U0001f600"))  # fmt: skip

    # Closed sessions: no edits, no new reactions, no messages; deleting still works, again and again.
    await expect(J, "conflict", "reopen_session", session_id=mine)
    await expect(J, "not_found", "reopen_session", session_id=nowhere)
    await expect(M, "session_closed", "close_session", session_id=mine)  # anyone may close
    await expect(J, "conflict", "edit_message", session_id=mine, seq=1, text="closed")
    await expect(J, "conflict", "react", session_id=mine, seq=1, reaction="new")
    await expect(J, "reaction", "react", session_id=mine, seq=1, reaction="r2")  # as J already is
    await expect(J, "conflict", "send_message", session_id=mine, text="closed")
    await expect(M, "forbidden", "delete_message", session_id=mine, seq=1)
    await expect(J, "message_deleted", "delete_message", session_id=mine, seq=1)
    await expect(J, "message_deleted", "delete_message", session_id=mine, seq=1)  # the tombstone again
    await expect(M, "forbidden", "delete_message", session_id=mine, seq=1)  # the author check comes first
    await expect(M, "session_reopened", "reopen_session", session_id=mine)  # anyone may reopen
    await expect(J, "conflict", "edit_message", session_id=mine, seq=1, text="deleted")
    await expect(J, "conflict", "react", session_id=mine, seq=1, reaction="+1")
    await expect(J, "reaction", "react", session_id=mine, seq=1, reaction="+1", on=False)  # changes nothing
    await expect(J, "history", "history", session_id=mine)

    # Mentions notify others, once; a retry returns the original, a deleted one as its tombstone.
    await expect(
        M, "message_ack", "send_message", session_id=theirs, text="hi", client_msg_id="k", mentions=["fuzz-json"]
    )
    await expect(
        M, "message_edited", "edit_message", session_id=theirs, seq=2, text="hi!", mentions=["fuzz-json", "polite"]
    )
    await expect(M, "message_ack", "send_message", session_id=theirs, text="retry", client_msg_id="k")
    await expect(M, "message_deleted", "delete_message", session_id=theirs, seq=2)
    await expect(M, "message_ack", "send_message", session_id=theirs, text="retry", client_msg_id="k")
    await expect(J, "history", "history", session_id=theirs, before_seq=3, limit=1)

    # Read markers: 0..last_seq; at or below the marker the reply is the marker; sending moves it.
    await expect(J, "not_found", "mark_read", session_id=nowhere, seq=0)
    await expect(J, "bad_request", "mark_read", session_id=theirs, seq=3)
    await expect(J, "read_marked", "mark_read", session_id=theirs, seq=0)
    await expect(J, "read_marked", "mark_read", session_id=theirs, seq=2)
    await expect(J, "read_marked", "mark_read", session_id=theirs, seq=1)  # answered with 2
    await expect(M, "read_marked", "mark_read", session_id=mine, seq=0)  # M has not read J's message
    await expect(J, "read_marked", "mark_read", session_id=mine, seq=0)  # J wrote it: read
    await expect(J, "sessions", "list_sessions", document_id="d", section_id="s")
    await expect(M, "sessions", "list_sessions", document_id="d", section_id="s")
    await expect(M, "subscribed", "subscribe", document_id="d", section_id="s")

    # Watching: a summary per section with a session, for this user.
    for mode in (J, M):
        reply = await expect(mode, "document", "watch_document", document_id="d")
        assert reply is not None
        user = arena.attackers[mode].user
        markers = {sid: arena.model.markers.get((user, sid), (0, 0))[0] for sid in arena.model.sessions}
        sessions = arena.model.sessions.items()
        expected = {
            "section_id": "s",
            "sessions": len(sessions),
            "open_sessions": sum(not session.closed for _, session in sessions),
            "messages": sum(not m.deleted for _, session in sessions for m in session.messages),
            "unread": sum(session.unread(user, markers[sid]) for sid, session in sessions),
            "mentions": sum(session.unread_mentions(user, markers[sid]) for sid, session in sessions),
        }
        [summary] = reply["sections"]
        assert {name: summary[name] for name in expected} == expected, (summary, expected)
        await expect(mode, "unwatched", "unwatch_document", document_id="d")
        await expect(mode, "unwatched", "unwatch_document", document_id="d")  # not watching: the same reply

    # Listing pages: each session once, in its order; filters.
    for order in ("created", "activity"):
        seen: list[str] = []
        cursor = None
        while True:
            page = await expect(J, "sessions", "list_sessions", document_id="d", limit=1, order=order, **({"cursor": cursor} if cursor else {}))  # fmt: skip
            assert page is not None
            seen += [session["session_id"] for session in page["sessions"]]
            if (cursor := page["next_cursor"]) is None:
                break
        assert len(seen) == len(set(seen)) and set(arena.session_ids) <= set(seen), seen
        # A cursor is for the listing it came from only.
        await arena.send_and_check(J, encode_for(J, {"type": "list_sessions", "id": 1, "document_id": "d", "closed": False, "cursor": page_cursor(order)}))  # fmt: skip
    for closed_only in (True, False, None):
        await expect(M, "sessions", "list_sessions", document_id="d", section_id="s", closed=closed_only)
    await arena.check_mentions()
    assert dict(arena.mentioned) == {"msgpack": 1, "json": 1}, arena.mentioned


def page_cursor(order: str) -> str:
    return ListSessions(document_id="d", limit=1, order=order).cursor_after(
        Session(str(uuid.UUID(int=1)), "d", "s", None, "u", "2026-11-25T08:00:00.000Z", False, 0)
    )


@pytest.mark.parametrize("request_type", ["list_sessions", "subscribe"])
async def test_empty_listing_carries_read_and_unread(connect, request_type):
    """`read` and `unread` are fields of `sessions` and `subscribed`: empty objects when nothing is listed."""
    async with connect("reader") as client:
        reply = await client.call(request_type, document_id=f"empty-{uuid.uuid4().hex}", section_id="s")
        assert reply["sessions"] == []
        assert (reply.get("read"), reply.get("unread")) == ({}, {}), reply


# MessagePack and JSON do not carry the same values: metadata one of them cannot carry ----------


@pytest.fixture(scope="module")
def spare_server(tmp_path_factory):
    """A server process (not in this event loop: some of these cases leave a section's writer stuck)."""
    server = ServerProcess(tmp_path_factory.mktemp("spare") / "data", *NO_RATE_LIMITS).start()
    yield server
    server.close()


async def test_metadata_integer_beyond_64_bits_reaches_msgpack_clients(spare_server):
    """Refused up front (bad_request): MessagePack could not carry it to the section's other clients."""
    section = f"big-{uuid.uuid4().hex}"
    async with (
        ScriptClient.connect(spare_server.url, name="json-writer") as writer,
        ScriptClient.connect(spare_server.url, name="msgpack-reader", subprotocol=MSGPACK_SUBPROTOCOL) as reader,
    ):
        await reader.call("subscribe", document_id="meta", section_id=section)
        created = await writer.request("create_session", document_id="meta", section_id=section, metadata={"n": 10**30})
        assert created["code"] == "bad_request" and "64 bits" in created["message"], created
        assert (await reader.call("ping"))["type"] == "pong"


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"a": {None: 1}}, id="nil-key"),
        pytest.param({"a": {True: 1}}, id="bool-key"),
        pytest.param({"a": msgspec.msgpack.Ext(5, b"x")}, id="ext"),
        pytest.param({"a": math.nan}, id="nan"),
        pytest.param({"a": math.inf}, id="inf"),
        pytest.param({"a": b"\x00\x01"}, id="bin"),
        pytest.param({"a": datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)}, id="timestamp"),
        pytest.param({"a": {1: "x"}}, id="int-key"),
    ],
)
async def test_metadata_that_json_cannot_carry_is_refused(spare_server, metadata):
    """MessagePack metadata that is not JSON is bad_request: JSON clients could not read it back equal."""
    async with ScriptClient.connect(spare_server.url, name="msgpack-writer", subprotocol=MSGPACK_SUBPROTOCOL) as writer:
        created = await writer.request("create_session", document_id="meta", section_id="s", metadata=metadata)
        assert created["code"] == "bad_request" and "`metadata" in created["message"], created


async def test_json_metadata_in_msgpack_reads_back_equal_over_json(spare_server):
    metadata = {"a": {"b": [1, -1.5, "é", None, True, 2**64 - 1, -(2**63)]}}
    async with (
        ScriptClient.connect(spare_server.url, name="json-reader") as reader,
        ScriptClient.connect(spare_server.url, name="msgpack-writer", subprotocol=MSGPACK_SUBPROTOCOL) as writer,
    ):
        created = await writer.call("create_session", document_id="meta", section_id="s", metadata=metadata)
        got = await reader.request("get_session", session_id=created["session"]["session_id"], timeout=3)
        assert got["type"] == "session" and got["session"]["metadata"] == metadata, got


@pytest.mark.parametrize(
    ("raw", "code", "fragment", "reply_to"), REGRESSIONS, ids=[f"regression-{i}" for i in range(len(REGRESSIONS))]
)
async def test_live_regressions(connect, raw, code, fragment, reply_to):
    """The saved inputs, sent to a real server: the predicted error, and the connection carries on."""
    async with connect("fuzz") as client:
        await client.send_raw(raw)
        error = await client.next_event("error")
        assert (error["code"], error.get("reply_to")) == (code, reply_to)
        assert fragment.lower() in error["message"].lower()
        assert (await client.call("ping"))["type"] == "pong"


async def test_oversized_frame_closes_only_that_connection(connect, app):
    """A frame of exactly max_frame_bytes is served; one byte more closes that connection with 1009 and nobody else's."""
    async with connect("big") as big, connect("polite") as polite, connect("observer") as observer:
        await observer.call("subscribe", document_id="doc", section_id="sec")
        envelope = len(msgspec.json.encode({"type": "ping", "id": "at-limit", "pad": ""}))
        reply = await big.request("ping", id="at-limit", pad="x" * (MAX_FRAME_BYTES - envelope))
        assert reply == {"type": "pong", "reply_to": "at-limit"}

        await big.send_raw('{"type":"ping","pad":"' + "x" * MAX_FRAME_BYTES + '"}')
        assert await big.wait_closed() == 1009

        assert (await polite.call("ping"))["type"] == "pong"
        created = await polite.call("create_session", document_id="doc", section_id="sec")
        ack = await polite.call("send_message", session_id=created["session"]["session_id"], text="unaffected")
        assert (await observer.next_event("message"))["message"] == ack["message"]
        async with connect("newcomer") as newcomer:
            assert (await newcomer.call("ping"))["type"] == "pong"
    async with ScriptClient.connect(app.url, name="big-binary", subprotocol="sectionchat.v1.msgpack") as big:
        await big.send_raw(b"\x00" * (MAX_FRAME_BYTES + 1))
        assert await big.wait_closed() == 1009


async def test_invalid_utf8_text_frame_closes_only_that_connection(connect):
    """A text frame that is not UTF-8 is a WebSocket protocol error (RFC 6455: close 1007); nobody else notices."""
    async with connect("mangler") as mangler, connect("polite") as polite:
        await mangler.websocket.send(b'{"type":"ping","id":1,"x":"\xff"}', text=True)
        assert await mangler.wait_closed() == 1007
        created = await polite.call("create_session", document_id="doc", section_id="sec")
        await polite.call("send_message", session_id=created["session"]["session_id"], text="unaffected")


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.text(ANY_CHARS, max_size=70)
    | st.sampled_from(["a b", "a+b", "%ff", "a&name=b", "x" * 64, "x" * 65, "\u2028", "\u00ad", "\U0001f600" * 64])
)
async def test_handshake_names(app, name):
    """`?name=` is the user when it is 1-64 printable characters, HTTP 400 otherwise; no name gets an anon- user."""
    if name == "":
        async with ScriptClient.connect(app.url, name=name) as client:
            assert client.user.startswith("anon-")
        return
    if 1 <= len(name) <= 64 and name.isprintable():
        async with ScriptClient.connect(app.url, name=name) as client:
            assert client.user == name
            assert (await client.call("ping"))["type"] == "pong"
    else:
        with pytest.raises(InvalidStatus) as refused:
            async with ScriptClient.connect(app.url, name=name):
                pass
        assert refused.value.response.status_code == 400
