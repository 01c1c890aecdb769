"""Errors of the wire protocol. Every malformed, unexpected or unauthenticated input
raises a :class:`ProtocolError` (and nothing else), whose message names what was wrong."""
from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Codes carried by :class:`Error` frames (receivers must accept unknown codes)."""

    PROTOCOL = 1
    AUTH = 2
    VERSION = 3
    INTERNAL = 4
    ABORTED = 5


class ProtocolError(Exception):
    """The peer (or our caller) broke the protocol. ``reply`` holds encoded frames (an
    :class:`Error`) worth sending to the peer before closing, so it learns why."""

    code: int = ErrorCode.PROTOCOL

    def __init__(self, message: str, *, reply: list[bytes] | tuple[bytes, ...] = ()):
        super().__init__(message)
        self.reply: list[bytes] = list(reply)


class FrameError(ProtocolError):
    """Malformed frame bytes: bad magic, unknown type, wrong length, bad field."""


class RangeError(ProtocolError):
    """Page-bearing frame that does not fit the RAM layout (or arrives before it is known)."""


class HandshakeError(ProtocolError):
    """The handshake failed (wrong order, incompatible peers, bad credentials)."""


class AuthError(HandshakeError):
    """The peer does not prove knowledge of the shared key."""

    code = ErrorCode.AUTH


class VersionError(HandshakeError):
    """The peers are incompatible: protocol version, page size or RAM layout differ."""

    code = ErrorCode.VERSION


class PeerError(HandshakeError):
    """The peer sent an :class:`Error` during the handshake. ``reason`` and ``peer_code``
    are what it said."""

    def __init__(self, reason: str, peer_code: int = ErrorCode.PROTOCOL):
        super().__init__(f"the peer refused: {reason}")
        self.reason = reason
        self.peer_code = peer_code


class KeyFileError(ValueError):
    """A key file that cannot serve as a shared key."""


class StateError(ProtocolError):
    """A well-formed frame that the role may not send or receive in its current phase."""


class IntegrityError(ProtocolError):
    """A frame whose authentication tag does not verify: altered, replayed, reordered
    or dropped on the way. Nothing of it may be used."""

    code = ErrorCode.AUTH
