"""pagemap-scan dirty log: async userfaultfd write-protect + PAGEMAP_SCAN (Linux 6.7+).

``start`` asks the guest (control command ``dirty_track``) to create a userfaultfd in
its own process — a userfaultfd is bound to the mm of the process that created it —
with UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED (+ WP_HUGETLBFS_SHMEM for memfd RAM),
register its RAM in write-protect mode and write-protect all of it. From then on a
write to a protected page is resolved by the kernel itself (no fault message, no
reader): it clears the PTE's uffd-wp bit, i.e. the page becomes "written".

``harvest`` is one PAGEMAP_SCAN walk over the RAM on /proc/PID/pagemap with
PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC and category PAGE_IS_WRITTEN: it returns
the written pages and write-protects them again under the page-table lock, page by
page, so a write either lands before the walk reaches its page (reported now) or
after (faults, reported next time). Nothing to pause; the cost follows the page
tables walked and the pages reported. The ioctl loop and the reduction to runs are in
C (``pc_wp_harvest`` in native/dirtylog_ops.c, continued after a full buffer as
:meth:`postcopy.kernel.pagemap.Pagemap.scan` does): Python only unpacks the runs.

Extra reports (documented kernel behaviour, never a lost write):
* a page whose PTE is none inside the registered range reads as written (e.g. after
  MADV_DONTNEED on anonymous RAM, which drops the uffd-wp marker: the page now reads
  zero, so reporting it is right); the harvest protects it again.
* a transparent huge page is tracked as one unit (the guest maps its RAM with
  MADV_NOHUGEPAGE, so this does not happen here).
Limits: a hole punched in memfd RAM keeps its marker and is not reported, so the guest
refuses ``discard`` while tracking; a guest already registered with a missing-mode
userfaultfd (incoming) cannot be tracked (one userfaultfd context per VMA).
"""
from __future__ import annotations

import errno
import os

from postcopy._native import ffi, lib
from postcopy.kernel.dirtylog import DirtyLog, DirtyLogUnavailable, Runs, GuestLink, GuestLinkError
from postcopy.kernel.pagemap import PagemapError


class WrittenScanner:
    """PAGEMAP_SCAN of the written pages of ``[base, base + size)`` on an open pagemap
    fd, re-protecting them; its buffers are allocated once. Used by the agent's log
    below and by the guest itself (on /proc/self/pagemap, right where its vCPUs park)."""

    def __init__(self, pagemap_fd: int, base: int, size: int, pid: int, scan_buffer: int = 16384) -> None:
        #: regions per PAGEMAP_SCAN call (24 bytes each) and runs per native call; more
        #: means fewer ioctls for scattered dirty pages, the loop continues either way
        self.scan_buffer = scan_buffer
        self.fd, self.base, self.size, self.pid = pagemap_fd, base, size, pid
        self._vec = ffi.new("struct pc_page_region[]", self.scan_buffer)
        self._runs = ffi.new("uint64_t[]", 2 * self.scan_buffer)
        self._next = ffi.new("uint64_t *")

    def flat(self) -> list[int]:
        """The written runs as one flat list ``[first, count, first, count, ...]`` of
        page indexes relative to ``base``, sorted and merged."""
        out: list[int] = []
        pos, end = self.base, self.base + self.size
        while pos < end:
            n = lib.pc_wp_harvest(self.fd, pos, end, self.base, self._vec, self.scan_buffer,
                                  self._runs, self.scan_buffer, self._next)
            if n < 0:
                raise _scan_error(-n, self.pid)
            flat = ffi.unpack(self._runs, 2 * n)
            if out and flat and out[-2] + out[-1] == flat[0]:  # a run cut by a call boundary
                out[-1] += flat[1]
                flat = flat[2:]
            out.extend(flat)
            pos = self._next[0]
        return out

    def runs(self) -> Runs:
        flat = self.flat()
        return list(zip(flat[0::2], flat[1::2]))


class PagemapScanLog(DirtyLog):
    """The guest keeps running through every harvest (``last_pause_ms`` is 0)."""

    name = "pagemap-scan"

    #: regions per PAGEMAP_SCAN call and runs per native call (see WrittenScanner)
    scan_buffer = 16384

    def __init__(self, guest_path: str, info: dict) -> None:
        super().__init__(guest_path, info)
        self._client: GuestLink | None = None
        self._pagemap_fd = -1
        self._scanner: WrittenScanner | None = None
        self.stop_error: str | None = None

    def _start(self) -> None:
        self._client = self.guest.another()
        try:
            self._pagemap_fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._scanner = WrittenScanner(self._pagemap_fd, self.base, self.size, self.pid, self.scan_buffer)
            self._client.dirty_track(True)
        except GuestLinkError as exc:
            self._release()
            raise DirtyLogUnavailable(f"pagemap-scan dirty log: the guest could not arm tracking: {exc}") from None
        except BaseException:
            self._release()
            raise

    def _harvest(self) -> Runs:
        return self._scanner.runs()

    def _stop(self) -> None:
        try:
            if self._client is not None:
                self._client.dirty_track(False)
        except GuestLinkError as exc:  # the guest is gone: its userfaultfd went with it
            self.stop_error = str(exc)
        finally:
            self._release()

    def _release(self) -> None:
        if self._pagemap_fd >= 0:
            os.close(self._pagemap_fd)
            self._pagemap_fd = -1
        if self._client is not None:
            self._client.close()
            self._client = None


def _scan_error(err: int, pid: int) -> PagemapError:
    where = f"PAGEMAP_SCAN on /proc/{pid}/pagemap"
    if err == errno.EPERM:
        return PagemapError(err, f"{where}: guest RAM is no longer registered for async write-protect "
                                 "(dirty tracking was turned off behind the log's back)")
    if err in (errno.ENOTTY, errno.EINVAL):
        return PagemapError(err, f"{where}: {os.strerror(err)} (the ioctl came in Linux 6.7)")
    if err == errno.ESRCH:
        return PagemapError(err, f"{where}: the guest has exited")
    return PagemapError(err, f"{where}: {os.strerror(err)}")
