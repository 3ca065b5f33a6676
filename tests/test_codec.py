"""The codec: typed requests from bytes, precise bad_request messages. No event loop."""

from __future__ import annotations

import msgspec
import pytest

from protocol import JSON, MSGPACK, ChatError
from protocol.messages import CreateSession, Error, History, Ping, SendMessage, Session, SessionCreated


def decode_error(data: str | bytes, codec=JSON) -> ChatError:
    with pytest.raises(ChatError) as caught:
        codec.decode(data)
    return caught.value


def test_decodes_a_request_into_its_type():
    """A well-formed frame becomes the Struct of its `type`, extra fields ignored."""
    request = JSON.decode('{"type":"create_session","id":"a1","document_id":"d","section_id":"s","extra":[1]}')
    assert request == CreateSession(id="a1", document_id="d", section_id="s")


def test_integer_and_string_ids():
    """`id` may be an integer or a string of 1-64 characters."""
    assert JSON.decode('{"type":"ping","id":7}') == Ping(id=7)
    assert JSON.decode('{"type":"ping","id":"x"}') == Ping(id="x")
    assert decode_error('{"type":"ping","id":1.5}').code == "bad_request"
    assert decode_error('{"type":"ping","id":""}').code == "bad_request"


@pytest.mark.parametrize(
    ("frame", "code", "fragment"),
    [
        ("not json", "bad_request", "malformed"),
        ("[1,2]", "bad_request", "Expected `object`"),
        ('{"id":1}', "bad_request", "missing required field `type`"),
        ('{"type":"launch_rockets","id":1}', "unknown_type", "launch_rockets"),
        ('{"type":"create_session","id":1,"section_id":"s"}', "bad_request", "`document_id`"),
        ('{"type":"create_session","id":1,"document_id":5,"section_id":"s"}', "bad_request", "$.document_id"),
        ('{"type":"create_session","id":1,"document_id":"","section_id":"s"}', "bad_request", "$.document_id"),
        (
            '{"type":"create_session","id":1,"document_id":"' + "x" * 129 + '","section_id":"s"}',
            "bad_request",
            "$.document_id",
        ),
        (
            '{"type":"create_session","id":1,"document_id":"a\\u0000b","section_id":"s"}',
            "bad_request",
            "control characters",
        ),
        (
            '{"type":"create_session","id":1,"document_id":"a\\nb","section_id":"s"}',
            "bad_request",
            "control characters",
        ),
        (
            '{"type":"create_session","id":1,"document_id":"d","section_id":"s","title":"' + "t" * 201 + '"}',
            "bad_request",
            "$.title",
        ),
        ('{"type":"history","id":1,"session_id":"x","limit":0}', "bad_request", "$.limit"),
        ('{"type":"history","id":1,"session_id":"x","limit":201}', "bad_request", "$.limit"),
        ('{"type":"history","id":1,"session_id":"x","after_seq":1,"before_seq":5}', "bad_request", "together"),
        ('{"type":"send_message","id":1,"session_id":"x","text":""}', "bad_request", "$.text"),
        (
            '{"type":"subscribe","id":1,"document_id":"d","section_id":"s","since_offset":-1}',
            "bad_request",
            "$.since_offset",
        ),
        ('{"type":"ping","id":1} trailing', "bad_request", "trailing"),
        ('{"type":"create_session","id":1,"document_id":"\\ud800","section_id":"s"}', "bad_request", ""),
        ('{"type":"history","id":1,"session_id":"x","after_seq":1e999}', "bad_request", "$.after_seq"),
    ],
)
def test_bad_frames_name_the_problem(frame, code, fragment):
    """Each malformed frame gets its error code and a message naming the field or fault."""
    error = decode_error(frame)
    assert error.code == code
    assert fragment.lower() in error.message.lower()


def test_error_keeps_the_request_id():
    """A bad frame that still has a usable `id` gets it back as reply_to."""
    assert decode_error('{"type":"create_session","id":"r9"}').reply_to == "r9"
    assert decode_error('{"type":"nope","id":3}').reply_to == 3
    assert decode_error("garbage").reply_to is None


def test_deep_nesting_is_a_bad_request():
    """Absurd nesting is refused cleanly, not with a RecursionError."""
    error = decode_error('{"type":"ping","id":1,"x":' + "[" * 100_000 + "]" * 100_000 + "}")
    assert error.code == "bad_request"


def test_binary_frame_in_json_mode():
    """JSON mode takes text frames only; msgpack mode binary frames only."""
    assert "binary frames" in decode_error(b'{"type":"ping"}').message
    assert "text frames" in decode_error('{"type":"ping"}', MSGPACK).message


def test_msgpack_round_trip():
    """MessagePack frames carry the same fields as JSON ones."""
    request = MSGPACK.decode(msgspec.msgpack.encode({"type": "send_message", "id": 2, "session_id": "s", "text": "hi"}))
    assert request == SendMessage(id=2, session_id="s", text="hi")


def test_encoding_omits_absent_reply_to_but_keeps_nulls():
    """Events have no reply_to; a Session's null title and metadata are still sent."""
    session = Session("sid", "d", "s", None, "alice", "2026-11-25T08:00:00.000Z", False, 0)
    event = msgspec.json.decode(JSON.encode(SessionCreated(session=session, offset=3)))
    assert event == {
        "type": "session_created",
        "session": {
            "session_id": "sid",
            "document_id": "d",
            "section_id": "s",
            "title": None,
            "created_by": "alice",
            "created_at": "2026-11-25T08:00:00.000Z",
            "closed": False,
            "last_seq": 0,
            "last_activity_at": "2026-11-25T08:00:00.000Z",
            "metadata": None,
        },
        "offset": 3,
    }
    error = msgspec.json.decode(JSON.encode(Error(code="not_found", message="m", temporary=False, reply_to=4)))
    assert error == {"type": "error", "reply_to": 4, "code": "not_found", "message": "m", "temporary": False}


def test_history_defaults():
    """`limit` defaults to 50."""
    assert JSON.decode('{"type":"history","session_id":"x"}') == History(session_id="x", limit=50)
