"""The destination's fault server: reads the incoming guest's userfaultfd events in
batches, asks for each missing page once, answers pages known to be zero with
UFFDIO_ZEROPAGE, and marks the ranges the guest removes or unmaps (under the install
gate, so that no install lands on them after the kernel's zap)."""
from __future__ import annotations

import select
import time
from typing import Callable

from postcopy.kernel.priority import make_current_thread_urgent
from postcopy.kernel.uffd import EventKind, PageExistsError
from postcopy.migration.install import CopyPath, InstallTarget
from postcopy.migration.pagetable import MISSING, PRESENT, REMOVED, REQUESTED, ZERO


class FaultServer:
    """Serves the guest's faults for one migration (see :meth:`run`)."""

    def __init__(self, target: InstallTarget, path: CopyPath, *, switched: Callable[[], bool]) -> None:
        self.target = target
        self.path = path
        self._switched = switched  # whether the guest runs here yet (removals before are the discard's)

    def run(self, send_requests: Callable[[list[int]], None]) -> None:
        """Serve until the target's stop event is set; ``send_requests`` asks the
        source for the pages a fault event found missing."""
        make_current_thread_urgent()
        target = self.target
        poller = select.poll()
        poller.register(target.uffd.fileno(), select.POLLIN)
        while not target.stop.is_set():
            if not poller.poll(50):
                continue
            with target.gate:
                requests = self._read_events()
            if requests:
                send_requests(requests)

    def _read_events(self) -> list[int]:
        """One batch of events (gate held); returns the pages to ask the source for."""
        target, table = self.target, self.target.table
        ps, base = target.page_size, target.base
        requests, zero_fills, settles = [], [], []
        events = target.uffd.read_events(64, timeout=0)
        now = time.monotonic_ns()
        for event in events:
            if event.kind in (EventKind.REMOVE, EventKind.UNMAP):
                self.removed(event.address, event.end)
                continue
            if event.kind is not EventKind.PAGEFAULT:
                continue
            page = (event.address - base) // ps
            if not 0 <= page < table.npages:
                continue
            if event.minor and table[page] not in (MISSING, REQUESTED):
                # Continue path: the page cache holds this page's truth (our data, or
                # the guest's own page): map it, no source data needed.
                settles.append(page)
                continue
            state = table.fault(page, now)
            if state == MISSING:
                requests.append(page)
            elif state in (ZERO, REMOVED):
                zero_fills.append(page)
            elif state == PRESENT:
                target.uffd.wake(base + page * ps, ps)
        for page in zero_fills:
            self.zero_fill(page)
        for page in settles:
            self.path.settle(base + page * ps)
        return requests

    def removed(self, start: int, end: int) -> None:
        """The guest dropped [start, end): those pages now read as zeros, whatever the
        source held (called with the gate held, before the kernel's zap)."""
        target = self.target
        ps = target.page_size
        first = max(0, (start - target.base) // ps)
        last = min(target.table.npages, -(-(end - target.base) // ps))
        if first < last:
            target.table.removed(first, last, by_guest=self._switched())

    def mark_zero(self, first: int, npages: int) -> None:
        """Pages that hold only zeros: nothing crosses the wire for them. Threads already
        waiting on one get a UFFDIO_ZEROPAGE now; later faults get it on the spot."""
        for page in self.target.table.mark_zero(first, npages):
            self.zero_fill(page)

    def zero_fill(self, page: int) -> None:
        """Map a zero page at ``page`` (or wake its thread if it is mapped already)."""
        target = self.target
        addr = target.base + page * target.page_size
        try:
            target.uffd.zeropage(addr, target.page_size)
        except PageExistsError:
            target.uffd.wake(addr, target.page_size)
        target.table.woken(page, time.monotonic_ns())
