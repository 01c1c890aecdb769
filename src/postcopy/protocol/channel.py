"""Socket I/O for the sans-IO wire protocol: framed, authenticated channels and the
handshake over TCP. All protocol logic lives in :mod:`postcopy.protocol.wire`; this module
only moves its bytes: frames are received through the wire layer's :class:`wire.Decoder`
(one receive buffer), checked against the session's table, and sealed with their tag
when sent."""
from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from postcopy._native import ffi

from postcopy.protocol import wire
from postcopy.protocol.state import header_kind, kind
from postcopy.protocol.endpoint import parse_endpoint  # noqa: F401  (its old home)

SOCKET_BUFFER = 8 << 20
IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)
# The receive buffer starts this small and grows to twice the largest frame seen.
INITIAL_RECEIVE_BUFFER = 256 << 10


class ChannelClosed(ConnectionError):
    """The peer closed the connection (or it broke) while a frame was expected."""


@dataclass(frozen=True)
class PeerInfo:
    """What the handshake established about the other side."""

    hello: wire.Hello
    layout: wire.Layout


class Channel:
    """One TCP connection carrying wire frames.

    Sending is serialised by a lock, so any thread may send; receiving belongs to one
    thread. A received :class:`wire.PageRun` points into this channel's receive buffer
    and is valid only until the next :meth:`recv`. With a ``session``, every frame sent
    or received is checked against its table (:mod:`postcopy.protocol.state`); after
    :meth:`secure`, every frame carries a tag (:mod:`postcopy.protocol.auth`).
    """

    def __init__(self, sock: socket.socket, name: str, layout: wire.Layout | None = None,
                 session: wire.Session | None = None):
        self.sock = sock
        self.name = name
        self.session = session
        self._decoder = wire.Decoder(layout, wire.MAX_PAYLOAD, capacity=INITIAL_RECEIVE_BUFFER, zero_copy=True)
        self._sealer: wire.FrameAuth | None = None
        self._send_lock = threading.Lock()
        self._closed = False
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def layout(self) -> wire.Layout | None:
        return self._decoder.layout

    @layout.setter
    def layout(self, layout: wire.Layout | None) -> None:
        self._decoder.set_layout(layout)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned by :meth:`recv` (a poll would miss them)."""
        return self._decoder.buffered

    @property
    def authenticated(self) -> bool:
        return self._sealer is not None

    def secure(self, send_key: bytes, recv_key: bytes) -> None:
        """Tag every frame from now on, and require a valid tag on every frame received."""
        sealer, verifier = wire.FrameAuth(send_key, f"{self.name} channel, sent"), \
            wire.FrameAuth(recv_key, f"{self.name} channel, received")
        with self._send_lock:
            self._sealer = sealer
        self._decoder.set_auth(verifier)

    # -- sending -------------------------------------------------------------------
    def send(self, message) -> None:
        """Send one message."""
        self.send_bytes(message.encode())

    def send_bytes(self, frame: bytes) -> None:
        """Send one encoded frame."""
        view = memoryview(frame)
        self.send_frames([(view[:wire.HEADER.size], view[wire.HEADER.size:])])

    def send_frames(self, frames) -> None:
        """Send (header, payload) frames back to back under one lock, each checked
        against the session and sealed; payloads go out without a copy."""
        with self._send_lock:
            parts = []
            for header, payload in frames:
                parts += self._prepare(header, payload)
            self._sendmsg_all(parts)

    def send_page_run(self, first_page: int, npages: int, cause: wire.Cause, data) -> None:
        """Send a page run from a buffer without copying it into a frame."""
        header = wire.encode_page_run_header(first_page, npages, cause, self.layout.page_size)
        self.send_frames([(header, data)])

    def sendfile_page_run(self, first_page: int, npages: int, cause: wire.Cause, fd: int, offset: int,
                          stable_view) -> None:
        """Send a page run straight from a file (a memfd) with sendfile(2): no copy in
        user space. ``stable_view`` maps the same bytes, for the tag: they must not
        change until sent (the guest is paused)."""
        page_size = self.layout.page_size
        header = wire.encode_page_run_header(first_page, npages, cause, page_size)
        count = npages * page_size
        with self._send_lock:
            parts = self._prepare(header, stable_view)
            # MSG_MORE: the header leaves in the same segment as the first page bytes.
            self._sendmsg_all(parts[:1], socket.MSG_MORE)
            done = 0
            while done < count:
                try:
                    sent = os.sendfile(self.sock.fileno(), fd, offset + done, count - done)
                except OSError as exc:
                    raise ChannelClosed(f"{self.name}: send failed: {exc}") from exc
                if sent == 0:
                    raise ChannelClosed(f"{self.name}: sendfile reached the end of the guest RAM file")
                done += sent
            self.bytes_sent += count
            self._sendmsg_all(parts[2:])

    # -- handing a side to the native data plane (native/dp_send.c) ------------------
    def lend_send(self, *kinds: str):
        """Hand this channel's send side to native code until :meth:`end_loan` (from any
        thread): takes the send lock, so nothing else sends meanwhile; checks once the
        frame ``kinds`` the native side may send against the session, in the order it
        sends them (a loop sends only self-loops of the table; a one-shot sequence such
        as a checkpoint epoch, EPOCH_BEGIN, PAGE_RUN/RESENT, EPOCH_COMMIT, may move the
        phase as it goes); returns a
        ``struct pc_dp_link`` (a duplicate of the socket, the sealer and its next
        sequence number) that the native side updates as it sends."""
        self._send_lock.acquire()
        try:
            if self.session is not None:
                for frame in kinds:
                    self.session.sent(frame, self.name)
            link = ffi.new("struct pc_dp_link *")
            link.fd = self._native_fd()
        except BaseException:
            self._send_lock.release()
            raise
        sealer = self._sealer
        link.seal = sealer._ctx if sealer is not None else ffi.NULL
        link.seq = sealer.seq if sealer is not None else 0
        return link

    def end_loan(self, link) -> None:
        """Take the send side back from native code: Python's frames go on from the
        native side's next sequence number."""
        try:
            os.close(link.fd)
            if self._sealer is not None:
                self._sealer.seq = link.seq
            self.bytes_sent += link.bytes
        finally:
            self._send_lock.release()

    @contextmanager
    def native_send(self, *kinds: str):
        """:meth:`lend_send` for the length of one native call."""
        link = self.lend_send(*kinds)
        try:
            yield link
        finally:
            self.end_loan(link)

    @contextmanager
    def native_receive(self, capacity: int = 64 << 10, buffer=None):
        """Own the receive side from C for one call (only the receiving thread may):
        yields (socket fd, verifier or NULL, its sequence number cell, buffer, start
        and end cells) with the bytes the decoder had buffered in the buffer; what C
        leaves unconsumed goes back to the decoder, so the next :meth:`recv` decodes
        (and checks against the session) the frame C would not take. ``buffer`` (a
        ``uint8_t[]`` the caller keeps from call to call) is used when the buffered
        bytes fit in it, instead of a new one of ``capacity`` bytes."""
        fd = self._native_fd()  # first: a closed channel gives up no buffered bytes
        decoder = self._decoder
        pending = decoder.take_buffered()
        verifier = decoder.auth
        if buffer is not None and len(buffer) >= len(pending):
            buf = buffer
        else:
            buf = ffi.new("uint8_t[]", max(capacity, 2 * len(pending)))
        ffi.memmove(buf, pending, len(pending))  # (a slice assignment converts byte by byte: ms for 64 KiB)
        start, end = ffi.new("size_t *", 0), ffi.new("size_t *", len(pending))
        seq = ffi.new("uint64_t *", verifier.seq if verifier is not None else 0)
        try:
            yield (fd, verifier._ctx if verifier is not None else ffi.NULL, seq, buf, len(buf), start, end)
        finally:
            os.close(fd)
            if verifier is not None:
                verifier.seq = seq[0]
            decoder.feed(ffi.buffer(buf, len(buf))[start[0]:end[0]])

    def _native_fd(self) -> int:
        """A descriptor of this socket for one native call: a duplicate, so that a
        close() from another thread (after its shutdown() woke the call) cannot hand
        the number to a new file while C still uses it."""
        try:
            return os.dup(self.sock.fileno())
        except OSError as exc:
            raise ChannelClosed(f"{self.name}: the channel was closed") from exc

    def _prepare(self, header, payload) -> list:
        """[header, payload(, tag)] of one frame, checked against the session."""
        if self.session is not None:
            self.session.sent(header_kind(header), self.name)
        if self._sealer is None:
            return [header, payload]
        return [header, payload, self._sealer.seal(header, payload)]

    def _sendmsg_all(self, parts, flags: int = 0) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(len(v) for v in views)
        try:
            while views:
                sent = self.sock.sendmsg(views[:IOV_MAX], (), flags)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            raise ChannelClosed(f"{self.name}: send failed: {exc}") from exc
        self.bytes_sent += total

    # -- receiving -----------------------------------------------------------------
    def recv(self):
        """Receive, authenticate, decode and check the next message (raises
        wire.ProtocolError on bad, forged or unexpected frames)."""
        decoder = self._decoder
        while (message := decoder.next_message()) is None:
            if self._closed:
                raise ChannelClosed(f"{self.name}: the channel was closed")
            try:
                n = self.sock.recv_into(decoder.space())
            except OSError as exc:
                if isinstance(exc, TimeoutError) and exc.errno is None:
                    raise  # the socket's own timeout (silence), not a broken link (ETIMEDOUT)
                raise ChannelClosed(f"{self.name}: receive failed: {exc}") from exc
            if n == 0:
                raise ChannelClosed(f"{self.name}: the peer closed the connection")
            decoder.commit(n)
            self.bytes_received += n
        if self._closed:
            raise ChannelClosed(f"{self.name}: the channel was closed")
        if self.session is not None:
            self.session.received(kind(message), self.name)
        return message

    def close(self) -> None:
        """Shut the connection down (wakes a thread blocked in recv) and close it."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# A link that stops carrying data is declared broken after this long (TCP_USER_TIMEOUT
# for data in flight, keepalive probes for an idle connection), so postcopy recovery can
# start instead of a fault waiting for TCP's default of many minutes.
LINK_TIMEOUT_S = 2


def tune(sock: socket.socket, *, urgent: bool) -> None:
    """Socket options: no Nagle delay anywhere (requests and replies are small and
    latency-bound); big buffers for bulk data; a broken link noticed in seconds."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, LINK_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, LINK_TIMEOUT_S * 1000)
    if not urgent:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass


def handshake(channel: Channel, role: str, key: bytes, hello: wire.Hello) -> PeerInfo:
    """Run the authenticated handshake on a fresh channel; set its layout and, unless
    the Hellos turned it off, its frame keys (every later frame is authenticated).

    Raises wire.AuthError / wire.VersionError / wire.PeerError with a clear reason; on
    the server side the refusal reason is sent to the peer before raising.
    """
    shake = wire.Handshake(role, key, hello)
    for frame in shake.start():
        channel.send_bytes(frame)
    while not shake.done:
        message = channel.recv()
        try:
            replies = shake.receive(message)
        except wire.ProtocolError as exc:
            for frame in getattr(exc, "reply", None) or ():
                try:
                    channel.send_bytes(frame)
                except (ChannelClosed, wire.ProtocolError):
                    pass
            raise
        for frame in replies:
            channel.send_bytes(frame)
    channel.layout = shake.layout
    if not hello.unauthenticated:
        channel.secure(*shake.frame_keys())
    return PeerInfo(hello=shake.peer, layout=shake.layout)
