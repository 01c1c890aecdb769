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
tables walked and the pages reported, and Python only touches the reported regions.

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

from postcopy.dirtylog import DirtyLog, DirtyLogUnavailable, Runs
from postcopy.guest.control import GuestClient, GuestError
from postcopy.pagemap import Category, Pagemap, ScanFlag

_SCAN_FLAGS = ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC


class PagemapScanLog(DirtyLog):
    """The guest keeps running through every harvest (``last_pause_ms`` is 0)."""

    name = "pagemap-scan"

    #: regions per PAGEMAP_SCAN call (24 bytes each); more means fewer ioctls for
    #: scattered dirty pages, Pagemap.scan continues after a full buffer either way
    scan_buffer = 16384

    def __init__(self, guest_path: str, info: dict) -> None:
        super().__init__(guest_path, info)
        self._client: GuestClient | None = None
        self._pagemap: Pagemap | None = None
        self._shift = self.page_size.bit_length() - 1
        self.stop_error: str | None = None

    def _start(self) -> None:
        self._client = GuestClient(self.guest_path)
        try:
            self._pagemap = Pagemap(self.pid, scan_buffer=self.scan_buffer)
            self._client.dirty_track(True)
        except GuestError as exc:
            self._release()
            raise DirtyLogUnavailable(f"pagemap-scan dirty log: the guest could not arm tracking: {exc}") from None
        except BaseException:
            self._release()
            raise

    def _harvest(self) -> Runs:
        regions = self._pagemap.scan(self.base, self.base + self.size, flags=_SCAN_FLAGS,
                                     category_mask=Category.WRITTEN, return_mask=Category.WRITTEN)
        base, shift = self.base, self._shift
        # Pagemap.scan already merged adjacent regions: dense, sorted runs.
        return [((start - base) >> shift, (end - start) >> shift) for start, end, _ in regions]

    def _stop(self) -> None:
        try:
            if self._client is not None:
                self._client.dirty_track(False)
        except GuestError as exc:  # the guest is gone: its userfaultfd went with it
            self.stop_error = str(exc)
        finally:
            self._release()

    def _release(self) -> None:
        if self._pagemap is not None:
            self._pagemap.close()
            self._pagemap = None
        if self._client is not None:
            self._client.close()
            self._client = None
