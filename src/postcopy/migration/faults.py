"""The destination's fault server: reads the incoming guest's userfaultfd events in
batches, asks for each missing page once (neighbouring pages of one batch in one
request), answers pages known to be zero with UFFDIO_ZEROPAGE, wakes threads on pages
already installed, and marks the ranges the guest removes or unmaps (under the install
gate, so that no install lands on them after the kernel's zap)."""
from __future__ import annotations

from typing import Callable

from postcopy._native import ffi, lib
from postcopy.kernel.priority import make_current_thread_urgent
from postcopy.kernel.uffd import UffdError
from postcopy.migration.install import CopyPath, InstallTarget
from postcopy.migration.pagetable import native_error


class FaultServer:
    """Serves the guest's faults for one migration (see :meth:`run`). The loop itself
    runs in C without the GIL (``pc_dp_fault_loop`` in native/dp_dest_io.c); Python only
    sends the requests it hands back."""

    _MAX_RUNS = 64  # one read of events at most

    def __init__(self, target: InstallTarget, path: CopyPath, *, spin: bool = False) -> None:
        self.target = target
        self.path = path
        self.spin = spin  # busy-poll the userfaultfd instead of sleeping in poll (experiments)

    def run(self, send_requests: Callable[[list[tuple[int, int]]], None]) -> None:
        """Serve until the target's stop event is set; ``send_requests`` asks the
        source for the runs (first, count) of pages fault events found missing
        (neighbours coalesced)."""
        make_current_thread_urgent()
        target = self.target
        table = target.table.native
        runs = ffi.new("uint64_t[]", 2 * self._MAX_RUNS)
        minor_settle = int(self.path.name == "continue")
        while not target.stop.is_set():
            n = lib.pc_dp_fault_loop(table, int(self.spin), minor_settle, runs, self._MAX_RUNS)
            if n < 0:
                message = ffi.string(lib.pc_dp_error()).decode(errors="replace")
                raise UffdError(-n, "fault loop", message) if n > -4096 else native_error(n)
            if n:
                send_requests([(runs[2 * i], runs[2 * i + 1]) for i in range(n)])

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
