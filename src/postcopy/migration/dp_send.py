"""The source's native data plane (``native/dp_send.c``): the push loop and the demand
server run in C without the GIL, one call at a time, while Python plans what to push
(batches of page ranges) and owns the phases. A :class:`SendPlane` holds what both loops
share: the guest's RAM, the per-page "sent once" map, the populated extents, the hint
left by the last demand request, and the stop flag."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from postcopy._native import ffi, lib
from postcopy.migration.guestmem import GuestMemory
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, ChannelClosed

DONE, STOPPED = lib.PC_DP_DONE, lib.PC_DP_STOPPED
CLOSED, FRAME = lib.PC_DP_CLOSED, lib.PC_DP_FRAME
_PUSH_KINDS = ("ZERO_RANGE",)  # plus the page runs' cause


@dataclass
class Counts:
    """What one call did."""

    pages_sent: int = 0
    pages_zero: int = 0
    requests: int = 0
    held_back_s: float = 0.0
    bytes_received: int = 0


def _counts(c) -> Counts:
    return Counts(c.pages_sent, c.pages_zero, c.requests, c.held_back_ns / 1e9, c.bytes_received)


def _raise_for(rc: int, channel: Channel) -> None:
    if rc < 0:
        raise ChannelClosed(f"{channel.name}: send or receive failed: {os.strerror(-rc)}")
    if rc == lib.PC_DP_SHORT_FILE:
        raise ChannelClosed(f"{channel.name}: sendfile reached the end of the guest RAM file")


class SendPlane:
    """The native context of one guest's RAM and its ``sent`` map (a bytearray of one
    byte per page, kept alive and never resized while this lives)."""

    def __init__(self, mem: GuestMemory, sent: bytearray, rate: float = 0.0, burst: int = 1 << 20):
        if len(sent) != mem.npages:
            raise ValueError(f"a sent map of {len(sent)} bytes for {mem.npages} pages")
        self.page_size = mem.page_size
        self.npages = mem.npages
        self._sent = ffi.from_buffer(sent)  # pins the bytearray: it cannot be resized
        memfd, mem_fd, pagemap_fd = mem.native_handles()
        ctx = lib.pc_dp_send_new(memfd, mem_fd, pagemap_fd, mem.pid, mem.base, mem.size, mem.page_size,
                                 self._sent, mem.npages)
        if ctx == ffi.NULL:
            raise OSError(ffi.errno, "cannot map the guest RAM for the data plane")
        self._ctx = ffi.gc(ctx, lib.pc_dp_send_free)
        regions = [v for offset, length in mem.layout.regions
                   for v in (offset // mem.page_size, (offset + length) // mem.page_size)]
        if lib.pc_dp_send_set_regions(self._ctx, ffi.new("uint64_t[]", regions), len(regions) // 2):
            raise MemoryError("cannot hold the RAM layout")
        self._rate = ffi.new("struct pc_dp_rate *", {"rate": rate, "burst": float(max(burst, 1)),
                                                     "tokens": float(max(burst, 1)),
                                                     "stamp_ns": time.monotonic_ns()})

    def set_extents(self, runs: list[tuple[int, int]]) -> None:
        """The populated runs (set once: RAM does not change after the switchover)."""
        flat = ffi.new("uint64_t[]", [v for run in runs for v in run] or [0])
        if lib.pc_dp_send_set_extents(self._ctx, flat, len(runs)):
            raise MemoryError("cannot hold the populated extents")

    def stop(self, flag: bool = True) -> None:
        """Make a running push return between two runs (or let the next one run)."""
        lib.pc_dp_send_stop(self._ctx, int(flag))

    def refuse_requests(self) -> None:
        """From now on the demand server hands every request back to Python, whose
        session decides (after the destination's Complete it takes no request)."""
        lib.pc_dp_send_refuse_requests(self._ctx, 1)

    def served(self) -> int:
        """Demand requests answered since this plane was made."""
        return int(lib.pc_dp_send_served(self._ctx))

    def take_hint(self) -> int | None:
        """The end page of the last demand request since the last call, if any."""
        hint = lib.pc_dp_send_take_hint(self._ctx)
        return None if hint < 0 else hint

    def mark(self, first: int, end: int, sent: bool) -> None:
        """Mark [first, end) sent or unsent, under the lock every claim takes."""
        lib.pc_dp_send_mark(self._ctx, first, end, int(sent))

    def push(self, channel: Channel, ranges: list[tuple[int, int]], run_pages: int,
             cause: wire.Cause = wire.Cause.PUSHED, prepage: tuple[int, int] = (0, 0)) -> tuple[int, Counts]:
        """Send the unsent pages of each [first, end) in order (rate limited); after each
        demand request the unsent pages of its pre-paging window go first: ``prepage``
        = (min, max) pages, doubled from min each time the same sequential stream faults
        again (see native/dp_send.h; (0, 0): none). Returns (DONE | STOPPED, counts).
        Raises ChannelClosed if the link broke."""
        flat = ffi.new("uint64_t[]", [v for r in ranges for v in r] or [0])
        counts = ffi.new("struct pc_dp_counts *")
        with channel.native_send(f"PAGE_RUN/{wire.Cause(cause).name}", *_PUSH_KINDS) as link:
            rc = lib.pc_dp_push(self._ctx, link, flat, len(ranges), run_pages, *prepage, int(cause), self._rate,
                                counts)
        _raise_for(rc, channel)
        return rc, _counts(counts)

    def serve(self, channel: Channel, run_pages: int, ready=None) -> tuple[int, Counts]:
        """Answer page requests on ``channel`` until it closes (CLOSED) or a frame C does
        not take arrives (FRAME: the channel's next recv decodes it). ``ready`` (an
        event) is set as the call goes into C, where it needs the GIL no more."""
        counts = ffi.new("struct pc_dp_counts *")
        with channel.native_receive() as (fd, verifier, seq, buf, cap, start, end):
            with channel.native_send("PAGE_RUN/DEMAND", *_PUSH_KINDS) as link:
                if ready is not None:
                    ready.set()
                rc = lib.pc_dp_serve(self._ctx, link, fd, verifier, seq, buf, cap, start, end, run_pages, counts)
        channel.bytes_received += counts.bytes_received
        if rc != CLOSED:
            _raise_for(rc, channel)
        return rc, _counts(counts)


def parse_request(data: bytes, verifier: wire.FrameAuth | None, layout: wire.Layout):
    """C's verdict on ``data`` as a page request frame: ("ok", first, npages, frame
    bytes), ("more",) or ("other",). For the tests that hold it to the Python decoder."""
    ps = layout.page_size
    regions = [v for offset, length in layout.regions for v in (offset // ps, (offset + length) // ps)]
    first, npages, used = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("size_t *")
    buf = ffi.from_buffer(data) if data else ffi.new("uint8_t[]", 1)
    ctx = verifier._ctx if verifier is not None else ffi.NULL
    verdict = lib.pc_dp_parse_request(buf, len(data), ctx, verifier.seq if verifier is not None else 0,
                                      ffi.new("uint64_t[]", regions or [0]), len(regions) // 2, first, npages, used)
    if verdict == lib.PC_DP_REQUEST_OK:
        return ("ok", first[0], npages[0], used[0])
    return ("more",) if verdict == lib.PC_DP_REQUEST_MORE else ("other",)


def header(ftype: int, flags: int, length: int, arg: int) -> bytes:
    """A frame header built by C."""
    out = ffi.new("uint8_t[]", wire.HEADER.size)
    lib.pc_dp_header(out, ftype, flags, length, arg)
    return bytes(ffi.buffer(out))
