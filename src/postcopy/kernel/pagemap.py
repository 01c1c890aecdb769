"""/proc/PID/pagemap: raw entries, runs of matching pages, PAGEMAP_SCAN, clear_refs.

The per-page work happens in C (``native/pagemap_ops.c``): :meth:`Pagemap.runs` reads
the range in fixed-size chunks and hands back only run boundaries, so a 4 GiB guest
(a million entries) costs bounded memory and no Python loop per page.

PAGEMAP_SCAN (Linux 6.7+) returns dense regions of pages by category; with
``ScanFlag.WP_MATCHING`` it also write-protects what it reports, atomically, which is
how the pagemap-scan dirty log harvests (see DESIGN.md, "Dirty logging").
"""
from __future__ import annotations

import enum
import errno as _errno
import os
import threading
from array import array

from postcopy.kernel.fdowner import FdOwner
from postcopy._native import ffi as _ffi, lib as _lib

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_FILE = 1 << 61  # file page or shared anon
PM_UFFD_WP = 1 << 57
PM_EXCLUSIVE = 1 << 56
PM_SOFT_DIRTY = 1 << 55
PM_PFN_MASK = (1 << 55) - 1  # PFN when present (zero without CAP_SYS_ADMIN)

CLEAR_REFS_SOFT_DIRTY = 4


class Category(enum.IntFlag):
    """PAGE_IS_* categories of PAGEMAP_SCAN (masks and ``page_region.categories``)."""

    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7
    GUARD = 1 << 8


class ScanFlag(enum.IntFlag):
    """PM_SCAN_* operation flags of PAGEMAP_SCAN."""

    WP_MATCHING = 1 << 0  # write-protect the pages reported (harvest + re-arm)
    CHECK_WPASYNC = 1 << 1  # fail (EPERM) on pages without async uffd-wp


PAGE_IS_WPALLOWED = Category.WPALLOWED
PAGE_IS_WRITTEN = Category.WRITTEN
PAGE_IS_FILE = Category.FILE
PAGE_IS_PRESENT = Category.PRESENT
PAGE_IS_SWAPPED = Category.SWAPPED
PAGE_IS_PFNZERO = Category.PFNZERO
PAGE_IS_HUGE = Category.HUGE
PAGE_IS_SOFT_DIRTY = Category.SOFT_DIRTY
PAGE_IS_GUARD = Category.GUARD
PM_SCAN_WP_MATCHING = ScanFlag.WP_MATCHING
PM_SCAN_CHECK_WPASYNC = ScanFlag.CHECK_WPASYNC


class PagemapError(OSError):
    """A pagemap read or PAGEMAP_SCAN failed; ``errno`` is the kernel's."""


def clear_refs(pid: int | str = "self", value: int = CLEAR_REFS_SOFT_DIRTY) -> None:
    """Write ``value`` to /proc/PID/clear_refs (4: clear the soft-dirty bits)."""
    rc = _lib.pc_clear_refs(0 if pid == "self" else int(pid), int(value))
    if rc < 0:
        raise PagemapError(-rc, f"write {value} to /proc/{pid}/clear_refs: {os.strerror(-rc)}")


class Pagemap(FdOwner):
    """An open /proc/PID/pagemap (``pid`` an int or ``"self"``).

    One object may be shared by threads: calls are serialized on an internal lock
    because they reuse preallocated native buffers.  ``scan_buffer`` (regions per
    PAGEMAP_SCAN call) and ``run_buffer`` (runs per native call) only bound memory.
    """

    def __init__(self, pid: int | str = "self", *, scan_buffer: int = 4096,
                 run_buffer: int = 16384) -> None:
        self.pid = pid
        self.path = f"/proc/{pid}/pagemap"
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._scan_cap = max(1, int(scan_buffer))
        self._run_cap = max(1, int(run_buffer))
        self._vec = None
        self._runs = None
        self._done = _ffi.new("uint64_t *")
        self._arg = _ffi.new("struct pc_pm_scan_arg *")

    # -- lifetime --------------------------------------------------------------------
    def fileno(self) -> int:
        return self._fd






    def _error(self, rc: int, what: str) -> PagemapError:
        return PagemapError(-rc, f"{what} on {self.path}: {os.strerror(-rc)}")

    # -- raw entries -----------------------------------------------------------------
    def read(self, addr: int, npages: int) -> array:
        """The 64-bit entries of ``npages`` pages from page-aligned ``addr``
        (PM_* bits; shorter only past the end of the address space)."""
        out = array("Q", bytes(8 * npages))
        if npages:
            rc = _lib.pc_pagemap_read(self._fd, addr, npages, _ffi.from_buffer("uint64_t[]", out))
            if rc < 0:
                raise self._error(rc, "read")
            if rc < npages:
                del out[rc:]
        return out

    def runs(self, addr: int, npages: int, mask: int, *, invert: bool = False) -> list[tuple[int, int]]:
        """Runs ``(first page index relative to addr, page count)`` of pages whose entry
        has any bit of ``mask`` set (none of them with ``invert``), in address order.

        ``runs(base, n, PM_PRESENT | PM_SWAP)`` lists the populated pages;
        ``PM_SOFT_DIRTY`` the soft-dirty ones.
        """
        result: list[tuple[int, int]] = []
        with self._lock:
            if self._runs is None:
                self._runs = _ffi.new("uint64_t[]", 2 * self._run_cap)
            buf, done_out = self._runs, self._done
            done = 0
            while done < npages:
                n = _lib.pc_pagemap_runs(self._fd, addr + done * PAGE_SIZE, npages - done, mask,
                                         1 if invert else 0, buf, self._run_cap, done_out)
                if n < 0:
                    raise self._error(n, "read")
                flat = _ffi.unpack(buf, 2 * n)
                starts = flat[0::2] if not done else [s + done for s in flat[0::2]]
                result.extend(zip(starts, flat[1::2]))
                done += done_out[0]
        return result

    # -- PAGEMAP_SCAN ----------------------------------------------------------------
    def scan(self, start: int, end: int, *, flags: int = 0, category_mask: int = 0,
             category_inverted: int = 0, category_anyof_mask: int = 0, return_mask: int,
             max_pages: int = 0) -> list[tuple[int, int, int]]:
        """PAGEMAP_SCAN over ``[start, end)``: regions ``(start, end, categories)`` of
        pages that match, in address order, adjacent regions with equal categories
        merged.  ``categories`` holds the bits of ``return_mask`` that apply.

        A page matches when ``(categories ^ category_inverted) & category_mask`` equals
        ``category_mask`` and, if ``category_anyof_mask`` is set, has one of its bits.
        With ``ScanFlag.WP_MATCHING`` the reported pages are write-protected again in
        the same walk.  ``max_pages`` (0: no limit) stops after that many pages.
        The whole range is covered, however many ioctls that takes.
        """
        out: list[tuple[int, int, int]] = []
        with self._lock:
            if self._vec is None:
                self._vec = _ffi.new("struct pc_page_region[]", self._scan_cap)
                self._vec_u64 = _ffi.cast("uint64_t *", self._vec)
                self._vec_addr = int(_ffi.cast("uintptr_t", self._vec))
            arg, cap, flat_of = self._arg, self._scan_cap, self._vec_u64
            found = 0
            pos = start
            while pos < end:
                arg.flags = int(flags)
                arg.start = pos
                arg.end = end
                arg.walk_end = 0
                arg.vec = self._vec_addr
                arg.vec_len = cap
                arg.max_pages = max_pages - found if max_pages else 0
                arg.category_inverted = int(category_inverted)
                arg.category_mask = int(category_mask)
                arg.category_anyof_mask = int(category_anyof_mask)
                arg.return_mask = int(return_mask)
                n = _lib.pc_pagemap_scan(self._fd, arg)
                if n < 0:
                    raise self._scan_error(n, flags)
                if n == 0:
                    break
                flat = _ffi.unpack(flat_of, 3 * n)
                for i in range(0, 3 * n, 3):
                    s, e, c = flat[i], flat[i + 1], flat[i + 2]
                    if out and out[-1][1] == s and out[-1][2] == c:
                        out[-1] = (out[-1][0], e, c)  # split by the kernel's buffering
                    else:
                        out.append((s, e, c))
                    if max_pages:
                        found += (e - s) // PAGE_SIZE
                if max_pages and found >= max_pages:
                    break
                if n < cap:
                    break  # the output buffer did not fill: the walk reached end
                # Buffer full: go on.  walk_end is where the walk stopped, but after a
                # walk that flushed the kernel's bounce buffer more than once it can lag
                # behind the last region reported even though the walk finished (it is
                # only updated on an early stop), so never restart before that region's
                # end: re-scanning would report pages twice (and without WP_MATCHING
                # nothing else would stop it).
                pos = max(arg.walk_end, flat[3 * n - 2])
        return out

    def _scan_error(self, rc: int, flags: int) -> PagemapError:
        err = -rc
        if err in (_errno.ENOTTY, _errno.EINVAL) and self._scan_unsupported():
            return PagemapError(err, f"PAGEMAP_SCAN on {self.path}: not supported by this kernel "
                                     "(the ioctl came in Linux 6.7)")
        if err == _errno.EPERM and flags & ScanFlag.CHECK_WPASYNC:
            return PagemapError(err, f"PAGEMAP_SCAN on {self.path}: a page in the range is not "
                                     "registered for async write-protect (UFFD_FEATURE_WP_ASYNC)")
        return self._error(rc, "PAGEMAP_SCAN")

    def _scan_unsupported(self) -> bool:
        """Whether a minimal, valid PAGEMAP_SCAN fails too (the ioctl is missing)."""
        arg = _ffi.new("struct pc_pm_scan_arg *")
        return _lib.pc_pagemap_scan(self._fd, arg) < 0
