"""The destination's fault server: reads the incoming guest's userfaultfd events in
batches, asks for each missing page once (neighbouring pages of one batch in one
request), answers pages known to be zero with UFFDIO_ZEROPAGE, wakes threads on pages
already installed, and marks the ranges the guest removes or unmaps (under the install
gate, so that no install lands on them after the kernel's zap)."""
from __future__ import annotations

import threading
from typing import Callable

from postcopy._native import ffi, lib
from postcopy.kernel.priority import make_current_thread_urgent
from postcopy.kernel.uffd import UffdError
from postcopy.migration.install import CopyPath, InstallTarget
from postcopy.migration.pagetable import PageTable, native_error
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel


class FaultServer:
    """Serves the guest's faults for one migration (see :meth:`run`). The loop itself
    runs in C without the GIL (``pc_dp_fault_loop`` in native/dp_dest_io.c); Python only
    sends the requests it hands back."""

    _MAX_RUNS = 64  # one read of events at most

    def __init__(self, target: InstallTarget, path: CopyPath, *, spin: bool = False,
                 lender: "UrgentLender | None" = None) -> None:
        self.target = target
        self.path = path
        self.spin = spin  # busy-poll the userfaultfd instead of sleeping in poll (experiments)
        self.lender = lender  # takes the urgent channel back when the loop's own send failed

    def run(self, send_requests: Callable[[list[tuple[int, int]]], None],
            link_lost: Callable[[], None] | None = None) -> None:
        """Serve until the target's stop event is set. The runs (first, count) of pages
        fault events found missing (neighbours coalesced) are sent by the loop itself
        on the urgent channel lent to it (``pc_dp_lend_urgent``), else handed to
        ``send_requests``; ``link_lost`` is called when the loop's own send failed."""
        make_current_thread_urgent()
        target = self.target
        table = target.table.native
        runs = ffi.new("uint64_t[]", 2 * self._MAX_RUNS)
        minor_settle = int(self.path.name == "continue")
        while not target.stop.is_set():
            n = lib.pc_dp_fault_loop(table, int(self.spin), minor_settle, runs, self._MAX_RUNS)
            if n == lib.PC_DP_LINK_LOST and link_lost is not None:
                if self.lender is not None:
                    self.lender.take_back()
                link_lost()  # the pages stay REQUESTED: recovery asks for them again
                continue
            if n < 0:
                message = ffi.string(lib.pc_dp_error()).decode(errors="replace")
                raise UffdError(-n, "fault loop", message) if n > -4096 else native_error(n)
            if n:
                pairs = [(runs[2 * i], runs[2 * i + 1]) for i in range(n)]
                if self.lender is None:
                    send_requests(pairs)
                elif not self.lender.send(runs, n, lambda: send_requests(pairs)) and link_lost is not None:
                    link_lost()

    def mark_zero(self, first: int, npages: int) -> None:
        """Pages that hold only zeros: nothing crosses the wire for them. Threads already
        waiting on one get a UFFDIO_ZEROPAGE now; later faults get it on the spot."""
        for page in self.target.table.mark_zero(first, npages):
            self.zero_fill(page)

    def zero_fill(self, page: int) -> None:
        """Map a zero page at ``page`` (or wake its thread if it is mapped already)."""
        rc = lib.pc_dp_zero_fill(self.target.table.native, page)
        if rc < 0:
            raise UffdError(-rc, "UFFDIO_ZEROPAGE", ffi.string(lib.pc_dp_error()).decode(errors="replace"))


class UrgentLender:
    """Lends the send side of the destination's urgent channel to the table's fault
    loop, which then sends each request itself (C, no GIL), tagged with the channel's
    sealer at its sequence numbers. While lent, the channel's send lock stays held
    (nothing else may send on it). PageRequest is a self-loop of the session table in
    every phase the destination may send it in, so these frames need no check there."""

    def __init__(self, table: PageTable, enabled: bool = True) -> None:
        self.table = table
        self.enabled = enabled  # False: requests go through Python (send_requests)
        self._lent: tuple | None = None  # (channel, its pc_dp_link) while lent
        self._lock = threading.Lock()
        # The loop's requests are this frame with its page fields set (in C).
        lib.pc_dp_set_request_template(table.native, wire.PageRequest(first_page=0, npages=1).encode())

    def lend(self, urgent: Channel) -> None:
        if not self.enabled:
            return
        with self._lock:
            # No kinds to check at lending: it happens before the switchover too, when
            # no fault (so no request) can come yet; see the class docstring.
            link = urgent.lend_send()
            lib.pc_dp_lend_urgent(self.table.native, link.fd, link.seal, link.seq)
            self._lent = (urgent, link)

    def send(self, runs, n: int, fallback: Callable[[], None]) -> bool:
        """Send ``n`` runs the loop handed back (the channel was not lent when it read
        them): through the loan if it is lent by now (recovery lent it meanwhile: its
        send lock is the loan's, and a Python send would wait on it for ever), else with
        ``fallback``, under the lender's lock so that no lend comes in between. False
        if the loan's send failed: the channel is taken back, the link is lost."""
        with self._lock:
            rc = lib.pc_dp_send_requests(self.table.native, runs, n) if self._lent is not None else 0
            if rc == 0:
                fallback()
                return True
        if rc == lib.PC_DP_LINK_LOST:
            self.take_back()
            return False
        if rc < 0:
            raise native_error(rc)
        return True

    def take_back(self) -> None:
        """The loop stops sending; the channel's sealer goes on from the loop's next
        sequence number (idempotent; call before the channel closes)."""
        with self._lock:
            lent, self._lent = self._lent, None
            if lent is None:
                return
            urgent, link = lent
            link.seq = lib.pc_dp_take_urgent(self.table.native)
            urgent.end_loan(link)
