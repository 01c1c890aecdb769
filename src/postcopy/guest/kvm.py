"""The KVM guest: the same guest RAM and workloads, run by KVM vCPUs (``--vm kvm``).

:class:`KvmGuest` is a :class:`postcopy.guest.runtime.Guest` whose vCPU threads drive
KVM vCPUs of a micro-VM (native/kvm_vm.c): the freestanding guest code steps the
workload inside the VM on the very RAM region (memfd or anonymous) and state page of a
process guest, so the RAM after K steps, and its hash, equal the process guest's.
Pause, resume, run_until, status, hash, fds and discard are the base class's; the VM
only changes who writes the RAM. Two consequences:

* KVM's dirty logs see only writes made by the guest, so ``touch`` here is run by a
  service vCPU inside the VM (the process guest writes from the host).
* The VM is disposable: all state is in RAM, so switching to or from the dirty ring
  (which must be chosen before the vCPUs exist) parks the vCPUs, builds a new VM over
  the same RAM and lets them run on.

Its own control command ``kvm_dirty`` (``{"op": "start", "log": "kvm-bitmap"}``,
``{"op": "harvest"}``, ``{"op": "stop"}``) drives KVM's dirty log of RAM, which only
this process can do (KVM refuses ioctls from any other mm).
"""
from __future__ import annotations

import base64
import os
import time

from postcopy._native import ffi, lib
from postcopy.guest.params import _CHECK_ERRORS, _UNLIMITED, BootParams, GuestStateError
from postcopy.guest.runtime import Guest

#: dirty-log backend name -> native mode
LOGS = {"kvm-bitmap": lib.PC_KVM_LOG_BITMAP, "kvm-clear": lib.PC_KVM_LOG_CLEAR, "kvm-ring": lib.PC_KVM_LOG_RING}
#: entries per vCPU dirty ring (16 bytes each); a full ring exits to the vCPU thread,
#: which collects it and runs on
RING_ENTRIES = 16384
_RUNS_CHUNK = 65536


class KvmUnavailable(OSError):
    """The VM cannot be made here (no /dev/kvm, a capability missing): one line why."""


class KvmVm:
    """One KVM VM over a RAM mapping (threads vCPUs + the service vCPU)."""

    def __init__(self, ram, ram_size: int, threads: int, ring_entries: int = 0):
        err = ffi.new("char[256]")
        vm = lib.pc_kvm_new(ram, ram_size, threads, ring_entries, err, len(err))
        if vm == ffi.NULL:
            raise KvmUnavailable(ffi.string(err).decode(errors="replace"))
        self._vm = ffi.gc(vm, lib.pc_kvm_free)
        self.threads = threads
        self.npages = ram_size // os.sysconf("SC_PAGESIZE")
        self.ring = ring_entries > 0
        self.pause_flag = lib.pc_kvm_pause_flag(vm)
        self._runs = ffi.new("uint64_t[]", 2 * _RUNS_CHUNK)
        self._next = ffi.new("uint64_t *")
        self._t = ffi.new("uint64_t[2]")

    @property
    def error(self) -> str:
        return ffi.string(lib.pc_kvm_error(self._vm)).decode(errors="replace")

    def run(self, tid: int, limit: int, local) -> int:
        return lib.pc_kvm_vcpu_run(self._vm, tid, limit, local)

    def touch(self, pages: list[int]) -> None:
        arr = ffi.new("uint64_t[]", pages)
        if lib.pc_kvm_touch(self._vm, arr, len(pages)):
            raise GuestStateError(f"touch: {self.error}")

    def dirty_start(self, mode: int) -> None:
        if lib.pc_kvm_dirty_start(self._vm, mode):
            raise GuestStateError(f"KVM dirty log: {self.error}")

    def harvest(self) -> tuple[bytes, int, float, float]:
        """(runs as little-endian u64 pairs first, count; pages; ms getting the log; ms
        clearing it). Packed, not a list: a harvest of 10,000 scattered pages then costs
        the control socket one string instead of 10,000 JSON pairs."""
        n = lib.pc_kvm_dirty_harvest(self._vm, self._t)
        if n < 0:
            raise GuestStateError(f"KVM dirty log harvest: {self.error}")
        get_ms, clear_ms = self._t[0] / 1e6, self._t[1] / 1e6
        packed = []
        self._next[0] = 0
        while self._next[0] < self.npages:
            k = lib.pc_kvm_dirty_runs(self._vm, self._runs, _RUNS_CHUNK, self._next)
            if k == 0:
                break
            packed.append(ffi.buffer(self._runs, 16 * k)[:])
        return b"".join(packed), int(n), get_ms, clear_ms


def vcpu_error(rc: int, vm: KvmVm) -> str:
    """The message for a negative pc_kvm_vcpu_run result."""
    if rc in (lib.PC_KVM_EEXIT, lib.PC_KVM_ERUN, lib.PC_KVM_EFREE):
        return vm.error
    return _CHECK_ERRORS.get(rc, f"error {rc}")


def spread_pages(first: int, count: int, n: int, seed: int) -> list[int]:
    """The pages pc_guest_touch_spread (native/guest_vm.c) writes, as a list: n distinct
    pages of [first, first + count) by an affine permutation from seed."""
    if n == count:
        return list(range(first, first + n))
    x = seed & _UNLIMITED

    def splitmix() -> int:
        nonlocal x
        x = (x + 0x9E3779B97F4A7C15) & _UNLIMITED
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _UNLIMITED
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _UNLIMITED
        return z ^ (z >> 31)

    a = splitmix() % count | 1
    while _gcd(a, count) != 1:
        a = a + 2 if a + 2 < count else 1
    b = splitmix() % count
    return [first + (a * i + b) % count for i in range(n)]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


class KvmGuest(Guest):
    """A guest whose vCPUs are KVM vCPUs. The VM is made when the state page is known
    (boot, or an incoming guest's first resume) and remade for the dirty ring."""

    def __init__(self, ram_size: int, backing: str = "memfd", **kwargs):
        super().__init__(ram_size, backing, **kwargs)
        self.vm: KvmVm | None = None
        self.dirty_log: str | None = None
        self.harvest_ms = 0.0
        self.commands = {"kvm_dirty": self._kvm_dirty_command}

    # ---- the VM ------------------------------------------------------------------------

    def boot(self, params: BootParams) -> None:
        if params.free_fraction:
            raise ValueError("the KVM guest has no free pages: leave out --free-fraction")
        super().boot(params)

    _RUN_AT_CREATION = False  # the VM is made under parked vCPU threads

    def _load(self, run: bool = False) -> None:
        super()._load()
        if float(self._info.free_fraction) > 0:
            raise GuestStateError("the KVM guest cannot run a state page with free pages (--free-fraction)")
        if self.vm is None:
            self._make_vm(ring=False)

    def _make_vm(self, *, ring: bool) -> None:
        """(Re)build the VM over RAM (vCPUs parked): the persistent vCPU threads run its
        vCPUs from the next release on, and the pause word moves into its firmware
        memory (the guest code reads it every step)."""
        try:
            vm = KvmVm(self._ram, self.ram_size, int(self._info.threads), RING_ENTRIES if ring else 0)
        except KvmUnavailable as exc:
            raise GuestStateError(f"KVM guest: {exc}") from None
        self._vcpus.set_runner(ffi.addressof(lib, "pc_kvm_vcpu_runner"), vm._vm, vm.pause_flag)
        self.vm = vm  # the old VM (if any) is freed only now, no vCPU runs on it

    def _vcpu_error(self, tid: int, rc: int) -> str:
        return f"vCPU {tid} stopped: {vcpu_error(rc, self.vm)}"

    def _set_pacing(self, throttle: int, rate_cap: float) -> dict:
        if throttle or rate_cap:
            raise GuestStateError("the KVM guest has no run-time throttle or rate cap: its steps and their "
                                  "pacing run inside the VM (use --rate, or a process guest)")
        return super()._set_pacing(throttle, rate_cap)

    def status(self) -> dict:
        return {**super().status(), "vm": "kvm", "kvm_dirty_log": self.dirty_log}

    # ---- writes KVM can see ---------------------------------------------------------------

    def touch(self, *, pages=None, spread=None) -> dict:
        """As :meth:`Guest.touch`, but the writes are made inside the VM (by the service
        vCPU), so KVM's dirty logs report them; ``spread`` picks the same pages."""
        with self._cond:
            if self._state == "incoming" or self.vm is None:
                raise GuestStateError("guest is incoming: its RAM has not arrived")
        npages = self.ram_size // self.page_size
        if pages is not None:
            if not isinstance(pages, list) or not all(_is_index(p, npages) for p in pages):
                raise GuestStateError(f"touch: pages must be a list of page indexes below {npages}")
            chosen = pages
        elif spread is not None:
            keys = ("first", "count", "n", "seed")
            if not isinstance(spread, dict) or not all(_is_index(spread.get(k), 1 << 64) for k in keys):
                raise GuestStateError("touch: spread wants non-negative integers first, count, n, seed")
            first, span, n, seed = (spread[k] for k in keys)
            if first + span > npages or n > span:
                raise GuestStateError(f"touch: spread [{first}, +{span}) of {n} pages does not fit {npages} pages")
            chosen = spread_pages(first, span, n, seed) if n else []
        else:
            raise GuestStateError("touch wants 'pages' or 'spread'")
        if chosen:
            self.vm.touch(chosen)
        return {"touched": len(chosen)}

    # ---- KVM's dirty log ---------------------------------------------------------------------

    def _kvm_dirty_command(self, req: dict) -> dict:
        op = req.get("op")
        if op == "start":
            return self.kvm_dirty_start(req.get("log"))
        if op == "harvest":
            return self.kvm_dirty_harvest()
        if op == "stop":
            return self.kvm_dirty_stop()
        raise GuestStateError("kvm_dirty wants op start (with log), harvest or stop")

    def kvm_dirty_start(self, log) -> dict:
        """Arm KVM's dirty log of RAM (``kvm-bitmap``, ``kvm-clear`` or ``kvm-ring``);
        again when armed starts a fresh epoch. For the ring (or away from it) the VM is
        rebuilt with the vCPUs parked a moment: ``paused_ms`` says how long."""
        if log not in LOGS:
            raise GuestStateError(f"kvm_dirty start wants log one of {', '.join(LOGS)}")
        with self._op:
            if self.vm is None:
                raise GuestStateError("guest is incoming: its VM does not exist yet")
            paused_ms = 0.0
            if self.vm.ring != (log == "kvm-ring"):
                paused_ms = self._rebuild(ring=log == "kvm-ring")
            self.vm.dirty_start(LOGS[log])
            self.dirty_log = log
            return {"log": log, "paused_ms": paused_ms}

    def _rebuild(self, *, ring: bool) -> float:
        """Park the vCPU threads, remake the VM under them, let them run on as before
        (_op held). The threads stay: only what they run changes."""
        t0 = time.perf_counter()
        with self._cond:
            self._settle()
            was_running = self._state == "running"
            if was_running:
                self._pause_requested = True
                if self._running:
                    self._vcpus.request_pause()
        if was_running:
            self._wait_parked()
        with self._cond:
            self.dirty_log = None
            self._make_vm(ring=ring)
            if was_running and self._state == "paused":
                self._pause_requested = False
                self._state = "running"
                self._spawn()
                self._resumed_ns = self._vcpus.resumed_ns
                self._cond.notify_all()
        return (time.perf_counter() - t0) * 1e3

    def kvm_dirty_harvest(self) -> dict:
        """Pages written by the guest since the previous harvest (or start), re-protected
        before the reply: ``runs`` (base64 of little-endian u64 pairs first page, count:
        :mod:`postcopy.kernel.dirtylog.kvm` unpacks them), ``pages``, and the time inside the VM's ioctls
        (``harvest_ms``: get + clear; ``clear_ms``)."""
        vm = self.vm
        if vm is None or self.dirty_log is None:
            raise GuestStateError("kvm_dirty harvest needs a started KVM dirty log")
        t0 = time.perf_counter()
        runs, pages, get_ms, clear_ms = vm.harvest()
        total_ms = (time.perf_counter() - t0) * 1e3
        return {"runs": base64.b64encode(runs).decode(), "pages": pages, "log": self.dirty_log, "harvest_ms": get_ms + clear_ms,
                "clear_ms": clear_ms, "total_ms": total_ms}

    def kvm_dirty_stop(self) -> dict:
        with self._op:
            was = self.dirty_log
            if self.vm is not None and was is not None:
                self.vm.dirty_start(lib.PC_KVM_LOG_OFF)
            self.dirty_log = None
            return {"was": was}


def _is_index(x, bound: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < bound


def kvm_reason() -> str | None:
    """None if this host can run the KVM guest, else why not (naming /dev/kvm)."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is missing (no KVM on this host)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None

