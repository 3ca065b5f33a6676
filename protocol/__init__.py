"""The sectionchat wire protocol: message types (`protocol.messages`), errors and codecs. No I/O."""

from .codec import JSON, MSGPACK, SUBPROTOCOLS, Codec, codec_for_subprotocol
from .errors import ChatError
from .messages import PROTOCOL_VERSION

__all__ = ["JSON", "MSGPACK", "SUBPROTOCOLS", "PROTOCOL_VERSION", "ChatError", "Codec", "codec_for_subprotocol"]
