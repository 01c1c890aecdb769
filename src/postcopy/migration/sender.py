"""The source's page mover: precopy runs, the postcopy pusher's sweep and the demand
server on the urgent channel. It decides nothing about phases (that is the agent's
job); it keeps the per-page "sent once" map and the page counters, and plans the push
order and pre-paging; after the switchover the per-page work runs in C
(:mod:`postcopy.migration.dp_send`)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from postcopy import ranges
from postcopy.kernel.priority import make_current_thread_urgent
from postcopy.migration.dp_send import CLOSED, STOPPED, SendPlane
from postcopy.migration.guestmem import GuestMemory
from postcopy.migration.ratelimit import RateLimiter
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, ChannelClosed
from postcopy.protocol.state import allowed
from postcopy.protocol.wire import MAX_RUN_BYTES

# Pages pushed right behind each demand fault: 16, doubled up to 256 (1 MiB) while one
# sequential stream keeps faulting past its last window (readahead's rule, in C).
PREPAGE_PAGES = (16, 256)
PUSH_BATCH_PAGES = 4096  # pages per native push call; the plan is revised between calls
# The pusher's first start (see PageSender._hold_for_first_faults).
PUSH_HOLD_S = 0.05  # at most this long after the switchover
FIRST_FAULTS_GRACE_S = 0.02  # after the first demand request: its first step needs a few more
HOLD_POLL_S = 0.0005


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


class StampedEvent(threading.Event):
    """An event that notes when it was set (CLOCK_MONOTONIC ns; 0 while clear)."""

    at_ns = 0

    def set(self) -> None:
        self.at_ns = time.monotonic_ns()
        super().set()

    def clear(self) -> None:
        self.at_ns = 0
        super().clear()


class PageSender:
    """Sends the pages of one guest (``mem``). ``precopy_limit`` bounds precopy
    rounds, ``push_limit`` the postcopy pusher; demand pages are never held back.
    ``on_progress(bytes)`` is called after each precopy run and each pushed batch."""

    def __init__(self, mem: GuestMemory, run_pages: int, *, precopy_limit: RateLimiter | None = None,
                 push_limit: RateLimiter | None = None, on_progress: Callable[[int], None] = lambda n: None):
        self.mem = mem
        self.run_pages = min(run_pages, MAX_RUN_BYTES // mem.page_size)
        self.stats = SourceStats()
        self.precopy_limit = precopy_limit or RateLimiter(0)
        self.push_limit = push_limit or RateLimiter(0)
        self.link_lost = threading.Event()  # set by the demand server when its channel closes
        self.serving = StampedEvent()  # the demand server went into its C loop
        self.server_started_ns = 0  # its thread's latest start (the downtime's breakdown)
        self.urgent_error: BaseException | None = None
        self._on_progress = on_progress
        self._sent = bytearray(mem.npages)  # per page: sent once already (claimed under the plane's lock)
        self._priority: ranges.Runs = []  # pushed before the sweep (hybrid: the stale set)
        self._plane: SendPlane | None = None  # the native push loop and demand server, from the switchover
        self._extents_set = False
        self._held_for_first_faults = False  # the pusher's first start waits for them (once)
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
        self.make_plane(precopied)  # the map's starting marks: already written before the pause
        sent = self._sent  # changed in place: the native plane holds its address
        for first, count in stale:
            sent[first:first + count] = bytes(count)
        sent[0] = 1  # the state page went with the switchover
        self._priority = list(stale)

    def make_plane(self, precopied: bool) -> None:
        """The native push loop and demand server, made with every page's starting mark
        in the sent map: sent (precopy ran) or not (idempotent). Comes before the pause:
        it maps the RAM without reading it, and the map's pages are written here, not in
        the downtime (a first write to a fresh page can cost ~10 µs on a VM: at 2 GiB
        the map's 128 pages took 1.5 ms of downtime)."""
        if self._plane is None:
            self._sent[:] = bytes((int(precopied),)) * len(self._sent)
            self._plane = SendPlane(self.mem, self._sent, rate=self.push_limit.rate, burst=self.push_limit.burst)

    def outstanding_after_recovery(self, missing: ranges.Runs) -> None:
        """After a reconnect: exactly what the destination says it lacks is unsent."""
        plane = self._plane
        plane.mark(0, self.mem.npages, True)
        for first, count in missing:
            plane.mark(first, first + count, False)
        self._priority = list(missing)
        self.link_lost.clear()
        self.urgent_error = None
        plane.take_hint()  # a request of the lost link is no guide any more
        plane.stop(False)

    def completed(self) -> None:
        """The destination confirmed: the session takes no more page requests."""
        if self._plane is not None:
            self._plane.refuse_requests()

    def lose_link(self) -> None:
        """The link broke: the pusher returns between two runs."""
        self.link_lost.set()
        if self._plane is not None:
            self._plane.stop(True)

    # -- pusher ------------------------------------------------------------------------
    def push(self, main: Channel) -> None:
        """Send every page not yet sent: the priority runs first, then a sequential
        sweep in large runs (zero ranges for untouched pages); after each demand fault a
        short window right behind the faulting page goes first (pre-paging). Python
        plans batches of up to PUSH_BATCH_PAGES; the native plane sends them."""
        sent = self._sent
        if sent.find(0) < 0:
            return  # precopy sent it all
        if not self._held_for_first_faults:
            self._held_for_first_faults = True
            if not self._priority:  # hybrid's stale pages are the guest's next touches: they go at once
                self._hold_for_first_faults()
        if not self._extents_set:
            self._plane.set_extents(self.mem.populated_extents())
            self._extents_set = True
        for batch in _batches(self._priority, PUSH_BATCH_PAGES):
            self._push_batch(main, batch)
        npages, pos = self.mem.npages, 0
        while True:
            first = sent.find(0, pos)
            if first < 0:
                first = sent.find(0)
                if first < 0:
                    return
            end = min(first + PUSH_BATCH_PAGES, npages)
            self._push_batch(main, [(first, end)])
            pos = end

    def _hold_for_first_faults(self) -> None:
        """The downtime ends at the destination guest's first step, which waits for its
        first faults; a bulk push that starts at the same moment takes the CPUs and the
        link from them. Its first act, finding the populated pages, is short calls now
        (see GuestMemory.populated_extents), but still CPU the first faults want. So
        the pusher waits for the first demand request (the guest runs there) and
        FIRST_FAULTS_GRACE_S more, never longer than PUSH_HOLD_S (a guest that does
        not fault at once)."""
        plane, deadline = self._plane, time.monotonic() + PUSH_HOLD_S
        # Served already is the common case (the first fault comes within a millisecond
        # of the Switchover): the grace still applies (it cost a 2 GiB guest's first
        # step 18 ms when skipped); after a push delay it is 20 ms more of it.
        while not plane.served() and time.monotonic() < deadline:
            if self.link_lost.wait(HOLD_POLL_S):
                return
        if plane.served():
            self.link_lost.wait(FIRST_FAULTS_GRACE_S)

    def _push_batch(self, main: Channel, batch: list[tuple[int, int]]) -> None:
        """Push the unsent pages of the [first, end) ranges of ``batch``; after each
        demand request, its pre-paging window (PREPAGE_PAGES) goes first (in C)."""
        self._check()
        status, counts = self._plane.push(main, batch, self.run_pages, prepage=PREPAGE_PAGES)
        self.stats.add("pages_pushed", counts.pages_sent)
        self.stats.add("pages_zero", counts.pages_zero)
        self.push_limit.waited_s += counts.held_back_s
        if counts.pages_sent:
            self._on_progress(counts.pages_sent * self.mem.page_size)
        if status == STOPPED:
            self._check()
            raise ChannelClosed("the pusher was stopped")

    def _check(self) -> None:
        if self.link_lost.is_set():
            raise ChannelClosed("the urgent channel broke")
        if self.urgent_error is not None:
            raise UrgentChannelFailed(f"urgent channel failed: {self.urgent_error}")

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
        bandwidth limit holds them back. Run in a thread of its own: the native plane
        serves every request; a frame it does not take comes back here to be decoded
        (and refused: nothing else may arrive on the urgent channel)."""
        self.server_started_ns = time.monotonic_ns()
        make_current_thread_urgent()
        try:
            while True:
                if _requests_legal(urgent):
                    status, counts = self._plane.serve(urgent, self.run_pages, ready=self.serving)
                    self.stats.add("requests", counts.requests)
                    self.stats.add("pages_demand", counts.pages_sent)
                    self.stats.add("pages_zero", counts.pages_zero)
                    if status == CLOSED:
                        raise ChannelClosed(f"{urgent.name}: the peer closed the connection")
                message = urgent.recv()
                if isinstance(message, wire.PageRequest):
                    raise wire.ProtocolError(f"the native request parser refused {message}, which the decoder "
                                             "accepts")
                raise wire.ProtocolError(f"unexpected {type(message).__name__} on the urgent channel")
        except ChannelClosed:
            # Either every page is in (the destination closes the channel), or the link
            # broke: the pusher notices and recovers.
            self.lose_link()
        except BaseException as exc:  # surfaced by the pusher
            self.urgent_error = exc
            if self._plane is not None:
                self._plane.stop(True)


def _requests_legal(channel: Channel) -> bool:
    """Whether the session accepts a PAGE_REQUEST now: the native loop takes only
    those (a self-loop of the table in every phase that allows it)."""
    session = channel.session
    return session is None or "PAGE_REQUEST" in allowed(session.protocol, session.phase, session.role, "receive")


def _batches(runs: ranges.Runs, limit: int):
    """[first, end) ranges of ``runs`` in order, grouped into lists of about ``limit`` pages."""
    batch, pages = [], 0
    for first, count in ranges.split(runs, limit):
        batch.append((first, first + count))
        pages += count
        if pages >= limit:
            yield batch
            batch, pages = [], 0
    if batch:
        yield batch
