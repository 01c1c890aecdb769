"""The authenticated handshake (sans-IO) and the shared key files."""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets

from postcopy.protocol.auth import derive_frame_keys
from postcopy.protocol.errors import (AuthError, ErrorCode, HandshakeError, KeyFileError, PeerError, ProtocolError,
                                      VersionError)
from postcopy.protocol.frames import NONCE_BYTES, PAGE_BEARING, AuthOk, AuthProof, Error, Hello, Message
from postcopy.protocol.layout import Layout

_PEER_ROLE = {"source": "dest", "dest": "source", "primary": "standby", "standby": "primary"}
_SERVER_LABEL = b"postcopy server"
_CLIENT_LABEL = b"postcopy client"
AUTH_FAILED = "authentication failed: the peer does not prove knowledge of the shared key"


class Handshake:
    """Sans-IO authenticated handshake (HMAC-SHA256 challenge-response, shared key).

    Client Hello → server Hello + AuthProof(HMAC(key, "postcopy server" + transcript))
    → client AuthProof(HMAC(key, "postcopy client" + transcript)) → server AuthOk.
    The transcript is the two encoded Hellos, so no field of either can be altered, and
    each side's fresh nonce makes a recorded proof useless later.

    The nonce of ``hello`` is replaced by a fresh random one for every handshake. Both
    Hellos must agree on protocol version, page size and channel; roles must differ;
    regions must be equal if both sides announce some (:attr:`layout` is the agreed
    one). Sessions are not compared: a server learns the session from the client.

    Feed every received message to :meth:`receive` and send the frames it returns. A
    failure raises a :class:`ProtocolError` whose ``reply`` frames (an :class:`Error`)
    should be sent before closing, except :class:`PeerError` (the peer's own Error).
    """

    def __init__(self, role: str, key: bytes, hello: Hello):
        if role not in ("client", "server"):
            raise ValueError(f"handshake role {role!r} is not 'client' or 'server'")
        if not isinstance(key, (bytes, bytearray)) or not key:
            raise ValueError("the shared key must be non-empty bytes")
        if not isinstance(hello, Hello):
            raise TypeError(f"hello must be a Hello, got {type(hello).__name__}")
        self.role = role
        self._key = bytes(key)
        self.hello: Hello = dataclasses.replace(hello, nonce=secrets.token_bytes(NONCE_BYTES))
        self.peer: Hello | None = None
        self.done = False
        self._state = "new"
        self._transcript = b""

    @property
    def transcript(self) -> bytes:
        """The two encoded Hellos (client's first), once both are known: the input,
        with the shared key, of the per-direction frame keys."""
        if self.peer is None:
            raise HandshakeError("the peer's Hello has not arrived yet")
        return self._transcript

    def frame_keys(self) -> tuple[bytes, bytes]:
        """(send key, receive key) for the frames after this handshake: fresh for each
        handshake (its nonces), one per direction."""
        if not self.done:
            raise HandshakeError("the handshake is not complete")
        client_to_server, server_to_client = derive_frame_keys(self._key, self._transcript)
        if self.role == "client":
            return client_to_server, server_to_client
        return server_to_client, client_to_server

    @property
    def layout(self) -> Layout:
        """The RAM layout both sides agreed on (regions from whichever side sent them)."""
        if self.peer is None:
            raise HandshakeError("the peer's Hello has not arrived yet")
        return Layout(self.hello.page_size, self.hello.regions or self.peer.regions)

    def start(self) -> list[bytes]:
        """Frames to send first: the client's Hello; nothing for the server."""
        if self._state != "new":
            raise HandshakeError("handshake already started")
        self._state = "hello"
        return [self.hello.encode()] if self.role == "client" else []

    def receive(self, message: Message) -> list[bytes]:
        """Process one received message; returns the frames to send in reply."""
        try:
            return self._receive(message)
        except PeerError:
            self._state = "failed"
            raise
        except ProtocolError as exc:
            self._state = "failed"
            if not exc.reply:
                exc.reply = [Error(exc.code, str(exc)).encode()]
            raise

    def _mac(self, label: bytes) -> bytes:
        return hmac.new(self._key, label + self._transcript, hashlib.sha256).digest()

    def _expect(self, message: Message, cls: type) -> None:
        if isinstance(message, Error):
            raise PeerError(message.reason, message.code)
        if not isinstance(message, cls):
            what = type(message).__name__
            if isinstance(message, PAGE_BEARING):
                raise HandshakeError(f"page data before the handshake completed: got {what}")
            raise HandshakeError(f"handshake out of order: expected {cls.__name__}, got {what}")

    def _receive(self, message: Message) -> list[bytes]:
        state = self._state
        if state == "failed":
            raise HandshakeError("the handshake has already failed")
        if state == "done":
            raise HandshakeError(f"the handshake is complete; {type(message).__name__} is not for it")
        if state == "new" and self.role == "server":
            state = self._state = "hello"  # a server has nothing to start with
        if state == "new":
            raise HandshakeError("the client must call start() before receiving")
        if state == "hello":
            self._expect(message, Hello)
            self._check_compatible(message)  # type: ignore[arg-type]
            self.peer = message  # type: ignore[assignment]
            self._state = "proof"
            if self.role == "server":
                mine = self.hello.encode()
                self._transcript = message.encode() + mine
                return [mine, AuthProof(self._mac(_SERVER_LABEL)).encode()]
            self._transcript = self.hello.encode() + message.encode()
            return []
        if state == "proof":
            self._expect(message, AuthProof)
            expected = self._mac(_CLIENT_LABEL if self.role == "server" else _SERVER_LABEL)
            if not hmac.compare_digest(message.mac, expected):  # type: ignore[union-attr]
                raise AuthError(AUTH_FAILED, reply=[Error(
                    ErrorCode.AUTH, "authentication failed: the two ends do not use the same key").encode()])
            if self.role == "server":
                self._state = "done"
                self.done = True
                return [AuthOk().encode()]
            self._state = "ok"
            return [AuthProof(self._mac(_CLIENT_LABEL)).encode()]
        # state == "ok": the client waits for the server's acceptance
        self._expect(message, AuthOk)
        self._state = "done"
        self.done = True
        return []

    def _check_compatible(self, peer: Hello) -> None:
        me = self.hello
        if peer.version != me.version:
            raise VersionError(f"protocol version mismatch: the {me.role} speaks version {me.version}, "
                               f"the {peer.role} version {peer.version}")
        if peer.page_size != me.page_size:
            raise VersionError(f"page size mismatch: the {me.role} uses {me.page_size}-byte pages, "
                               f"the {peer.role} {peer.page_size}-byte pages")
        if peer.role != _PEER_ROLE[me.role]:
            raise HandshakeError(f"a {me.role} cannot talk to a {peer.role}: the peer of a {me.role} "
                                 f"is a {_PEER_ROLE[me.role]}")
        if peer.unauthenticated != me.unauthenticated:
            raise HandshakeError(f"frame authentication mismatch: the {me.role} "
                                 f"{'turned it off' if me.unauthenticated else 'requires it'}, the {peer.role} "
                                 f"{'turned it off' if peer.unauthenticated else 'requires it'}")
        if peer.channel != me.channel:
            raise HandshakeError(f"channel mismatch: the {me.role} expects the {me.channel} channel, "
                                 f"the {peer.role} opened the {peer.channel} channel")
        if me.regions and peer.regions and me.regions != peer.regions:
            raise VersionError(f"RAM layout mismatch: the {me.role} has regions {list(me.regions)}, "
                               f"the {peer.role} {list(peer.regions)}")
        if peer.nonce == me.nonce:
            raise HandshakeError("the peer echoed our nonce")


def new_key() -> bytes:
    """A new shared key: hex text of 32 random bytes (write it to a key file)."""
    return secrets.token_hex(32).encode("ascii")


def load_key(path: str | os.PathLike) -> bytes:
    """Read a shared key file (surrounding whitespace stripped). Raises OSError if it
    cannot be read and :class:`KeyFileError` if it is empty or implausibly large."""
    with open(path, "rb") as f:
        data = f.read(65537)
    if len(data) > 65536:
        raise KeyFileError(f"key file {os.fspath(path)!r} is larger than 64 KiB: not a key file")
    key = data.strip()
    if not key:
        raise KeyFileError(f"key file {os.fspath(path)!r} is empty; create one with: "
                           f"python3 -c 'import secrets; print(secrets.token_hex(32))' > FILE")
    return key
