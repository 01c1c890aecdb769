"""Socket I/O for the sans-IO wire protocol: framed channels and the authenticated
handshake over TCP. All protocol logic lives in :mod:`postcopy.protocol.wire`; this module only
moves its bytes."""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from postcopy.protocol import wire
from postcopy.protocol.endpoint import parse_endpoint  # noqa: F401  (its old home)

# Bulk frames carry up to this many bytes of pages; receive buffers are sized for it.
MAX_RUN_BYTES = 4 << 20
SOCKET_BUFFER = 8 << 20


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
    and is valid only until the next :meth:`recv`.
    """

    def __init__(self, sock: socket.socket, name: str, layout: wire.Layout | None = None):
        self.sock = sock
        self.name = name
        self.layout = layout
        self._send_lock = threading.Lock()
        self._header = bytearray(wire.HEADER.size)
        self._buffer = bytearray(MAX_RUN_BYTES + wire.HEADER.size)
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- sending -------------------------------------------------------------------
    def send(self, message) -> None:
        """Send one message."""
        self.send_bytes(message.encode())

    def send_bytes(self, *parts: bytes | memoryview) -> None:
        """Send encoded frame bytes, all parts back to back under one lock."""
        with self._send_lock:
            self._sendmsg_all(parts)

    def send_page_run(self, first_page: int, npages: int, cause: wire.Cause, data) -> None:
        """Send a page run from a buffer without copying it into a frame."""
        header = wire.encode_page_run_header(first_page, npages, cause, self.layout.page_size)
        with self._send_lock:
            self._sendmsg_all((header, data))

    def sendfile_page_run(self, first_page: int, npages: int, cause: wire.Cause, fd: int, offset: int) -> None:
        """Send a page run straight from a file (a memfd) with sendfile(2): no copy in
        user space and nothing of the file mapped here, so RSS stays flat."""
        page_size = self.layout.page_size
        header = wire.encode_page_run_header(first_page, npages, cause, page_size)
        count = npages * page_size
        with self._send_lock:
            # MSG_MORE: the header leaves in the same segment as the first page bytes.
            self._sendmsg_all((header,), socket.MSG_MORE)
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

    def _sendmsg_all(self, parts, flags: int = 0) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(len(v) for v in views)
        try:
            while views:
                sent = self.sock.sendmsg(views, (), flags)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            raise ChannelClosed(f"{self.name}: send failed: {exc}") from exc
        self.bytes_sent += total

    # -- receiving -----------------------------------------------------------------
    def _recv_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except OSError as exc:
                raise ChannelClosed(f"{self.name}: receive failed: {exc}") from exc
            if n == 0:
                raise ChannelClosed(f"{self.name}: the peer closed the connection")
            got += n
        self.bytes_received += got

    def recv(self):
        """Receive and decode the next message (raises wire.ProtocolError on bad bytes)."""
        header_view = memoryview(self._header)
        self._recv_exact(header_view)
        header = wire.decode_header(header_view)
        if header.length > len(self._buffer):
            raise wire.ProtocolError(f"{self.name}: frame of {header.length} bytes exceeds the receive buffer")
        payload = memoryview(self._buffer)[: header.length]
        self._recv_exact(payload)
        return wire.decode_payload(header, payload, self.layout)

    def close(self) -> None:
        """Shut the connection down (wakes a thread blocked in recv) and close it."""
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
    """Run the authenticated handshake on a fresh channel; set its layout.

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
                except ChannelClosed:
                    pass
            raise
        for frame in replies:
            channel.send_bytes(frame)
    channel.layout = shake.layout
    return PeerInfo(hello=shake.peer, layout=shake.layout)
