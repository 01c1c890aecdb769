"""The source agent's view of a guest's RAM: which pages are populated, and sending
page runs from it without keeping the guest's RAM mapped into the agent (so the agent's
RSS does not grow with the guest)."""
from __future__ import annotations

import errno
import mmap
import os
import threading

from postcopy.protocol import wire
from postcopy.kernel.pagemap import PM_PRESENT, PM_SWAP, Pagemap
from postcopy.protocol.channel import Channel
from postcopy.protocol.wire import MAX_RUN_BYTES

# Runs sent after the switchover: the source guest is paused, so their bytes cannot
# change between the frame's tag and sendfile's copy.
_STABLE_CAUSES = frozenset({wire.Cause.DEMAND, wire.Cause.PUSHED, wire.Cause.STATE})


class GuestMemory:
    """Guest RAM as handed over by the guest's control socket (``fds`` command).

    memfd backing: the memfd itself is the RAM. Populated pages are those in its page
    cache or swapped out (mincore, then SEEK_DATA where mincore finds none; pagemap of a
    shared mapping would miss pages swapped out), and runs go out with sendfile(2).
    anon backing: the guest's private memory is read through /proc/PID/mem; populated
    pages are those pagemap shows present or swapped.
    """

    def __init__(self, info: dict, fds: dict[str, int]):
        self.pid: int = info["pid"]
        self.base: int = info["ram_address"]
        self.size: int = info["ram_size"]
        self.page_size: int = info["page_size"]
        self.npages = self.size // self.page_size
        self.memfd: int | None = fds.get("memfd")
        self._mem_fd: int | None = None
        self._pagemap: Pagemap | None = None
        self._map: mmap.mmap | None = None  # memfd, read-only: what tags are computed over
        self._map_lock = threading.Lock()
        self._copy: bytearray | None = None  # precopy runs of memfd RAM, read before tagging
        # memfd: the guest's own mapping of it, for the demand server (see native_handles).
        self._mapping: Pagemap | None = None
        if self.memfd is None:
            self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            self._pagemap = Pagemap(self.pid)
        else:
            try:
                self._mapping = Pagemap(self.pid)
            except OSError:
                self._mapping = None  # the memfd alone answers (slower beside a sweep)

    @property
    def layout(self) -> wire.Layout:
        return wire.Layout(page_size=self.page_size, regions=((0, self.size),))

    def populated_extents(self) -> list[tuple[int, int]]:
        """Every run (first_page, npages) of populated pages, in order.

        memfd: mincore over a mapping of it, then SEEK_DATA over the ranges not in the
        page cache (pages swapped out), in short system calls (native/file_ops.h says
        why: the SEEK_HOLE sweep of a 2 GiB memfd held a CPU for 18 ms, the guest's
        first faults waiting behind it)."""
        if self._pagemap is not None:
            return self._pagemap.runs(self.base, self.npages, PM_PRESENT | PM_SWAP)
        from postcopy._native import ffi, lib

        ram = self._read_only_map()  # mincore faults nothing in
        max_runs = self.npages // 2 + 1  # runs are separated by holes: at most this many
        runs = ffi.new("uint64_t[]", 2 * max_runs)
        n = lib.pc_memfd_data_runs(self.memfd, ffi.from_buffer(ram), self.npages, self.page_size, runs,
                                   max_runs)
        if n < 0:
            raise OSError(-n, f"finding the guest RAM's populated pages: {os.strerror(-n)}")
        return [(runs[2 * i], runs[2 * i + 1]) for i in range(n)]

    def is_populated(self, page: int) -> bool:
        """Whether one page holds data (cheap: for the demand path)."""
        if self._pagemap is not None:
            return bool(self._pagemap.runs(self.base + page * self.page_size, 1, PM_PRESENT | PM_SWAP))
        offset = page * self.page_size
        try:
            # SEEK_DATA returns at once on a data page; SEEK_HOLE would walk the extent.
            return os.lseek(self.memfd, offset, os.SEEK_DATA) == offset
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return False
            raise

    def send_run(self, channel: Channel, first_page: int, npages: int, cause: wire.Cause,
                 scratch: bytearray | None = None) -> None:
        """Send pages [first_page, first_page+npages) as one frame (≤ MAX_RUN_BYTES).

        memfd RAM goes out with sendfile when its bytes are stable (after the
        switchover, or frames without tags) and it is more than one page; a precopy run
        of a running guest is read into a buffer first, so that its tag covers exactly
        the bytes sent. One page (the state page, in the downtime) is read too: mapping
        it for the tag and a second system call cost ~100 µs more than the copy."""
        length = npages * self.page_size
        offset = first_page * self.page_size
        if self.memfd is not None and npages > 1 and (cause in _STABLE_CAUSES or not channel.authenticated):
            view = self._mapped(offset, length) if channel.authenticated else None
            try:
                channel.sendfile_page_run(first_page, npages, cause, self.memfd, offset, view)
            finally:
                if view is not None:
                    view.release()
                    self._unmap_pages(offset, length)
            return
        if scratch is None and npages == 1:
            scratch = bytearray(length)
        elif scratch is None:
            assert self.memfd is not None, "anon backing needs a scratch buffer"
            scratch = self._copy = self._copy or bytearray(MAX_RUN_BYTES)  # the precopy thread's
        view = memoryview(scratch)[:length]
        fd, base = (self.memfd, 0) if self.memfd is not None else (self._mem_fd, self.base)
        got = os.preadv(fd, [view], base + offset)
        if got != length:
            raise OSError(errno.EIO, f"short read of guest RAM at page {first_page}: {got} of {length} bytes")
        channel.send_page_run(first_page, npages, cause, view)

    def _unmap_pages(self, offset: int, length: int) -> None:
        """Drop the pages of [offset, offset+length) from this mapping (from RSS, not
        from the guest's RAM), with the neighbours fault-around mapped (native/file_ops.h)."""
        from postcopy._native import ffi, lib

        pointer = ffi.from_buffer(self._map)
        try:
            lib.pc_drop_mapped(pointer, self.size, offset, length)
        finally:
            ffi.release(pointer)

    def _read_only_map(self) -> mmap.mmap:
        """This agent's read-only shared mapping of the memfd (made once)."""
        with self._map_lock:
            if self._map is None:
                self._map = mmap.mmap(self.memfd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            return self._map

    def _mapped(self, offset: int, length: int) -> memoryview:
        return memoryview(self._read_only_map())[offset:offset + length]

    def native_handles(self) -> tuple[int, int, int]:
        """(memfd, /proc/PID/mem, pagemap) descriptors for the native data plane, -1
        for those this backing lacks. With memfd RAM the pagemap is of the guest's
        mapping of it: a page mapped there is data without asking the memfd, whose
        lseek waits while the pusher's sweep holds its inode lock (see pc_dp_send_new)."""
        view = self._pagemap or self._mapping
        pagemap = view.fileno() if view is not None else -1
        return (-1 if self.memfd is None else self.memfd, -1 if self._mem_fd is None else self._mem_fd, pagemap)

    @staticmethod
    def scratch() -> bytearray:
        """A per-thread buffer for :meth:`send_run`."""
        return bytearray(MAX_RUN_BYTES)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view still held by a traceback: the GC unmaps it
                pass
            self._map = None
        for fd in (self.memfd, self._mem_fd):
            if fd is not None:
                os.close(fd)
        self.memfd = self._mem_fd = None
        for view in (self._pagemap, self._mapping):
            if view is not None:
                view.close()
        self._pagemap = self._mapping = None

