"""The receive side of the data plane in C: a :class:`PageReceiver` takes a channel's
PAGE_RUN and ZERO_RANGE frames straight from its socket (``pc_dp_recv`` in
native/dp_recv.c, without the GIL) and hands each to a sink: the destination's page
table (:func:`table_sink`: the copy path's gated UFFDIO_COPY and zero marks;
:func:`continue_sink`: the continue path, each run received straight into the memfd's
page cache and mapped with UFFDIO_CONTINUE once authenticated), or plain memory
(:func:`memory_sink`). Every other frame, and anything the decoder would refuse,
goes back to the channel, whose next ``recv`` decodes it and checks it against the
session as before.

The session decides once per call which data frames C may take: those legal in the
current phase that leave it unchanged (:meth:`postcopy.protocol.state.Session.loops`);
C re-reads the session's phase word before taking each frame and hands back as soon as
another thread changed the phase."""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Callable

from postcopy._native import ffi, lib
from postcopy.kernel.uffd import UffdError
from postcopy.migration.install import CAUSE_NAMES, OVERWRITE_CAUSES, install_error
from postcopy.migration.pagetable import PageTable, native_error
from postcopy.migration.prealloc import map_guest_ram
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel
from postcopy.protocol.errors import IntegrityError

DATA_KINDS = (*(f"PAGE_RUN/{cause.name}" for cause in wire.Cause), "ZERO_RANGE")
FRAME, PHASE, STOPPED, CLOSED, SINK, FORGED = (lib.PC_DP_RECV_FRAME, lib.PC_DP_RECV_PHASE, lib.PC_DP_RECV_STOPPED,
                                               lib.PC_DP_RECV_CLOSED, lib.PC_DP_RECV_SINK, lib.PC_DP_RECV_FORGED)


@dataclass
class Sink:
    """Where the C receiver puts frames: the ``struct pc_dp_sink``, what it points to
    (kept alive here), and the exception for a failed sink's code."""

    native: object
    keep: tuple = ()
    error: Callable[[int], Exception] = native_error


@dataclass
class ReceiveCounts:
    """What the C receiver took, in total (a snapshot)."""

    frames: int = 0
    pages: dict[wire.Cause, int] = field(default_factory=dict)
    zero_pages: int = 0
    first_ns: dict[wire.Cause, int] = field(default_factory=dict)  # the first run of each cause


def _table_ctx(table: PageTable):
    """The copy path's sink context: pages counted under the causes
    :class:`postcopy.migration.install.CopyPath` counts them under; precopy resends overwrite."""
    ctx = ffi.new("struct pc_dp_table_sink *")
    ctx.table = table.native
    for cause in wire.Cause:
        ctx.cause_index[cause] = table.cause_index(CAUSE_NAMES.get(cause, "pushed"))
    ctx.overwrite = sum(1 << cause for cause in OVERWRITE_CAUSES)
    return ctx


def _table_error(ctx):
    def error(rc: int) -> Exception:
        if ctx.failed in (lib.PC_DP_SINK_INSTALL, lib.PC_DP_SINK_CONTINUE):
            return install_error(rc)
        if ctx.failed == lib.PC_DP_SINK_ZERO_FILL:
            return UffdError(-rc, "UFFDIO_ZEROPAGE", ffi.string(lib.pc_dp_error()).decode(errors="replace"))
        return native_error(rc)
    return error


def table_sink(table: PageTable) -> Sink:
    """The destination's copy install path as a sink: runs installed with gated
    UFFDIO_COPY, zero ranges marked, their waiters zero-filled (as FaultServer.mark_zero)."""
    ctx = _table_ctx(table)
    sink = ffi.new("struct pc_dp_sink *")
    lib.pc_dp_sink_table(sink, ctx)
    return Sink(sink, (ctx, table), _table_error(ctx))


def continue_sink(table: PageTable, memfd: int, slot: int, page_size: int, in_place: bool = False,
                  ram: mmap.mmap | None = None) -> Sink:
    """The continue install path as a sink (see native/dp_recv_cont.h): each page run
    written into the guest's memfd (staged: each gated piece received into a buffer the
    CPU's cache holds, then pwrite; ``in_place``: received straight into this agent's own
    mapping of the memfd, ``ram`` if given (e.g. populated by --prealloc, shared by both
    channels' sinks) or one of its own), mapped with UFFDIO_CONTINUE once its tag checks
    out; zero ranges as :func:`table_sink`. ``slot``: this channel's claim slot (0 or
    1), one per receiving channel. The table must be attached to the guest with its memfd."""
    if slot not in (0, 1):
        raise ValueError(f"claim slot {slot} (a channel's is 0 or 1)")
    base = _table_ctx(table)
    run_pages = wire.MAX_PAYLOAD // page_size
    scratch = ffi.new("uint8_t[]", wire.MAX_PAYLOAD)  # pages only touched where runs pass
    where = ffi.new("uint8_t[]", run_pages)
    ctx = ffi.new("struct pc_dp_cont_sink *")
    ctx.base, ctx.scratch, ctx.where, ctx.max_run_pages, ctx.slot = base, scratch, where, run_pages, slot
    cache = None
    if in_place:
        cache = ram if ram is not None else map_guest_ram(memfd, table.npages * page_size)
        ctx.cache = ffi.from_buffer(cache)
    sink = ffi.new("struct pc_dp_sink *")
    lib.pc_dp_sink_cont(sink, ctx)
    return Sink(sink, (ctx, base, cache, scratch, where, table), _table_error(base))


def channel_sinks(path: str, table: PageTable, memfd: int | None, page_size: int,
                  ram: mmap.mmap | None = None) -> dict[str, Sink]:
    """The destination's sink for each channel (main, urgent) on install path ``path``
    (copy or continue; continue: one claim slot per channel, staged, or in place into
    ``ram``, the guest's RAM populated by --prealloc)."""
    if path == "copy":
        return {name: table_sink(table) for name in ("main", "urgent")}
    if path != "continue" or memfd is None:
        raise ValueError(f"no C receive for install path {path!r} (without a memfd: {memfd is None})")
    return {name: continue_sink(table, memfd, slot, page_size, in_place=ram is not None, ram=ram)
            for slot, name in enumerate(("main", "urgent"))}


def memory_sink(memory, page_size: int) -> Sink:
    """Plain memory as a sink (a writable buffer of whole pages): runs copied in, zero
    ranges zero-filled."""
    view = ffi.from_buffer(memory, require_writable=True)
    mem = ffi.new("struct pc_dp_memory *")
    mem.base, mem.npages, mem.page_size = view, len(view) // page_size, page_size
    sink = ffi.new("struct pc_dp_sink *")
    lib.pc_dp_sink_memory(sink, mem)
    return Sink(sink, (mem, view, memory), lambda rc: IndexError(f"a frame's pages lie outside the memory ({rc})"))


def receive_rules(layout: wire.Layout):
    """The checks C makes of a page frame as the decoder makes them (``struct
    pc_dp_recv_rules``: the layout, the payload limit, the causes and frame types);
    which causes it takes is the caller's to set. Returns the rules and the regions
    array they point to (keep both)."""
    ps = layout.page_size
    regions = ffi.new("uint64_t[]", [v for offset, length in layout.regions
                                     for v in (offset // ps, (offset + length) // ps)] or [0])
    rules = ffi.new("struct pc_dp_recv_rules *")
    rules.page_size, rules.max_payload = ps, wire.MAX_PAYLOAD
    rules.regions, rules.nregions = regions, len(layout.regions)
    rules.known_causes = sum(1 << cause for cause in wire.Cause)
    rules.page_run_type, rules.zero_range_type = wire.FrameType.PAGE_RUN, wire.FrameType.ZERO_RANGE
    return rules, regions


class PageReceiver:
    """Takes the data frames of one channel in C (see the module docstring). One per
    channel, used by its receiving thread only; ``stop`` (a C ``int *``, e.g. the
    table's stop flag) makes a waiting call return."""

    def __init__(self, layout: wire.Layout, sink: Sink, stop=ffi.NULL) -> None:
        rules, self._regions = receive_rules(layout)
        self._rules = rules
        rules.stop = stop
        self.sink = sink
        self._buffer = ffi.new("uint8_t[]", lib.pc_dp_recv_min_buffer(rules))
        self._counts = ffi.new("struct pc_dp_recv_counts *")

    def receive(self, channel: Channel) -> int:
        """Take data frames from ``channel`` until a frame C leaves to Python (FRAME),
        a phase change (PHASE), the stop flag (STOPPED), the end of the stream (CLOSED)
        or a receive error (-errno): in each case the channel's next ``recv`` goes on
        from there. Raises the sink's error if a frame could not be put in place.
        Returns at once (FRAME) when the session lets no data frame through now. A phase
        changed meanwhile (by another thread) is looked up again in the session, and
        the frames it lets through are taken on."""
        while (rc := self._receive(channel)) == PHASE:
            pass
        return rc

    def _receive(self, channel: Channel) -> int:
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
        counts = self._counts  # added to by every call, read live by counts
        before = counts.bytes_received
        with channel.native_receive(buffer=self._buffer) as (fd, verify, seq, buf, cap, start, end):
            rc = lib.pc_dp_recv(rules, self.sink.native, fd, verify, seq, buf, cap, start, end, counts)
        channel.bytes_received += counts.bytes_received - before
        if rc == SINK:
            raise self.sink.error(counts.sink_rc)
        if rc == FORGED:
            raise IntegrityError(f"{channel.name}: frame {counts.frames} of this receiver (a PAGE_RUN received "
                                 f"in place) failed authentication: altered, replayed, reordered or not from the "
                                 f"peer; none of its pages was mapped")
        return rc

    @property
    def counts(self) -> ReceiveCounts:
        """What this receiver took so far (a call under way included)."""
        c = self._counts
        return ReceiveCounts(frames=c.frames, zero_pages=c.zero_pages,
                             pages={cause: c.pages[cause] for cause in wire.Cause if c.pages[cause]},
                             first_ns={cause: c.first_ns[cause] for cause in wire.Cause if c.first_ns[cause]})
