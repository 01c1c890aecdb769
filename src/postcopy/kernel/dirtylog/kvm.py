"""KVM's own dirty logs, for a KVM guest (``postcopy guest --vm kvm``).

KVM tracks the guest-physical pages its vCPUs write in a memslot flagged
KVM_MEM_LOG_DIRTY_PAGES (write-protecting them in the nested page tables, or with
PML). Three ways to read that log, one backend each:

* ``kvm-bitmap``: KVM_GET_DIRTY_LOG returns the slot's bitmap and re-protects the
  reported pages in the same ioctl (under the MMU lock: its cost follows RAM size).
* ``kvm-clear``: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; KVM_GET_DIRTY_LOG only reads, and
  KVM_CLEAR_DIRTY_LOG re-protects the reported pages, chunk by chunk
  (PC_KVM_CLEAR_CHUNK pages per ioctl, chunks without a dirty page skipped), as QEMU
  does to spread the write-protection.
* ``kvm-ring``: KVM_CAP_DIRTY_LOG_RING; each vCPU pushes the GFNs it dirties into a
  ring mmapped at KVM_DIRTY_LOG_PAGE_OFFSET of its fd; a harvest collects them and
  KVM_RESET_DIRTY_RINGS re-protects (cost follows the dirty pages). The ring must be
  enabled before the vCPUs exist, so the guest rebuilds its (disposable) VM to start it.

KVM refuses its ioctls to any process but the one that made the VM, so the harvest runs
inside the guest (control command ``kvm_dirty``) and the runs come back on the control
socket. Only writes made inside the VM are logged; the guest's page tables live in
another memslot and never show up (they are not RAM). Each backend is detected by
trying it on a scratch VM (:func:`kvm_backend_reasons`).
"""
from __future__ import annotations

import array
import base64
import sys
import threading

from postcopy.kernel.dirtylog import DirtyLog, DirtyLogUnavailable, Runs, GuestLink, GuestLinkError

KVM_BACKENDS = ("kvm-ring", "kvm-clear", "kvm-bitmap")  # auto on a KVM guest tries them in this order
_MODES = {"kvm-bitmap": "PC_KVM_LOG_BITMAP", "kvm-clear": "PC_KVM_LOG_CLEAR", "kvm-ring": "PC_KVM_LOG_RING"}
_CAPS = {"kvm-bitmap": "KVM_GET_DIRTY_LOG",
         "kvm-clear": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 + KVM_CLEAR_DIRTY_LOG",
         "kvm-ring": "KVM_CAP_DIRTY_LOG_RING"}
_lock = threading.Lock()
_cached: dict[str, str | None] | None = None


def kvm_backend_reasons(*, refresh: bool = False) -> dict[str, str | None]:
    """Each KVM backend -> None if this host's KVM offers it, else why not (naming
    /dev/kvm or the capability). Tried for real once per process."""
    global _cached
    with _lock:
        if _cached is None or refresh:
            _cached = {name: _try(name) for name in KVM_BACKENDS}
        return dict(_cached)


def _try(name: str) -> str | None:
    from postcopy._native import ffi, lib

    err = ffi.new("char[512]")
    if lib.pc_kvm_probe(getattr(lib, _MODES[name]), err, len(err)) == 0:
        return None
    return f"{name} dirty log unavailable ({_CAPS[name]}): {ffi.string(err).decode(errors='replace')}"


def guest_reason(name: str, status: dict) -> str | None:
    """Why KVM backend ``name`` cannot track this guest (its status reply), or None."""
    reason = kvm_backend_reasons()[name]
    if reason is not None:
        return reason
    if status.get("vm") != "kvm":
        return (f"{name} dirty log: the guest is not a KVM guest (start it with --vm kvm); "
                "KVM logs only what its vCPUs write")
    if status.get("state") == "incoming":
        return f"{name} dirty log: the guest is incoming (its RAM has not arrived): nothing to track"
    return None


class KvmDirtyLog(DirtyLog):
    """A KVM dirty log of a KVM guest's RAM, harvested by the guest on request.
    ``last_kernel_ms`` is the time inside KVM's ioctls (the rest of ``last_harvest_ms``
    is the control-socket round trip), ``last_pause_ms`` how long the start parked the
    vCPUs to rebuild the VM (ring only; harvests never pause)."""

    def __init__(self, name: str, guest: GuestLink, info: dict) -> None:
        super().__init__(guest, info)
        self.name = name
        self._client: GuestLink | None = None
        self.last_kernel_ms = 0.0
        self.stop_error: str | None = None

    def _start(self) -> None:
        self._client = self.guest.another()
        try:
            reply = self._client.request("kvm_dirty", op="start", log=self.name)
        except GuestLinkError as exc:
            self._client.close()
            self._client = None
            raise DirtyLogUnavailable(f"{self.name} dirty log: the guest could not arm it: {exc}") from None
        self.last_pause_ms = float(reply.get("paused_ms", 0.0))

    def _harvest(self) -> Runs:
        reply = self._client.request("kvm_dirty", op="harvest")
        self.last_kernel_ms = float(reply["harvest_ms"])
        self.last_pause_ms = 0.0
        return _unpack(reply["runs"])

    def _stop(self) -> None:
        try:
            if self._client is not None:
                self._client.request("kvm_dirty", op="stop")
        except GuestLinkError as exc:  # the guest is gone, and its VM with it
            self.stop_error = str(exc)
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None


def _unpack(text: str) -> Runs:
    """Runs from a harvest reply (base64 of little-endian u64 pairs first, count)."""
    words = array.array("Q", base64.b64decode(text))
    if sys.byteorder != "little":
        words.byteswap()
    it = iter(words)
    return list(zip(it, it))


def open_kvm_log(kind: str, guest: GuestLink, status: dict, info: dict) -> KvmDirtyLog:
    """A KVM dirty log of ``kind`` (a KVM backend, or "auto": the first of
    :data:`KVM_BACKENDS` that works) for a KVM guest; not started yet."""
    candidates = KVM_BACKENDS if kind == "auto" else (kind,)
    reasons = {name: guest_reason(name, status) for name in candidates}
    for name in candidates:
        if reasons[name] is None:
            return KvmDirtyLog(name, guest, info)
    if kind != "auto":
        raise DirtyLogUnavailable(reasons[kind])
    raise DirtyLogUnavailable("no KVM dirty log works here: " + "; ".join(reasons[n] for n in candidates))
