"""An epoch's dirty pages: where its page-run frames take their bytes from, in guest RAM
or copied out of it (see :meth:`EpochPages.plan`); the frames themselves are built,
tagged and sent by C in one call (``pc_ckpt_send_epoch``, native/ckpt_io.c)."""
from __future__ import annotations

import errno
import mmap
import os
from array import array
from dataclasses import dataclass

from postcopy import ranges
from postcopy._native import ffi, lib
from postcopy.checkpoint.config import GuestLost
from postcopy.migration.guestmem import GuestMemory
from postcopy.protocol import wire
from postcopy.protocol.wire import MAX_RUN_BYTES


@dataclass
class EpochPlan:
    """The runs of one epoch (flat ``first, npages`` pairs, the state page among them)
    and where their bytes are: at ``src + first * page_size``, or, ``packed``, back to
    back in ``src`` (a copy)."""

    runs: array
    npages: int
    src: object  # a cffi pointer the bytes are read from while sending
    packed: bool

    @property
    def nruns(self) -> int:
        return len(self.runs) // 2


def with_state_page(runs: array) -> array:
    """``runs`` (flat sorted ``first, npages`` pairs) with page 0, the guest's state
    page, always among them (changed in place and returned)."""
    if not runs or runs[0] > 1:
        runs[0:0] = array("Q", (0, 1))
    elif runs[0] == 1:
        runs[0] = 0
        runs[1] += 1
    return runs


def flat_runs(runs) -> array:
    """A harvest's ``[(first, npages), ...]`` as flat pairs."""
    flat = array("Q")
    for first, count in runs:
        flat.append(first)
        flat.append(count)
    return flat


class EpochPages:
    """memfd RAM is read through a read-only shared mapping (sendmsg copies from it);
    anonymous RAM through /proc/PID/mem into the epoch buffer."""

    def __init__(self, mem: GuestMemory):
        self.mem = mem
        self._map: mmap.mmap | None = None
        self._ram = None  # cffi pointer into the mapping
        self.scratch: bytearray | None = None
        if mem.memfd is not None:
            self._map = mmap.mmap(mem.memfd, mem.size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._ram = ffi.from_buffer("uint8_t[]", self._map)
        else:
            self.scratch = bytearray(MAX_RUN_BYTES)
        self._buffer = bytearray(MAX_RUN_BYTES)  # the epoch's pages, copied while the guest is parked
        self._buffer_ptr = ffi.from_buffer("uint8_t[]", self._buffer)

    @property
    def ram(self):
        """memfd RAM's read-only mapping (a cffi pointer), or None (anonymous RAM)."""
        return self._ram

    @property
    def max_run_pages(self) -> int:
        return MAX_RUN_BYTES // self.mem.page_size

    def plan(self, runs: array, copy: bool) -> EpochPlan:
        """The epoch of the dirty ``runs`` (flat pairs, sorted), the state page added.
        memfd RAM is referenced in place when the frames are sent before the guest
        resumes (sendmsg copies it), and copied into the epoch buffer first when they
        are sent while the guest runs (``copy``); anonymous RAM is always read into the
        buffer."""
        runs = with_state_page(runs)
        ps = self.mem.page_size
        npages = sum(runs[1::2])
        if self._ram is not None and not copy:
            return EpochPlan(runs, npages, self._ram, packed=False)
        buf = self._epoch_buffer(npages * ps)
        pairs = ffi.from_buffer("uint64_t[]", runs)
        if self._ram is not None:
            lib.pc_ckpt_gather(buf, self._ram, ps, pairs, len(runs) // 2)
        else:
            view, pos = memoryview(self._buffer), 0
            for i in range(0, len(runs), 2):
                end = pos + runs[i + 1] * ps
                self._read(runs[i], view[pos:end])
                pos = end
            view.release()
        return EpochPlan(runs, npages, buf, packed=True)

    def send_populated(self, channel, run_pages: int) -> int:
        """Epoch 0: send every populated page in runs of at most ``run_pages`` (sendfile
        for memfd RAM: these pages need not be stable, whatever changes is in epoch 1's
        dirty set). Returns the pages sent."""
        pages = 0
        for first, count in ranges.split(self.mem.populated_extents(), run_pages):
            self.mem.send_run(channel, first, count, wire.Cause.PRECOPY, self.scratch)
            pages += count
        return pages

    def _epoch_buffer(self, need: int):
        if len(self._buffer) < need:
            self._buffer_ptr = None
            self._buffer = bytearray(max(need, 2 * len(self._buffer)))
            self._buffer_ptr = ffi.from_buffer("uint8_t[]", self._buffer)
        return self._buffer_ptr

    def _read(self, first: int, into: memoryview) -> None:
        """Copy anonymous RAM's pages from ``first`` on into ``into`` (its length says how
        many), through /proc/PID/mem."""
        ps = self.mem.page_size
        if os.preadv(self.mem._mem_fd, [into], self.mem.base + first * ps) != len(into):
            raise GuestLost(OSError(errno.EIO, f"short read of guest RAM at page {first}"))

    def close(self) -> None:
        self._ram = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view still referenced by a traceback: the GC unmaps it
                pass
