"""The receive side of the data plane in C: a :class:`PageReceiver` takes a channel's
PAGE_RUN and ZERO_RANGE frames straight from its socket (``pc_dp_recv`` in
native/dp_recv.c, without the GIL) and hands each to a sink: the destination's page
table (:func:`table_sink`: the copy path's gated UFFDIO_COPY and zero marks), or plain
memory (:func:`memory_sink`). Every other frame, and anything the decoder would refuse,
goes back to the channel, whose next ``recv`` decodes it and checks it against the
session as before.

The session decides once per call which data frames C may take: those legal in the
current phase that leave it unchanged (:meth:`postcopy.protocol.state.Session.loops`);
C re-reads the session's phase word before taking each frame and hands back as soon as
another thread changed the phase."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from postcopy._native import ffi, lib
from postcopy.kernel.uffd import UffdError
from postcopy.migration.install import CAUSE_NAMES, OVERWRITE_CAUSES, install_error
from postcopy.migration.pagetable import PageTable, native_error
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel

DATA_KINDS = (*(f"PAGE_RUN/{cause.name}" for cause in wire.Cause), "ZERO_RANGE")
FRAME, PHASE, STOPPED, CLOSED, SINK = (lib.PC_DP_RECV_FRAME, lib.PC_DP_RECV_PHASE, lib.PC_DP_RECV_STOPPED,
                                       lib.PC_DP_RECV_CLOSED, lib.PC_DP_RECV_SINK)


@dataclass
class Sink:
    """Where the C receiver puts frames: the ``struct pc_dp_sink``, what it points to
    (kept alive here), and the exception for a failed sink's code."""

    native: object
    keep: tuple = ()
    error: Callable[[int], Exception] = native_error


@dataclass
class ReceiveCounts:
    """What the C receiver took, in total."""

    frames: int = 0
    pages: dict[wire.Cause, int] = field(default_factory=dict)
    zero_pages: int = 0
    first_ns: dict[wire.Cause, int] = field(default_factory=dict)  # the first run of each cause


def table_sink(table: PageTable) -> Sink:
    """The destination's copy install path as a sink: pages counted under the causes
    :class:`postcopy.migration.install.CopyPath` counts them under; precopy resends
    overwrite; zero ranges marked, their waiters zero-filled (as FaultServer.mark_zero)."""
    ctx = ffi.new("struct pc_dp_table_sink *")
    ctx.table = table.native
    for cause in wire.Cause:
        ctx.cause_index[cause] = table.cause_index(CAUSE_NAMES.get(cause, "pushed"))
    ctx.overwrite = sum(1 << cause for cause in OVERWRITE_CAUSES)
    sink = ffi.new("struct pc_dp_sink *")
    lib.pc_dp_sink_table(sink, ctx)

    def error(rc: int) -> Exception:
        if ctx.failed == lib.PC_DP_SINK_INSTALL:
            return install_error(rc)
        if ctx.failed == lib.PC_DP_SINK_ZERO_FILL:
            return UffdError(-rc, "UFFDIO_ZEROPAGE", ffi.string(lib.pc_dp_error()).decode(errors="replace"))
        return native_error(rc)
    return Sink(sink, (ctx, table), error)


def memory_sink(memory, page_size: int) -> Sink:
    """Plain memory as a sink (a writable buffer of whole pages): runs copied in, zero
    ranges zero-filled."""
    view = ffi.from_buffer(memory, require_writable=True)
    mem = ffi.new("struct pc_dp_memory *")
    mem.base, mem.npages, mem.page_size = view, len(view) // page_size, page_size
    sink = ffi.new("struct pc_dp_sink *")
    lib.pc_dp_sink_memory(sink, mem)
    return Sink(sink, (mem, view, memory), lambda rc: IndexError(f"a frame's pages lie outside the memory ({rc})"))


class PageReceiver:
    """Takes the data frames of one channel in C (see the module docstring). One per
    channel, used by its receiving thread only; ``stop`` (a C ``int *``, e.g. the
    table's stop flag) makes a waiting call return."""

    def __init__(self, layout: wire.Layout, sink: Sink, stop=ffi.NULL) -> None:
        ps = layout.page_size
        self._regions = ffi.new("uint64_t[]", [v for offset, length in layout.regions
                                               for v in (offset // ps, (offset + length) // ps)] or [0])
        rules = self._rules = ffi.new("struct pc_dp_recv_rules *")
        rules.page_size, rules.max_payload = ps, wire.MAX_PAYLOAD
        rules.regions, rules.nregions = self._regions, len(layout.regions)
        rules.known_causes = sum(1 << cause for cause in wire.Cause)
        rules.page_run_type, rules.zero_range_type = wire.FrameType.PAGE_RUN, wire.FrameType.ZERO_RANGE
        rules.stop = stop
        self.sink = sink
        self._buffer = ffi.new("uint8_t[]", lib.pc_dp_recv_min_buffer(rules))
        self._counts = ffi.new("struct pc_dp_recv_counts *")
        self.counts = ReceiveCounts()

    def receive(self, channel: Channel) -> int:
        """Take data frames from ``channel`` until a frame C leaves to Python (FRAME),
        a phase change (PHASE), the stop flag (STOPPED), the end of the stream (CLOSED)
        or a receive error (-errno): in each case the channel's next ``recv`` goes on
        from there. Raises the sink's error if a frame could not be put in place.
        Returns at once (FRAME) when the session lets no data frame through now."""
        rules = self._rules
        session = channel.session
        if session is not None:
            kinds, rules.phase = session.loops(DATA_KINDS)
            rules.phase_word = session.phase_word
        else:
            kinds, rules.phase_word = frozenset(DATA_KINDS), ffi.NULL
        rules.taken_causes = sum(1 << cause for cause in wire.Cause if f"PAGE_RUN/{cause.name}" in kinds)
        rules.take_zero_ranges = int("ZERO_RANGE" in kinds)
        if not rules.taken_causes and not rules.take_zero_ranges:
            return FRAME
        counts = self._counts
        ffi.memmove(counts, bytes(ffi.sizeof(counts[0])), ffi.sizeof(counts[0]))
        with channel.native_receive(buffer=self._buffer) as (fd, verify, seq, buf, cap, start, end):
            rc = lib.pc_dp_recv(rules, self.sink.native, fd, verify, seq, buf, cap, start, end, counts)
        channel.bytes_received += counts.bytes_received
        self._add(counts)
        if rc == SINK:
            raise self.sink.error(counts.sink_rc)
        return rc

    def _add(self, counts) -> None:
        total = self.counts
        total.frames += counts.frames
        total.zero_pages += counts.zero_pages
        for cause in wire.Cause:
            if counts.pages[cause]:
                total.pages[cause] = total.pages.get(cause, 0) + counts.pages[cause]
            if counts.first_ns[cause] and cause not in total.first_ns:
                total.first_ns[cause] = counts.first_ns[cause]
