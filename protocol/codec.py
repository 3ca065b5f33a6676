# Bytes in, typed requests out; typed frames in, bytes out. No I/O.
#
# One Codec per wire format. Decoding never raises anything but ChatError, so
# a transport can answer any bad frame with an `error` frame and carry on.

from __future__ import annotations

from typing import Any

import msgspec

from .errors import BAD_REQUEST, UNKNOWN_TYPE, ChatError
from .messages import REQUEST_TYPES, ClientRequest, RequestId, ServerFrame

__all__ = [
    "Codec",
    "JSON",
    "MSGPACK",
    "JSON_SUBPROTOCOL",
    "MSGPACK_SUBPROTOCOL",
    "codec_for_subprotocol",
    "SUBPROTOCOLS",
]


class _Envelope(msgspec.Struct):
    """The least a frame must have for us to address an error to it."""

    type: Any = None
    id: Any = None


class _IdOnly(msgspec.Struct):
    """Fallback when even `type` cannot be read (e.g. 1e999): unknown fields are skipped unchecked."""

    id: Any = None


def _valid_id(value: Any) -> RequestId | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and 1 <= len(value) <= 64):
        return value
    return None


def _explain(error: msgspec.MsgspecError) -> str:
    text = str(error)
    # msgspec names the regex; clients only need to know which rule it is.
    if "matching regex" in text:
        path = text.rpartition(" - at ")[2]
        return f"Expected a string without control characters - at {path}"
    if isinstance(error, msgspec.DecodeError) and "truncated" in text:
        return "Malformed frame: truncated data or an invalid string escape"
    return text


class Codec:
    """Decodes client requests and encodes server frames in one wire format."""

    def __init__(self, name: str, module: Any, *, binary: bool):
        self.name = name
        self.binary = binary
        self._decoder = module.Decoder(ClientRequest)
        self._envelopes = (module.Decoder(_Envelope), module.Decoder(_IdOnly))
        self._encoder = module.Encoder()

    def decode(self, data: str | bytes) -> ClientRequest:
        """Decode one frame into a request, or raise ChatError naming the problem."""
        if isinstance(data, str) == self.binary:
            kind = "text" if isinstance(data, str) else "binary"
            raise ChatError(BAD_REQUEST, f"{kind} frames are not accepted in {self.name} mode")
        try:
            return self._decoder.decode(data)
        except (msgspec.MsgspecError, RecursionError, UnicodeError, ValueError) as error:
            raise self._failure(data, error) from None

    def _failure(self, data: str | bytes, error: Exception) -> ChatError:
        envelope: _Envelope | _IdOnly = _IdOnly()
        for decoder in self._envelopes:
            try:
                envelope = decoder.decode(data)
                break
            except (msgspec.MsgspecError, RecursionError, UnicodeError, ValueError):
                continue
        reply_to = _valid_id(envelope.id)
        kind = getattr(envelope, "type", None)
        if isinstance(kind, str) and kind not in REQUEST_TYPES:
            return ChatError(UNKNOWN_TYPE, f"unknown request type {kind!r}", reply_to)
        if isinstance(error, msgspec.MsgspecError):
            return ChatError(BAD_REQUEST, _explain(error), reply_to)
        return ChatError(BAD_REQUEST, f"Malformed frame: {type(error).__name__}", reply_to)

    def encode(self, frame: ServerFrame) -> bytes:
        return self._encoder.encode(frame)


JSON = Codec("json", msgspec.json, binary=False)
MSGPACK = Codec("msgpack", msgspec.msgpack, binary=True)

JSON_SUBPROTOCOL = "sectionchat.v1"
MSGPACK_SUBPROTOCOL = "sectionchat.v1.msgpack"
SUBPROTOCOLS = {JSON_SUBPROTOCOL: JSON, MSGPACK_SUBPROTOCOL: MSGPACK}


def codec_for_subprotocol(subprotocol: str | None) -> Codec:
    return SUBPROTOCOLS.get(subprotocol or "", JSON)
