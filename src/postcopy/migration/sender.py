"""The source's page mover: precopy runs, the postcopy pusher's sweep and the demand
server on the urgent channel. It decides nothing about phases (that is the agent's
job); it keeps the per-page "sent once" map, the page counters and the pre-paging hint
that the pusher and the demand server share."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from postcopy import ranges
from postcopy.kernel.priority import make_current_thread_urgent
from postcopy.migration.guestmem import GuestMemory, PageExtents
from postcopy.migration.ratelimit import RateLimiter
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, ChannelClosed
from postcopy.protocol.wire import MAX_RUN_BYTES

PREPAGE_PAGES = 16  # pages pushed right behind each demand fault


class UrgentChannelFailed(RuntimeError):
    """The demand server failed (not a broken link): the migration fails."""


@dataclass
class SourceStats:
    """Page counters, updated by the pusher and the urgent server at once: use add()."""

    pages_precopy: int = 0
    pages_resent: int = 0
    pages_pushed: int = 0
    pages_demand: int = 0
    pages_zero: int = 0
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, count: int) -> None:
        with self._lock:  # += on an attribute is a read and a write: two threads lose counts
            setattr(self, name, getattr(self, name) + count)

    def pages(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k.startswith("pages_")}


_CAUSE_COUNTERS = {
    wire.Cause.PRECOPY: "pages_precopy",
    wire.Cause.RESENT: "pages_resent",
    wire.Cause.PUSHED: "pages_pushed",
    wire.Cause.DEMAND: "pages_demand",
}


class PageSender:
    """Sends the pages of one guest (``mem``). ``precopy_limit`` bounds precopy
    rounds, ``push_limit`` the postcopy pusher; demand pages are never held back.
    ``on_progress(bytes)`` is called after each run the pusher or precopy sent."""

    def __init__(self, mem: GuestMemory, run_pages: int, *, precopy_limit: RateLimiter | None = None,
                 push_limit: RateLimiter | None = None, on_progress: Callable[[int], None] = lambda n: None):
        self.mem = mem
        self.run_pages = min(run_pages, MAX_RUN_BYTES // mem.page_size)
        self.stats = SourceStats()
        self.precopy_limit = precopy_limit or RateLimiter(0)
        self.push_limit = push_limit or RateLimiter(0)
        self.link_lost = threading.Event()  # set by the demand server when its channel closes
        self.urgent_error: BaseException | None = None
        self._on_progress = on_progress
        self._sent = bytearray(mem.npages)  # per page: sent once already
        self._sent_lock = threading.Lock()
        self._priority: ranges.Runs = []  # pushed before the sweep (hybrid: the stale set)
        self._hint: int | None = None  # next page for the pusher after a demand fault
        self._extents: PageExtents | None = None
        self._scratch = GuestMemory.scratch() if mem.memfd is None else None

    # -- precopy -----------------------------------------------------------------------
    def send_precopy(self, main: Channel, runs: ranges.Runs, resend: bool) -> int:
        """Round 0 covers all of RAM (the gaps go as zero ranges); later rounds send
        just the dirty runs. Returns the bytes this sent."""
        before = main.bytes_sent
        if resend:
            for first, count in ranges.split(runs, self.run_pages):
                self.precopy_limit.consume(count * self.mem.page_size)
                self.mem.send_run(main, first, count, wire.Cause.RESENT, self._scratch)
                self.stats.add("pages_resent", count)
                self._on_progress(count * self.mem.page_size)
        else:
            self._send_range(main, 0, self.mem.npages, runs, wire.Cause.PRECOPY, self._scratch,
                             self.precopy_limit)
        return main.bytes_sent - before

    def send_state(self, main: Channel) -> None:
        """The state page, with the Switchover."""
        self.mem.send_run(main, 0, 1, wire.Cause.STATE, self._scratch)

    def prepare_postcopy(self, stale: ranges.Runs, precopied: bool) -> None:
        """What is left to push: everything (pure postcopy) or the stale pages
        (hybrid), which go first: the guest is most likely to touch them next."""
        self._sent = bytearray(b"\x01" * self.mem.npages) if precopied else bytearray(self.mem.npages)
        for first, count in stale:
            self._sent[first:first + count] = bytes(count)
        self._sent[0] = 1  # the state page went with the switchover
        self._priority = list(stale)

    def outstanding_after_recovery(self, missing: ranges.Runs) -> None:
        """After a reconnect: exactly what the destination says it lacks is unsent."""
        with self._sent_lock:
            self._sent = bytearray(b"\x01" * self.mem.npages)
            for first, count in missing:
                self._sent[first:first + count] = bytes(count)
        self._priority = list(missing)
        self.link_lost.clear()
        self.urgent_error = None

    # -- pusher ------------------------------------------------------------------------
    def push(self, main: Channel) -> None:
        """Send every page not yet sent: the priority runs first, then a sequential
        sweep in large runs (zero ranges for untouched pages); after each demand fault a
        short window right behind the faulting page goes first (pre-paging)."""
        sent = self._sent
        if sent.find(0) < 0:
            return  # precopy sent it all
        npages = self.mem.npages
        extents = self._extents = PageExtents(self.mem.populated_extents())
        for first, count in ranges.split(self._priority, self.run_pages):
            self._check()
            self._prepage(main, extents)
            self._push_unsent(main, extents, first, first + count)
        pos = 0
        while True:
            self._check()
            self._prepage(main, extents)
            first = sent.find(0, pos)
            if first < 0:
                first = sent.find(0)
                if first < 0:
                    return
            end = min(first + self.run_pages, npages)
            self._push_unsent(main, extents, first, end)
            pos = end

    def _check(self) -> None:
        if self.link_lost.is_set():
            raise ChannelClosed("the urgent channel broke")
        if self.urgent_error is not None:
            raise UrgentChannelFailed(f"urgent channel failed: {self.urgent_error}")

    def _prepage(self, main: Channel, extents: PageExtents) -> None:
        hint, self._hint = self._hint, None
        if hint is not None and hint < self.mem.npages:
            self._push_unsent(main, extents, hint, min(hint + PREPAGE_PAGES, self.mem.npages))

    def _push_unsent(self, main: Channel, extents: PageExtents, first: int, end: int) -> None:
        """Push the pages of [first, end) not sent yet."""
        sent = self._sent
        while first < end:
            with self._sent_lock:  # find and claim at once: the urgent server marks pages too
                first = sent.find(0, first, end)
                if first < 0:
                    return
                stop = sent.find(1, first, end)
                stop = end if stop < 0 else stop
                sent[first:stop] = b"\x01" * (stop - first)
            self._send_range(main, first, stop, extents.runs_in(first, stop), wire.Cause.PUSHED, self._scratch,
                             self.push_limit)
            first = stop

    def _send_range(self, channel: Channel, first: int, end: int, runs: ranges.Runs, cause: wire.Cause,
                    scratch: bytearray | None, limit: RateLimiter | None = None) -> None:
        """Send [first, end): the populated runs as pages (frames of at most run_pages),
        the gaps as zero ranges."""
        cursor = first
        stats = self.stats
        counter = _CAUSE_COUNTERS[cause]
        page_size = self.mem.page_size
        for start, count in ranges.split(runs, self.run_pages):
            if start > cursor:
                channel.send(wire.ZeroRange(first_page=cursor, npages=start - cursor))
                stats.add("pages_zero", start - cursor)
            if limit is not None:
                limit.consume(count * page_size)
            self.mem.send_run(channel, start, count, cause, scratch)
            stats.add(counter, count)
            if limit is not None:
                self._on_progress(count * page_size)
            cursor = start + count
        if cursor < end:
            channel.send(wire.ZeroRange(first_page=cursor, npages=end - cursor))
            stats.add("pages_zero", end - cursor)

    # -- urgent channel ----------------------------------------------------------------
    def serve_urgent(self, urgent: Channel) -> None:
        """Answer page requests at once; they never queue behind pushed data, and no
        bandwidth limit holds them back. Run in a thread of its own."""
        make_current_thread_urgent()
        mem = self.mem
        scratch = GuestMemory.scratch() if mem.memfd is None else None
        try:
            while True:
                message = urgent.recv()
                if not isinstance(message, wire.PageRequest):
                    raise wire.ProtocolError(f"unexpected {type(message).__name__} on the urgent channel")
                self.stats.add("requests", 1)
                first, end = message.first_page, message.first_page + message.npages
                if self._extents is not None:
                    runs = self._extents.runs_in(first, end)
                else:  # the pusher is still sweeping the extents: ask page by page
                    runs = [(page, 1) for page in range(first, end) if mem.is_populated(page)]
                self._send_range(urgent, first, end, runs, wire.Cause.DEMAND, scratch)
                with self._sent_lock:
                    self._sent[first:end] = b"\x01" * (end - first)
                self._hint = end
        except ChannelClosed:
            # Either every page is in (the destination closes the channel), or the link
            # broke: the pusher notices and recovers.
            self.link_lost.set()
        except BaseException as exc:  # surfaced by the pusher
            self.urgent_error = exc
