"""A channel's two sides lent to a native epoch loop for one call (native/ckpt_link.h):
the send side checked against the session for the frames the loop sends, the receive
side with the decoder's buffered bytes, handed back with what the loop left."""
from __future__ import annotations

from contextlib import contextmanager

from postcopy._native import ffi
from postcopy.protocol.channel import Channel


@contextmanager
def lend(channel: Channel, rx, send_kinds: tuple[str, ...], buffer):
    """Fill ``rx`` (a ``struct pc_ckpt_rx``) with ``channel``'s receive side, its
    buffer ``buffer``; yields the send side (``struct pc_dp_link *``, checked for
    ``send_kinds`` in that order). Afterwards the decoder goes on from what the loop
    left, the sealer and verifier from their next sequence numbers."""
    with channel.native_send(*send_kinds) as link, \
            channel.native_receive(buffer=buffer) as (fd, verify, seq, buf, cap, start, end):
        rx.fd, rx.verify, rx.seq = fd, verify, seq[0]
        rx.buf, rx.cap, rx.start, rx.end, rx.bytes_received = buf, cap, start[0], end[0], 0
        try:
            yield link
        finally:
            seq[0], start[0], end[0] = rx.seq, rx.start, rx.end
            rx.verify = rx.buf = ffi.NULL
            channel.bytes_received += rx.bytes_received
