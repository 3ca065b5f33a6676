"""Fuzzing with Hypothesis: the decoder on its own (no event loop), then a live server.

Decoder: whatever arrives, `Codec.decode` returns a request Struct or raises
ChatError (`bad_request`/`unknown_type`) with a message, and the error can be
encoded back as the server's reply. Structure-aware frames (valid and invalid
ids, lengths, numbers, surrogates, nesting, trailing garbage, wrong types) must
land in the right outcome class, and a field error must name its path.

Live server: Hypothesis-generated frames over one JSON and one MessagePack
connection; after every frame the server answers as the codec predicts and the
connection still answers `ping`, while a polite client on other connections
keeps creating sessions and sending messages, and its subscriber sees every
event in order.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus

from client import ScriptClient
from protocol import JSON, MSGPACK, ChatError
from protocol.codec import Codec
from protocol.messages import (
    REQUEST_TYPES,
    ClientRequest,
    CloseSession,
    CreateSession,
    Error,
    GetSession,
    History,
    ListSessions,
    Ping,
    Pong,
    SendMessage,
    Subscribe,
    Typing,
    Unsubscribe,
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
    min_len: int = 0
    max_len: int | None = None
    no_control: bool = False
    lo: int = 0
    hi: int = 0

    @property
    def is_str(self) -> bool:
        return self.name in ("id", "key", "title", "text")


ID = Kind("id", 1, 128, True)
KEY = Kind("key", 1, 64, True)
TITLE = Kind("title", 0, 200, True)
TEXT = Kind("text", 1, None, False)
COUNT = Kind("count", lo=0, hi=2**53)
LIMIT = Kind("limit", lo=1, hi=200)
REQID = Kind("reqid")


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
    },
    "get_session": {"session_id": Field(KEY, True, False)},
    "list_sessions": {"document_id": Field(ID, True, False), "section_id": Field(ID, False, True)},
    "send_message": {
        "session_id": Field(KEY, True, False),
        "text": Field(TEXT, True, False),
        "client_msg_id": Field(KEY, False, True),
    },
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


@st.composite
def valid_value(draw, kind: Kind, session_ids: tuple[str, ...] = ()) -> tuple[str, Any]:
    """(raw JSON, the Python value msgspec must decode it to)."""
    if session_ids and draw(st.integers(0, 9)) < 7:
        # Mostly real sessions, so that valid requests reach the chat logic and storage.
        value = draw(st.sampled_from(session_ids))
        return encode_string(value, draw(string_styles)), value
    if kind is TEXT and draw(st.integers(0, 9)) == 0:
        return '"' + "x" * 8001 + '"', "x" * 8001  # over max_text_chars: decodes, the chat says too_large
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


@st.composite
def invalid_value(draw, kind: Kind, nullable: bool) -> tuple[str, str, str]:
    """(raw JSON, "path" if the error must name the field or "malformed", what is wrong)."""
    options: list[tuple[str, st.SearchStrategy[str]]] = []
    if kind.is_str or kind is REQID:
        options.append(
            (
                "wrong type",
                st.sampled_from(
                    WRONG_TYPE_FOR_STR
                    if kind.is_str
                    else ["1.5", "1e999", "-1e999", "true", "false", "[]", "{}", "[1]", '{"id":1}']
                ),
            )
        )
        options.append(
            (
                "surrogate",
                st.tuples(
                    st.text(SAFE_CHARS, max_size=5), st.sampled_from(SURROGATE_ESCAPES), st.text(SAFE_CHARS, max_size=5)
                ).map(lambda t: encode_string(t[0], "ascii")[:-1] + t[1] + encode_string(t[2], "ascii")[1:]),
            )
        )
        if kind.min_len >= 1 or kind is REQID:
            options.append(("empty", st.just('""')))
        max_len = 64 if kind is REQID else kind.max_len
        if max_len is not None:
            options.append(
                (
                    "too long",
                    st.one_of(
                        st.text(SAFE_CHARS, min_size=max_len + 1, max_size=max_len + 30),
                        st.sampled_from(TRICKY_CHARS).map(lambda c, n=max_len: c * (n + 1)),
                    ).flatmap(lambda s: string_styles.map(lambda style: encode_string(s, style))),
                )
            )
        if kind.no_control:
            options.append(
                (
                    "control character",
                    st.tuples(
                        st.text(SAFE_CHARS, max_size=10),
                        st.sampled_from(CONTROL_CHARS),
                        st.text(SAFE_CHARS, max_size=10),
                        string_styles,
                    ).map(lambda t: encode_string(t[0] + t[1] + t[2], t[3])),
                )
            )
        if kind is REQID:
            options.append(("int over 4300 digits", st.integers(4301, 6000).map(lambda n: "9" * n)))
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
    raw = draw(dict(options)[what])
    return raw, ("malformed" if what == "surrogate" else "path"), what


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
def frames(draw, session_ids: tuple[str, ...] = (), max_depth: int = 20_000, defects: list[str] = DEFECTS) -> Frame:
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
        raw, outcome, what = draw(invalid_value(spec.kind, spec.nullable))
        present[name] = (raw, None)
        note = f"{tag}, bad value for {name}: {what}"
        if outcome == "malformed":
            # Not Unicode text: the frame is malformed as a whole; no reply_to can be trusted.
            expect = Expect(code="bad_request", fragments=("malformed", "surrogate", "escape"))
        else:
            reply_to = request_id if name != "id" and valid_request_id(request_id) else None
            expect = Expect(code="bad_request", fragments=(f"`$.{name}`",), reply_to=reply_to)
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


msgpack_objects = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(ANY_CHARS, max_size=20)
    | st.binary(max_size=10)
    | st.sampled_from(sorted(REQUEST_TYPES)),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["type", "id", "document_id", "section_id", "session_id", "text", "limit", "after_seq"])
        | st.text(max_size=5),
        children,
        max_size=5,
    )
    | st.dictionaries(
        st.integers() | st.binary(max_size=4) | st.none() | st.sampled_from([b"type", "type"]), children, max_size=3
    ).filter(lambda d: all(not isinstance(k, int) or -(2**63) <= k < 2**64 for k in d)),
    max_leaves=15,
)


@DECODER_SETTINGS
@given(msgpack_objects, st.data())
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
    CreateSession: ("session_created", frozenset({"rate_limited"})),
    GetSession: ("session", frozenset({"not_found"})),
    ListSessions: ("sessions", frozenset()),
    SendMessage: ("message_ack", frozenset({"not_found", "conflict", "too_large", "rate_limited"})),
    History: ("history", frozenset({"not_found"})),
    CloseSession: ("session_closed", frozenset({"not_found", "conflict"})),
    Subscribe: ("subscribed", frozenset({"rate_limited", "too_large"})),
    Unsubscribe: ("unsubscribed", frozenset()),
    Typing: (None, frozenset({"not_found", "conflict", "rate_limited"})),
    Ping: ("pong", frozenset()),
}
STORED_EVENTS = {"session_created", "message", "session_closed"}


def is_pushed_event(frame: dict) -> bool:
    """Frames the server pushes on its own: presence, typing, and stored events (which carry `offset`)."""
    return frame["type"] in ("presence", "typing") or (
        frame["type"] in STORED_EVENTS and "offset" in frame and "reply_to" not in frame
    )


@dataclass
class Arena:
    url: str
    attackers: dict[str, ScriptClient]
    polite: ScriptClient
    observer: ScriptClient
    polite_doc: str
    session_ids: tuple[str, ...]  # open sessions, then one closed one
    polite_offset: int = 0
    frames_sent: dict[str, int] = field(default_factory=lambda: {"text": 0, "binary": 0})
    answers: Counter = field(default_factory=Counter)
    closed_by_fuzzer: set[str] = field(default_factory=set)
    examples: int = 0

    async def attacker(self, mode: str) -> ScriptClient:
        client = self.attackers[mode]
        if client.websocket.close_code is not None:
            # A previous example failed by closing it; start this one afresh so that
            # Hypothesis can tell which input does it.
            subprotocol = "sectionchat.v1.msgpack" if mode == "msgpack" else None
            client = self.attackers[mode] = await ScriptClient.open(
                self.url, name=f"fuzz-{mode}", subprotocol=subprotocol
            )
        return client

    async def send_and_check(self, mode: str, payload: str | bytes) -> None:
        client = await self.attacker(mode)
        codec = MSGPACK if mode == "msgpack" else JSON
        expected = check_decode(codec, payload)
        client.take_events()
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
        answers = [frame for frame in client.take_events() if not is_pushed_event(frame)]
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
            return
        reply_type, error_codes = REPLIES[type(expected)]
        if reply_type is None and not answers:
            return  # typing: no reply on success
        assert len(answers) == 1, context
        [answer] = answers
        if answer["type"] == "error":
            assert answer["code"] in error_codes, context
        else:
            assert answer["type"] == reply_type, context
        assert answer.get("reply_to") == expected.id and ("reply_to" in answer) == (expected.id is not None), context
        if answer["type"] == "session_closed" and answer["session"]["session_id"] in self.session_ids[:-1]:
            self.closed_by_fuzzer.add(answer["session"]["session_id"])

    async def reopen(self) -> None:
        """Replace the open sessions the fuzzer closed, so that it keeps having some to write to."""
        if self.closed_by_fuzzer:
            fuzz = await self.attacker("json")
            session_ids = list(self.session_ids)
            for index, session_id in enumerate(session_ids[:-1]):
                if session_id in self.closed_by_fuzzer:
                    session_ids[index] = (await fuzz.call("create_session", document_id="d", section_id="s"))[
                        "session"
                    ]["session_id"]
            self.session_ids = tuple(session_ids)
            self.closed_by_fuzzer.clear()

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
        "msgpack": await ScriptClient.open(url, name="fuzz-msgpack", subprotocol="sectionchat.v1.msgpack"),
    }
    polite = await ScriptClient.open(url, name="polite")
    observer = await ScriptClient.open(url, name="observer")
    polite_doc = f"polite-{uuid.uuid4().hex}"
    await observer.call("subscribe", document_id=polite_doc, section_id="s")
    # Real sessions for the fuzzer to hit: two open, one closed, in a section it may also subscribe to.
    fuzz = attackers["json"]
    sids = [
        (await fuzz.call("create_session", document_id="d", section_id="s"))["session"]["session_id"] for _ in range(3)
    ]
    await fuzz.call("send_message", session_id=sids[0], text="first")
    await fuzz.call("close_session", session_id=sids[2])
    arena = Arena(url, attackers, polite, observer, polite_doc, tuple(sids))
    yield arena
    print(
        f"\narena: {arena.examples} Hypothesis examples, frames sent {arena.frames_sent}, answers {dict(arena.answers)}, polite events seen in order: {arena.polite_offset}"
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
    await arena.reopen()
    batch = data.draw(st.lists(live_frames(arena.session_ids), min_size=1, max_size=6), label="frames")
    arena.examples += 1
    async with asyncio.timeout(20):
        polite = asyncio.create_task(arena.polite_round())
        try:
            for mode, payload in batch:
                await arena.send_and_check(mode, payload)
        finally:
            await polite


BOUNDARY_VALUES: dict[Kind, list[Any]] = {
    ID: ["a", "x" * 128, "\U0001f600" * 128, "../../etc/passwd", "\u2028", " ", "\ufeff", "NUL\\0"],
    KEY: ["k", "k" * 64, "\U0010ffff" * 64],
    TITLE: ["", "t" * 200, "\U0001f600" * 200, None],
    TEXT: ["x", "\x00", "\n" * 10, "x" * 8000, "x" * 8001, "\U0001f600" * 8000, "\x7f\x9f\u2028"],
    COUNT: [0, 1, 2**53, None],
    LIMIT: [1, 200],
    REQID: [1, 0, -1, "i", "i" * 64, 2**63 - 1, -(2**63), 2**64 - 1, 10**30, "\x00", "\n"],
}


@pytest.mark.timeout(60)
async def test_live_boundary_values(arena):
    """Every field of every request at the edges of what it accepts, on both wire formats: the predicted answer each time."""
    open_sid, _, closed_sid = arena.session_ids
    defaults = {ID: "edge", KEY: open_sid, TITLE: None, TEXT: "t", COUNT: None, LIMIT: 50, REQID: "edge"}
    sent = 0
    # close_session last: until then, writes go to an open session.
    for tag, fields in sorted(SCHEMA.items(), key=lambda item: (item[0] == "close_session", item[0])):
        for name, spec in {**fields, "id": ID_FIELD}.items():
            values = list(BOUNDARY_VALUES[spec.kind])
            if name == "session_id":
                values += [open_sid, closed_sid]
            for value in values:
                if value is None and not spec.nullable:
                    continue
                frame = {"type": tag} | {n: defaults[f.kind] for n, f in fields.items() if f.required}
                frame[name] = value
                for mode in ("json", "msgpack"):
                    try:
                        payload: str | bytes = (
                            msgspec.msgpack.encode(frame) if mode == "msgpack" else msgspec.json.encode(frame).decode()
                        )
                    except OverflowError:
                        continue  # 10**30 has no MessagePack encoding
                    await arena.send_and_check(mode, payload)
                    sent += 1
    print(f"\nboundary values: {sent} frames")


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
