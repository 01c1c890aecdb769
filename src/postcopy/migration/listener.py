"""The destination before authentication: one thread accepts every connection and runs
each handshake to a deadline, so no stranger can stop or stall the destination.

A connection that sends bad bytes (a huge length, bad magic, garbage), stays idle or
trickles past the handshake deadline, or fails authentication is dropped and logged;
the destination keeps listening, also while a postcopy link is being recovered. The
first source whose *main* channel authenticates claims the destination: channels of
that session are handed to the agent; every other session gets a prompt
"busy: serving another migration" :class:`wire.Error`, which its handshake raises as a
clear :class:`wire.PeerError`. Handshakes run on non-blocking sockets with the sans-IO
:class:`wire.Handshake`, so a flood of connections costs a selector entry each.
"""
from __future__ import annotations

import os
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, PeerInfo, tune

HANDSHAKE_TIMEOUT_S = 10.0
# Pending handshakes at once; past this the oldest is dropped (a real source finishes
# its handshake in milliseconds, so it is never the oldest for long).
MAX_PENDING = 256
# Pre-authentication frames are small: a Hello with every region, a proof, an error.
MAX_HANDSHAKE_FRAME = 64 << 10
BUSY = "busy: serving another migration"


class AcceptTimeout(Exception):
    """No authenticated channel of the wanted kind arrived in time."""


@dataclass
class _Pending:
    sock: socket.socket
    peer: str
    deadline: float
    decoder: wire.Decoder = field(default_factory=lambda: wire.Decoder(max_payload=MAX_HANDSHAKE_FRAME))
    shake: wire.Handshake | None = None


def _log(role: str, message: str) -> None:
    print(f"postcopy {role}: {message}", file=sys.stderr, flush=True)


class Listener:
    """Accepts and authenticates connections in a background thread; :meth:`accept`
    hands over the authenticated channels of the claimed session."""

    def __init__(self, sock: socket.socket, key: bytes, page_size: int | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S, *, protocol: wire.Session | None = None,
                 frame_auth: bool = True, role: str = "dest"):
        self.sock = sock
        self.role = role  # this end's Hello role ("dest", or "standby" for a checkpoint stream)
        self.key = key
        self.protocol = protocol  # checks every frame after the handshake, on every channel
        self.frame_auth = frame_auth  # False is UNSAFE: only to measure what authentication costs
        self.page_size = page_size or os.sysconf("SC_PAGE_SIZE")
        self.handshake_timeout = handshake_timeout
        self.dropped = 0  # connections dropped before authentication (tests read it)
        self.refused_busy = 0
        self._session: bytes | None = None  # claimed by the first authenticated main channel
        self._ready: dict[str, list[tuple[Channel, PeerInfo]]] = {"main": [], "urgent": []}
        self._cond = threading.Condition()
        self._pending: dict[int, _Pending] = {}
        self._closed = False
        self._selector = selectors.DefaultSelector()
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name="dest-listener", daemon=True)
        self._thread.start()

    # -- the agent's side ----------------------------------------------------------------
    def accept(self, name: str, session: bytes | None, timeout: float) -> tuple[Channel, PeerInfo]:
        """The newest authenticated ``name`` channel of ``session`` (of the claimed
        session if None; the first main channel claims). Older ones are closed: a
        reconnecting source abandoned them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                ready = [c for c in self._ready[name] if session is None or c[1].hello.session == session]
                if ready:
                    chosen = ready[-1]
                    for channel, _ in self._ready[name]:
                        if channel is not chosen[0]:
                            channel.close()
                    self._ready[name] = []
                    return chosen
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise AcceptTimeout(f"no source connected within {timeout:.0f} s")
                self._cond.wait(left)

    def close(self) -> None:
        """Stop listening; drop pending handshakes and channels never handed over."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._closed:
                now = time.monotonic()
                for pending in [p for p in self._pending.values() if p.deadline <= now]:
                    self._drop(pending, f"no handshake within {self.handshake_timeout:g} s")
                soonest = min((p.deadline for p in self._pending.values()), default=now + 1.0)
                for key, _ in self._selector.select(max(0.0, min(1.0, soonest - now))):
                    if key.fileobj is self.sock:
                        self._accept_all()
                    elif key.fileobj is self._wake_r:
                        continue
                    else:
                        self._readable(key.data)
        finally:
            for pending in list(self._pending.values()):
                self._forget(pending)
            with self._cond:
                for channels in self._ready.values():
                    for channel, _ in channels:
                        channel.close()
                    channels.clear()
            self._selector.close()
            self.sock.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept_all(self) -> None:
        while True:
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: keep listening
                _log(self.role, f"accept failed: {exc}")
                return
            sock.setblocking(False)
            if len(self._pending) >= MAX_PENDING:
                oldest = min(self._pending.values(), key=lambda p: p.deadline)
                self._drop(oldest, f"more than {MAX_PENDING} connections awaiting their handshake")
            peer = f"[{address[0]}]:{address[1]}" if sock.family == socket.AF_INET6 else f"{address[0]}:{address[1]}"
            pending = _Pending(sock, peer, time.monotonic() + self.handshake_timeout)
            self._pending[sock.fileno()] = pending
            self._selector.register(sock, selectors.EVENT_READ, pending)

    def _readable(self, pending: _Pending) -> None:
        try:
            data = pending.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(pending, f"receive failed: {exc}")
            return
        if not data:
            self._drop(pending, "closed before completing the handshake")
            return
        pending.decoder.feed(data)
        try:
            while (message := pending.decoder.next_message()) is not None:
                if self._handle(pending, message):
                    return
        except wire.ProtocolError as exc:
            for frame in exc.reply:
                self._send(pending, frame)
            self._drop(pending, str(exc))
        except Exception as exc:  # whatever a stranger sends, the listener goes on
            if pending.sock.fileno() in self._pending:
                self._drop(pending, f"unexpected error: {exc!r}")

    def _handle(self, pending: _Pending, message) -> bool:
        """Advance one handshake; True once the connection left the pending set."""
        if pending.shake is None:
            if not isinstance(message, wire.Hello):
                raise wire.HandshakeError(f"expected a Hello first, got {type(message).__name__}")
            refusal = self._refusal(message)
            if refusal:
                self._refuse(pending, refusal)
                return True
            hello = wire.make_hello(self.role, message.channel, self.page_size, (), message.session,
                                    unauthenticated=not self.frame_auth)
            pending.shake = wire.Handshake("server", self.key, hello)
            pending.shake.start()
        replies = pending.shake.receive(message)
        if not pending.shake.done:
            for frame in replies:
                self._send(pending, frame)
            return False
        peer = pending.shake.peer
        with self._cond:
            refusal = self._refusal(peer)
            if refusal is None and self._session is None:
                self._session = peer.session  # the first authenticated main channel claims
        if refusal:
            self._refuse(pending, refusal)
            return True
        if pending.decoder.buffered:
            raise wire.HandshakeError("frames sent before the handshake completed")
        for frame in replies:  # AuthOk
            self._send(pending, frame)
        self._hand_over(pending)
        return True

    def _refusal(self, hello: wire.Hello) -> str | None:
        """Why a channel of this session cannot be served, or None."""
        if self._session is not None and hello.session != self._session:
            return BUSY
        if self._session is None and hello.channel != "main":
            return "no migration of this session: the main channel comes first"
        return None

    def _refuse(self, pending: _Pending, reason: str) -> None:
        if reason == BUSY:
            self.refused_busy += 1
        self._send(pending, wire.Error(wire.ErrorCode.ABORTED, reason).encode())
        self._drop(pending, f"refused ({reason})")

    def _hand_over(self, pending: _Pending) -> None:
        self._selector.unregister(pending.sock)
        del self._pending[pending.sock.fileno()]
        sock = pending.sock
        sock.setblocking(True)
        name = pending.shake.peer.channel
        tune(sock, urgent=(name == "urgent"))
        channel = Channel(sock, name, pending.shake.layout, self.protocol)
        if self.frame_auth:
            channel.secure(*pending.shake.frame_keys())
        with self._cond:
            self._ready[name].append((channel, PeerInfo(hello=pending.shake.peer, layout=pending.shake.layout)))
            self._cond.notify_all()

    def _send(self, pending: _Pending, frame: bytes) -> None:
        """Best effort: handshake frames are small and fit the socket buffer."""
        try:
            pending.sock.send(frame)
        except OSError:
            pass

    def _drop(self, pending: _Pending, reason: str) -> None:
        self.dropped += 1
        _log(self.role, f"dropped connection from {pending.peer}: {reason}; still listening")
        self._forget(pending)

    def _forget(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock.fileno(), None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        pending.sock.close()
