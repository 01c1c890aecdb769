"""Authentication of every frame after the handshake.

Keys: each handshake derives two fresh 32-byte keys, one per direction, HKDF-style
(RFC 5869 with SHA-256): ``PRK = HMAC(SHA256(label || transcript), shared key)`` and
``key = HMAC(PRK, direction label || 0x01)``. The transcript is both encoded Hellos
(fresh nonces on both sides), so every channel and every reconnect gets its own keys.

Tags: AES-256-GMAC (AES-GCM over no plaintext) of ``header || payload``, the 96-bit
nonce being four zero bytes and the frame's 64-bit sequence number in its direction
(0, 1, 2, ... never sent: both ends count). The 16-byte tag follows the payload. A
frame altered, dropped, replayed or reordered on the way fails the check. The work is
done in C by libcrypto (AES-NI, PCLMUL) without the GIL: see ``native/frame_auth.c``.
"""
from __future__ import annotations

import hashlib
import hmac

from postcopy._native import ffi, lib
from postcopy.protocol.errors import IntegrityError
from postcopy.protocol.frames import FrameType

KEY_BYTES = 32
TAG_BYTES = 16
_SALT_LABEL = b"postcopy v2 frame keys"
_CLIENT_TO_SERVER = b"postcopy v2 client to server"
_SERVER_TO_CLIENT = b"postcopy v2 server to client"


def derive_frame_keys(shared_key: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key) of one handshake."""
    salt = hashlib.sha256(_SALT_LABEL + transcript).digest()
    prk = hmac.new(salt, shared_key, hashlib.sha256).digest()
    return (hmac.new(prk, _CLIENT_TO_SERVER + b"\x01", hashlib.sha256).digest(),
            hmac.new(prk, _SERVER_TO_CLIENT + b"\x01", hashlib.sha256).digest())


class FrameAuth:
    """One direction of one channel: its key and the sequence number of its next
    frame. Not thread safe: the channel serialises its use."""

    TAG_BYTES = TAG_BYTES

    def __init__(self, key: bytes, name: str = "frames"):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a frame key is {KEY_BYTES} bytes, got {len(key)}")
        ctx = lib.pc_frame_auth_new(key)
        if ctx == ffi.NULL:
            raise MemoryError("libcrypto could not set up AES-256-GCM")
        self._ctx = ffi.gc(ctx, lib.pc_frame_auth_free)
        self._tag = ffi.new("uint8_t[]", TAG_BYTES)
        self.name = name
        self.seq = 0

    def seal(self, header, payload=b"") -> bytes:
        """The tag of the next frame, ``header`` then ``payload`` (any buffers)."""
        a, b = ffi.from_buffer(header), ffi.from_buffer(payload)
        if lib.pc_frame_auth_tag(self._ctx, self.seq, a, len(a), b, len(b), self._tag):
            raise RuntimeError("libcrypto failed to compute a frame tag")
        self.seq += 1
        return ffi.buffer(self._tag)[:]

    def verify(self, header, payload, tag) -> None:
        """Check the next received frame's tag; raises :class:`IntegrityError` (and the
        stream must end) unless it is the tag of exactly these bytes at this place."""
        a, b, t = ffi.from_buffer(header), ffi.from_buffer(payload), ffi.from_buffer(tag)
        if len(t) != TAG_BYTES:
            raise IntegrityError(f"{self.name}: frame {self.seq} has a tag of {len(t)} bytes")
        result = lib.pc_frame_auth_check(self._ctx, self.seq, a, len(a), b, len(b), t)
        if result < 0:
            raise RuntimeError("libcrypto failed to compute a frame tag")
        if result:
            raise IntegrityError(f"{self.name}: frame {self.seq} ({_type_name(header)}, {len(b)} payload "
                                 f"bytes) failed authentication: altered, replayed, reordered or not from "
                                 f"the peer; nothing of it is used")
        self.seq += 1

    def bench(self, buf, rounds: int) -> float:
        """CPU seconds to tag ``buf`` ``rounds`` times in C (the MAC's own speed)."""
        view = ffi.from_buffer(buf)
        ns = lib.pc_frame_auth_bench(self._ctx, view, len(view), rounds)
        if ns < 0:
            raise RuntimeError("libcrypto failed to compute a frame tag")
        return ns / 1e9


def _type_name(header) -> str:
    try:
        return FrameType(memoryview(header)[2]).name
    except (ValueError, IndexError):
        return "unknown type"


def pair(send_key: bytes, recv_key: bytes, name: str) -> tuple[FrameAuth, FrameAuth]:
    """(sealer, verifier) of one channel end."""
    return FrameAuth(send_key, f"{name} (sent)"), FrameAuth(recv_key, f"{name} (received)")
