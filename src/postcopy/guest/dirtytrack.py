"""The guest's own dirty tracking: async write-protect on a userfaultfd of its own.

A userfaultfd is bound to the mm of the process that created it, so the guest makes it
(control command ``dirty_track``): UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED (+
WP_HUGETLBFS_SHMEM for memfd RAM), RAM registered in write-protect mode and protected
whole. Writes are resolved by the kernel without a reader and leave pages "written"
for PAGEMAP_SCAN, which an agent runs on /proc/PID/pagemap
(:mod:`postcopy.kernel.dirtylog.pagemapscan`), or the guest itself on
/proc/self/pagemap right where its vCPUs park (the ``run`` command with ``harvest``):
then a checkpoint epoch is one control round trip.
"""
from __future__ import annotations

import base64
import os
from array import array


class TrackingError(RuntimeError):
    """Dirty tracking cannot start or went wrong; the message says why."""


class DirtyTracker:
    """Async write-protect tracking of ``[address, address + size)`` of this process."""

    def __init__(self, address: int, size: int, *, shmem: bool) -> None:
        from postcopy.kernel.uffd import Feature, Mode, UffdError, Userfaultfd

        need = Feature.WP_ASYNC | Feature.WP_UNPOPULATED
        if shmem:
            need |= Feature.WP_HUGETLBFS_SHMEM
        try:
            self._uffd = Userfaultfd(need)
        except (UffdError, OSError) as exc:
            raise TrackingError(f"dirty tracking unavailable: {exc}") from None
        try:
            self._uffd.register(address, size, Mode.WP)
        except UffdError as exc:
            self._uffd.close()
            raise TrackingError(f"dirty tracking unavailable: {exc}") from None
        self.address, self.size = address, size
        self._scanner = None
        self._pagemap_fd = -1

    def protect_all(self) -> None:
        """Write-protect the whole RAM: a fresh epoch (everything reads clean)."""
        from postcopy.kernel.uffd import UffdError

        try:
            self._uffd.writeprotect(self.address, self.size, protect=True)
        except UffdError as exc:
            raise TrackingError(f"dirty tracking: {exc}") from None

    def harvest_encoded(self) -> str:
        """PAGEMAP_SCAN of /proc/self/pagemap: the pages written since the previous
        harvest (or protect_all), re-protected; base64 of native-endian u64 pairs
        ``(first page, count)`` (the agent runs on the same host), sorted and merged
        (see :func:`decode_runs`)."""
        if self._scanner is None:
            from postcopy.kernel.dirtylog.pagemapscan import WrittenScanner

            self._pagemap_fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._scanner = WrittenScanner(self._pagemap_fd, self.address, self.size, os.getpid())
        flat = array("Q", self._scanner.flat())
        if flat.itemsize != 8:  # pragma: no cover - 'Q' is 8 bytes on every Linux target
            raise TrackingError("no 64-bit array type")
        return base64.b64encode(flat.tobytes()).decode("ascii")

    def close(self) -> None:
        """Unregister and close (the guest then runs untracked)."""
        if self._pagemap_fd >= 0:
            os.close(self._pagemap_fd)
            self._pagemap_fd = -1
        try:
            self._uffd.unregister(self.address, self.size)
        finally:
            self._uffd.close()


def decode_runs(encoded: str) -> list[tuple[int, int]]:
    """The runs ``(first page, count)`` of a ``dirty_runs`` reply field."""
    flat = array("Q")
    flat.frombytes(base64.b64decode(encoded))
    return list(zip(flat[0::2], flat[1::2]))


def decode_flat(encoded: str) -> array:
    """A ``dirty_runs`` reply field as flat ``first page, count`` pairs (an array of u64)."""
    flat = array("Q")
    flat.frombytes(base64.b64decode(encoded))
    return flat
