"""soft-dirty dirty log: ``clear_refs`` 4 and bit 55 of /proc/PID/pagemap.

``start`` writes 4 to /proc/PID/clear_refs: every PTE of the guest process loses its
soft-dirty bit and is write-protected, and every VMA loses VM_SOFTDIRTY (clear_refs
works on the whole mm; only the RAM range is read back). The next write to a page
faults and sets the bit again.

``harvest`` reads the bits of the RAM range and clears them. Read and clear are two
steps, so a write between them would be lost: the harvest pauses the guest across
both (control commands pause/resume, as CRIU freezes the task) and resumes it exactly
as it was (``stop_at`` kept; a guest that was not running is left alone). The
pagemap pass runs in C (``native/dirtylog_ops.c``), once over the range: the pause
grows with RAM size, not with dirty pages. ``last_pause_ms`` is the pause as seen from
here (pause request to resume reply).

Kernel semantics that decide what is reported (Documentation/admin-guide/mm/
soft-dirty.rst, fs/proc/task_mmu.c):

* The bit lives in the PTE (present) or the swap PTE (swapped anonymous pages keep it,
  as do migration entries). A VMA created after the clear (new mmap) has VM_SOFTDIRTY
  and reads dirty whole until the next clear: extra reports, not a loss.
* A page whose PTE is zapped loses its bit. For shared (memfd) RAM that happens when
  reclaim swaps the page out: the data written since the last harvest stays in the
  memfd but pagemap shows a hole. So for memfd RAM every page that is not present but
  has data in the memfd (SEEK_DATA) is reported too: extra reports after reclaim,
  never a lost write. That check needs no pause (the page's state cannot regress), so
  it runs after the guest is resumed.
* MADV_DONTNEED on anonymous RAM (the guest's ``discard``) also drops the PTE: the page
  then reads zero and is not reported. The source guest never discards while it is
  being migrated; a caller that does must resend such ranges itself.
* Writes by the guest's control thread (``touch``) are not stopped by pause: they are
  for tests and benchmarks, not concurrent with a harvest.
"""
from __future__ import annotations

import errno
import os
import time

from postcopy._native import ffi, lib
from postcopy.kernel.dirtylog import DirtyLog, Runs, merge_runs, GuestLink
from postcopy.kernel.pagemap import PagemapError, clear_refs


class SoftDirtyLog(DirtyLog):
    """Pauses the guest for each harvest (``last_pause_ms``)."""

    name = "soft-dirty"

    #: runs per native call (each kind); bounds memory, not what can be reported
    run_buffer = 16384

    def __init__(self, guest_path: str, info: dict) -> None:
        super().__init__(guest_path, info)
        self._client: GuestLink | None = None
        self._pagemap_fd = -1
        self._memfd: int | None = None
        self._dirty = ffi.new("uint64_t[]", 2 * self.run_buffer)
        self._absent = ffi.new("uint64_t[]", 2 * self.run_buffer)
        self._n_absent = ffi.new("uint64_t *")
        self._done = ffi.new("uint64_t *")
        self.stop_error: str | None = None

    def _start(self) -> None:
        self._client = self.guest.another()
        try:
            if self.backing == "memfd":
                _, fds = self._client.take_fds()
                self._memfd = fds.pop("memfd", None)
                for fd in fds.values():
                    os.close(fd)
            self._pagemap_fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            clear_refs(self.pid)
        except BaseException:
            self._release()
            raise

    def _harvest(self) -> Runs:
        t0 = time.perf_counter()
        reply = self._client.pause()
        ran = reply.get("was") == "running"
        try:
            dirty, absent = self._scan()
            clear_refs(self.pid)
        finally:
            if ran:  # resume even if the scan failed: the guest must not stay stopped
                self._client.resume(stop_at=reply.get("stop_at"))
        self.last_pause_ms = (time.perf_counter() - t0) * 1e3 if ran else 0.0
        if absent and self._memfd is not None:
            return merge_runs(dirty, self._with_data(absent))
        return dirty

    def _scan(self) -> tuple[Runs, Runs]:
        """One pass over the RAM's pagemap: soft-dirty runs, and (memfd RAM only) runs
        of pages neither present nor soft-dirty."""
        dirty: Runs = []
        absent: Runs = []
        want_absent = self.run_buffer if self._memfd is not None else 0
        done, npages, ps = 0, self.npages, self.page_size
        while done < npages:
            n = lib.pc_softdirty_scan(self._pagemap_fd, self.base + done * ps, npages - done,
                                      self._dirty, self.run_buffer, self._absent, want_absent,
                                      self._n_absent, self._done)
            if n < 0:
                raise PagemapError(-n, f"read /proc/{self.pid}/pagemap: {os.strerror(-n)}")
            _extend(dirty, ffi.unpack(self._dirty, 2 * n), done)
            _extend(absent, ffi.unpack(self._absent, 2 * self._n_absent[0]), done)
            if self._done[0] == 0:
                raise PagemapError(errno.EIO, f"/proc/{self.pid}/pagemap ends inside guest RAM")
            done += self._done[0]
        return dirty, absent

    def _with_data(self, runs: Runs) -> Runs:
        """The parts of ``runs`` that hold data in the memfd (swapped-out shmem pages)."""
        out: Runs = []
        ps, fd = self.page_size, self._memfd
        for first, count in runs:
            pos, end = first * ps, (first + count) * ps
            while pos < end:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data after pos at all
                        return out
                    raise
                if data >= end:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                out.append((data // ps, (hole - data + ps - 1) // ps))
                pos = hole
        return out

    def _stop(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._pagemap_fd >= 0:
            os.close(self._pagemap_fd)
            self._pagemap_fd = -1
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None
        if self._client is not None:
            self._client.close()
            self._client = None


def _extend(out: Runs, flat: list[int], offset: int) -> None:
    """Append (first + offset, count) pairs, joining a run cut by a call boundary."""
    for i in range(0, len(flat), 2):
        first, count = flat[i] + offset, flat[i + 1]
        if out and out[-1][0] + out[-1][1] == first:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((first, count))
