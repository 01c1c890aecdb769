"""Reading an epoch's dirty pages out of guest RAM into page-run frames, copied or
referenced in place (see :meth:`EpochPages.frames`)."""
from __future__ import annotations

import errno
import mmap
import os

from postcopy import ranges
from postcopy.checkpoint.config import GuestLost
from postcopy.migration.guestmem import GuestMemory
from postcopy.protocol import wire
from postcopy.protocol.wire import MAX_RUN_BYTES


class EpochPages:
    """memfd RAM is read through a read-only shared mapping (sendmsg copies from it);
    anonymous RAM through /proc/PID/mem into a scratch buffer (``scratch``)."""

    def __init__(self, mem: GuestMemory):
        self.mem = mem
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self.scratch: bytearray | None = None
        if mem.memfd is not None:
            self._map = mmap.mmap(mem.memfd, mem.size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._view = memoryview(self._map)
        else:
            self.scratch = bytearray(MAX_RUN_BYTES)
        self._buffer = bytearray(MAX_RUN_BYTES)  # the epoch's pages, copied while the guest is parked
        self._buffer_view: memoryview | None = memoryview(self._buffer)

    def frames(self, runs: list[tuple[int, int]], copy: bool) -> tuple[list, int, list[tuple[int, int]]]:
        """The page-run frames of the epoch's dirty ``runs`` as (header, payload) pairs
        for one sendmsg, with the state page always among them; returns them, the page
        count and the runs sent. memfd RAM is referenced in place when the frames are
        sent before the guest resumes (sendmsg copies it), and copied into the epoch
        buffer first when they are sent while the guest runs (``copy``); anonymous RAM is
        always read into the buffer."""
        ps = self.mem.page_size
        if not runs or runs[0][0] > 1:
            runs.insert(0, (0, 1))
        elif runs[0][0] == 1:
            runs[0] = (0, runs[0][1] + 1)
        max_pages = MAX_RUN_BYTES // ps
        if max(n for _, n in runs) > max_pages:
            runs = ranges.split(runs, max_pages)
        npages = sum(n for _, n in runs)
        # Frame headers packed directly: the runs come from the harvest, in range by
        # construction and split below the frame limit (what encode_page_run_header checks).
        pack, magic, ftype, cause = wire.HEADER.pack, wire.MAGIC, int(wire.FrameType.PAGE_RUN), int(wire.Cause.RESENT)
        parts: list = []
        if self._view is not None and not copy:
            view = self._view
            parts = [(pack(magic, ftype, cause, n * ps, first), view[first * ps:(first + n) * ps])
                     for first, n in runs]
            return parts, npages, runs
        buf = self._epoch_buffer(npages * ps)
        pos = 0
        for first, n in runs:
            end = pos + n * ps
            self._read(first, buf[pos:end])
            parts.append((pack(magic, ftype, cause, n * ps, first), buf[pos:end]))
            pos = end
        return parts, npages, runs

    def _epoch_buffer(self, need: int) -> memoryview:
        if len(self._buffer) < need:
            self._buffer_view = None
            self._buffer = bytearray(max(need, 2 * len(self._buffer)))
            self._buffer_view = memoryview(self._buffer)
        return self._buffer_view

    def _read(self, first: int, into: memoryview) -> None:
        """Copy the pages from ``first`` on into ``into`` (its length says how many)."""
        ps = self.mem.page_size
        if self._view is not None:
            into[:] = self._view[first * ps:first * ps + len(into)]
            return
        # anonymous RAM: read through /proc/PID/mem
        if os.preadv(self.mem._mem_fd, [into], self.mem.base + first * ps) != len(into):
            raise GuestLost(OSError(errno.EIO, f"short read of guest RAM at page {first}"))

    def close(self) -> None:
        self._view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view still referenced by a traceback: the GC unmaps it
                pass
