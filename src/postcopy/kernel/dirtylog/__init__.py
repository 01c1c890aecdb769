"""Dirty logs: which guest pages were written since the previous harvest.

Two backends, one interface (:class:`DirtyLog`):

* ``soft-dirty`` (:mod:`.softdirty`): ``clear_refs`` 4 and bit 55 of
  ``/proc/PID/pagemap``. Read and clear are two steps, so each harvest pauses the
  guest across them (as CRIU freezes the task); the cost grows with RAM size.
* ``pagemap-scan`` (:mod:`.pagemapscan`): the guest write-protects its RAM on a
  userfaultfd of its own with UFFD_FEATURE_WP_ASYNC, and one PAGEMAP_SCAN ioctl
  reports the written pages and re-protects them atomically (Linux 6.7+). No pause;
  the cost grows with the dirty pages.

Which backend this kernel offers is found by trying (:mod:`.detect`), never from the
kernel version. A harvest returns dense, sorted runs ``(first_page, npages)`` with page
indexes relative to the start of guest RAM, and never misses a write made after
:meth:`DirtyLog.start` returned (it may report extra pages: see each backend).
"""
from __future__ import annotations

from typing import Protocol

import time

from postcopy.ranges import normalize

KINDS = ("auto", "soft-dirty", "pagemap-scan", "kvm-ring", "kvm-clear", "kvm-bitmap")
BACKENDS = ("soft-dirty", "pagemap-scan")  # auto tries them in this order

Runs = list[tuple[int, int]]


class GuestLinkError(RuntimeError):
    """The guest's control connection refused a request or broke (the guest's client,
    :class:`postcopy.guest.control.GuestClient`, raises a subclass)."""


class GuestLink(Protocol):
    """What a dirty log needs of the guest's control client (the guest package provides
    it; this package stays below it): a request, and a connection of its own."""

    path: str

    def request(self, cmd: str, **fields) -> dict: ...

    def another(self) -> "GuestLink": ...

    def close(self) -> None: ...


class DirtyLogUnavailable(RuntimeError):
    """The backend cannot work here; the message names the missing kernel feature (or
    why this guest cannot be tracked). Raised before the guest is touched."""


class DirtyLog:
    """One dirty log on one guest. ``start`` arms it, each ``harvest`` returns the pages
    written since the previous one (or since ``start``) and clears them, ``stop``
    disarms it (idempotent; the guest runs on normally). Usable as a context manager
    (``stop`` on exit).

    ``last_harvest_ms`` is the wall time of the latest harvest, ``last_pause_ms`` how
    long the guest was paused for it (0 when it was not running, and for pagemap-scan).
    """

    name: str = ""

    def __init__(self, guest: GuestLink, info: dict) -> None:
        self.guest = guest  # the caller's client: each backend opens a connection of its own
        self.guest_path = guest.path
        self.pid = int(info["pid"])
        self.base = int(info["ram_address"])
        self.size = int(info["ram_size"])
        self.page_size = int(info["page_size"])
        self.npages = self.size // self.page_size
        self.backing = info.get("backing", "memfd")
        self.last_harvest_ms = 0.0
        self.last_pause_ms = 0.0
        self.harvests = 0
        self._state = "new"  # new -> started -> stopped

    @property
    def started(self) -> bool:
        return self._state == "started"

    def start(self) -> None:
        """Arm the log: every guest write after this returns shows up in a harvest."""
        if self._state != "new":
            raise RuntimeError(f"{self.name} dirty log: start() once, on a new log (it is {self._state})")
        self._start()
        self._state = "started"

    def harvest(self) -> Runs:
        """Runs ``(first_page, npages)`` written since the previous harvest (or start),
        sorted and merged; clears them (get-and-clear: nothing written after the
        clear is lost)."""
        if self._state != "started":
            raise RuntimeError(f"{self.name} dirty log: harvest() needs a started log (it is {self._state})")
        t0 = time.perf_counter()
        runs = self._harvest()
        self.last_harvest_ms = (time.perf_counter() - t0) * 1e3
        self.harvests += 1
        return runs

    def stop(self) -> None:
        """Disarm and release what ``start`` made. Idempotent; never raises because
        the guest is gone (there is nothing left to undo then)."""
        if self._state == "started":
            self._state = "stopped"
            self._stop()
        self._state = "stopped"

    def __enter__(self) -> "DirtyLog":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} {self._state}>"

    # -- per backend -------------------------------------------------------------------
    def _start(self) -> None:
        raise NotImplementedError

    def _harvest(self) -> Runs:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError


def available_backends(*, refresh: bool = False) -> dict[str, str | None]:
    """Each backend's name -> None if this kernel offers it, else why not (naming the
    missing feature). Found by trying once per process (``refresh`` tries again)."""
    from postcopy.kernel.dirtylog import detect

    return detect.backend_reasons(refresh=refresh)


def open_dirty_log(kind: str, guest, info: dict) -> DirtyLog:
    """A dirty log of ``kind`` (one of :data:`KINDS`) for the guest
    behind ``guest`` (a :class:`GuestLink`: the guest's control client); ``info`` is its ``fds``
    or ``status`` reply (pid, ram_address, ram_size, page_size, backing).

    auto takes soft-dirty where it works, else pagemap-scan (``.name`` says which); on a
    KVM guest (``--vm kvm``) the first KVM log that works (:mod:`.kvm`).
    Raises :class:`DirtyLogUnavailable` if the backend cannot work here, before the
    guest is touched (only its status is read). The log is not started yet.
    """
    from postcopy.kernel.dirtylog import detect

    if kind not in KINDS:
        raise ValueError(f"unknown dirty log {kind!r} (choose from {', '.join(KINDS)})")
    status = guest.status()
    if kind.startswith("kvm-") or (kind == "auto" and status.get("vm") == "kvm"):  # KVM's own logs: .kvm
        from postcopy.kernel.dirtylog.kvm import open_kvm_log

        return open_kvm_log(kind, guest, status, info)
    candidates = BACKENDS if kind == "auto" else (kind,)
    reasons = {name: detect.guest_reason(name, status, info) for name in candidates}
    for name in candidates:
        if reasons[name] is None:
            return _make(name, guest, info)
    if kind != "auto":
        raise DirtyLogUnavailable(reasons[kind])
    raise DirtyLogUnavailable("no dirty log works here: " + "; ".join(reasons[n] for n in candidates))


def _make(name: str, guest: GuestLink, info: dict) -> DirtyLog:
    if name == "soft-dirty":
        from postcopy.kernel.dirtylog.softdirty import SoftDirtyLog

        return SoftDirtyLog(guest, info)
    from postcopy.kernel.dirtylog.pagemapscan import PagemapScanLog

    return PagemapScanLog(guest, info)


def merge_runs(*sources: Runs) -> Runs:
    """Union of run lists ``(first_page, npages)``: sorted, touching or overlapping
    runs merged, empty ones dropped."""
    return normalize(r for src in sources for r in src)
