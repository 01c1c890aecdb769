"""The primary's connection to its standby: connected (retried while the standby is not
listening yet) and authenticated, and closed without losing the last frames."""
from __future__ import annotations

import socket
import time
from typing import Callable

from postcopy.checkpoint.config import CheckpointConfig, CheckpointError
from postcopy.migration.guestmem import GuestMemory
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, ChannelClosed, handshake, tune


def connect_standby(cfg: CheckpointConfig, mem: GuestMemory,
                    socket_factory: Callable[[], socket.socket] | None) -> Channel:
    """Connect (retrying while the standby is not listening yet) and authenticate;
    the channel's session is established (the checkpoint protocol proper begins)."""
    factory = socket_factory or (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    deadline = time.monotonic() + cfg.connect_timeout
    while True:
        s = factory()
        try:
            s.settimeout(cfg.connect_timeout)
            s.connect(cfg.endpoint)
            break
        except OSError as exc:
            s.close()
            if time.monotonic() > deadline:
                raise CheckpointError(f"cannot reach the standby at {cfg.endpoint[0]}:{cfg.endpoint[1]}: "
                                      f"{exc}") from None
            time.sleep(0.05)
    s.settimeout(None)
    tune(s, urgent=False)
    channel = Channel(s, "main", mem.layout, wire.Session(wire.CHECKPOINT, "primary"))
    hello = wire.make_hello("primary", "main", mem.page_size, mem.layout.regions)
    try:
        handshake(channel, "client", cfg.key, hello)
    except (wire.ProtocolError, ChannelClosed) as exc:
        channel.close()
        raise CheckpointError(f"handshake with the standby failed: {exc}") from None
    channel.session.established()
    return channel


def close_channel(channel: Channel) -> None:
    """Close after reading what the standby still sends (acknowledgements) up to its
    end of stream: closing with unread data would reset the connection, and a reset
    can discard our last frames (an Error) before the standby reads them."""
    sock = channel.sock
    if sock is not None and sock.fileno() >= 0:
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(2.0)
            while sock.recv(65536):
                pass
        except OSError:
            pass
    channel.close()
