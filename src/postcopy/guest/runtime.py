"""The guest machine: guest RAM plus vCPU threads that run the C workload in it.

All guest state (parameters, step counters, RNG states, heartbeats, data) lives in the
guest RAM; this module only keeps process-local bookkeeping: the pause flag, the vCPU
threads and the timing of the latest resume. Every access to guest RAM goes through a C
call (cffi releases the GIL), because an incoming guest's RAM is registered with
userfaultfd and a touch may block until some other process serves the page: a thread
blocked while holding the GIL would stop the whole process, control socket included.

States: ``incoming`` (empty RAM waiting for pages and ``resume``), ``running``,
``paused`` (every vCPU parked at a step boundary), ``finished`` (every vCPU reached
the step target).
"""
from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from postcopy._native import ffi, lib
from postcopy.guest.dirtytrack import DirtyTracker, TrackingError
from postcopy.guest.vcpus import Vcpus

WORKLOADS: dict[str, int] = {"idle": 0, "random-write": 1, "sequential": 2, "hotspot": 3}
WORKLOAD_NAMES = {v: k for k, v in WORKLOADS.items()}
BACKINGS = ("memfd", "anon")
MAX_THREADS: int = lib.PC_GUEST_MAX_THREADS
PAGE_SIZE: int = mmap.PAGESIZE
_UNLIMITED = (1 << 64) - 1

_CHECK_ERRORS = {
    lib.PC_GUEST_EBADMAGIC: "the state page holds no guest (bad magic)",
    lib.PC_GUEST_EVERSION: "the state page has another layout version",
    lib.PC_GUEST_ESIZE: "RAM size or page size differs from the state page's",
    lib.PC_GUEST_ETHREADS: f"thread count must be 1..{MAX_THREADS}",
    lib.PC_GUEST_EWORKLOAD: "unknown workload",
    lib.PC_GUEST_ELAYOUT: "RAM is too small for the layout (state page, shared slice, one page per thread)",
    lib.PC_GUEST_EPARAM: "bad parameter (working set must be in (0, 1], free fraction in [0, 1), rate >= 0)",
}


class GuestStateError(RuntimeError):
    """A request that the guest cannot honour in its current state (or with these
    arguments); reported to the control client as ``{"ok": false, "error": ...}``."""


@dataclass(frozen=True)
class BootParams:
    """What a fresh guest writes into its state page."""

    threads: int
    workload: str
    seed: int
    steps: int | None = None
    rate: float = 0.0
    working_set: float = 1.0
    free_fraction: float = 0.0


def layout_error(ram: int, threads: int, workload: str, working_set: float,
                 free_fraction: float = 0.0) -> str | None:
    """Why these parameters cannot make a guest, or None if they can."""
    if workload not in WORKLOADS:
        return f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})"
    if ram <= 0 or ram % PAGE_SIZE:
        return f"RAM size {ram} is not a positive multiple of the page size ({PAGE_SIZE})"
    if not 1 <= threads <= MAX_THREADS:
        return f"--threads must be 1..{MAX_THREADS}"
    if not 0.0 < working_set <= 1.0:
        return "--working-set must be a fraction in (0, 1]"
    if not 0.0 <= free_fraction < 1.0:
        return "--free-fraction must be a fraction in [0, 1)"
    info = ffi.new("struct pc_guest_info *")
    rc = lib.pc_guest_layout(ram, PAGE_SIZE, threads, WORKLOADS[workload], working_set, free_fraction, info)
    if rc == lib.PC_GUEST_ELAYOUT:
        shared = max(PAGE_SIZE, min(ram // 16, 1 << 20) // PAGE_SIZE * PAGE_SIZE)
        per_thread = 2 if free_fraction > 0 else 1
        need = PAGE_SIZE + shared + threads * per_thread * PAGE_SIZE
        return (f"RAM {ram} bytes is too small for {threads} thread(s): needs at least {need} "
                f"(state page, shared slice, {per_thread} page(s) per thread)")
    if rc:
        return _CHECK_ERRORS.get(rc, f"layout error {rc}")
    return None


def incoming_options_error(backing: str, *, incoming: bool, uffd_minor: bool, staging_pages: int) -> str | None:
    """Why these incoming-guest install options do not fit, or None. (Kernel features
    are checked when the userfaultfd is opened: its error names the missing one.)"""
    if (uffd_minor or staging_pages) and not incoming:
        return "--uffd-minor and --staging-pages only apply to an --incoming guest"
    if uffd_minor and backing != "memfd":
        return ("--uffd-minor (UFFDIO_CONTINUE install path) needs memfd backing: minor faults exist only "
                "for pages already in a shmem/hugetlbfs page cache (Feature.MINOR_SHMEM)")
    if staging_pages < 0:
        return "--staging-pages must be >= 0"
    if staging_pages and backing != "anon":
        return ("--staging-pages (UFFDIO_MOVE install path) needs anon backing: UFFDIO_MOVE moves only "
                "private anonymous pages")
    if uffd_minor and staging_pages:
        return "--uffd-minor and --staging-pages are two different install paths: pick one"
    return None


class Guest:
    """Guest RAM and its vCPUs. Thread safe; the control server calls in from its
    threads, the vCPU threads report back, the main thread waits in :meth:`wait_exit`."""

    def __init__(self, ram_size: int, backing: str = "memfd", *, incoming: bool = False,
                 uffd_minor: bool = False, staging_pages: int = 0):
        if backing not in BACKINGS:
            raise ValueError(f"backing must be one of {BACKINGS}")
        error = incoming_options_error(backing, incoming=incoming, uffd_minor=uffd_minor,
                                       staging_pages=staging_pages)
        if error:
            raise ValueError(error)
        self.ram_size = ram_size
        self.page_size = PAGE_SIZE
        self.backing = backing
        self.memfd: int | None = None
        if backing == "memfd":
            self.memfd = os.memfd_create("postcopy-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.memfd, ram_size)
        ptr = lib.pc_guest_map(ram_size, -1 if self.memfd is None else self.memfd)
        if ptr == ffi.NULL:
            err = ffi.errno
            raise OSError(err, f"cannot map {ram_size} bytes of guest RAM: {os.strerror(err)}")
        # Never unmapped: the process exits with it (munmap of uffd-registered RAM could
        # wait for an UNMAP event reader).
        self._ram = ptr
        self.address = int(ffi.cast("uintptr_t", ptr))
        self._cond = threading.Condition()
        self._op = threading.Lock()  # one control command at a time
        self._vcpus: Vcpus | None = None  # created once, with the state page
        self._locals = None
        self._local_ptrs: list = []
        self._info = None
        self._running = False  # vCPUs released and not yet seen parked
        self._starting = False
        self._pause_requested = False
        self._stop_at: int | None = None
        self._state = "incoming" if incoming else "paused"
        self._resumed_ns: int | None = None
        self._paused_ns: int | None = None
        self._fatal: str | None = None
        self._quit = False
        self._fds_taken = False
        self._ram_settled = False  # an incoming guest's RAM was seen unregistered (all in)
        # Run-time pacing (throttle, rate_cap): timing only, never in RAM, never migrated.
        self._throttle = 0
        self._rate_cap = 0.0
        self.uffd = None  # missing mode, incoming guests only; handed out by fds
        self._dirty: DirtyTracker | None = None  # async write-protect tracking; never leaves the guest
        self._free_cap = 64  # runs buffer of free_ranges, grown on demand
        self.uffd_minor = uffd_minor
        # Staging area for the destination's UFFDIO_MOVE install path: private anonymous
        # memory in this process (a move never leaves one mm), deliberately NOT
        # registered; the agent fills it through /proc/PID/mem and moves pages out.
        self._staging: mmap.mmap | None = None
        self.staging_address: int | None = None
        self.staging_pages = staging_pages
        self._mover_peer: socket.socket | None = None  # the agent's end, handed out by fds
        if incoming:
            self._open_uffd()
            if staging_pages:
                self._map_staging(staging_pages)

    # ---- set-up -------------------------------------------------------------------

    def _open_uffd(self) -> None:
        from postcopy.kernel.uffd import Feature, Mode, Userfaultfd

        required = Feature.MISSING_SHMEM if self.memfd is not None else Feature(0)
        mode = Mode.MISSING
        if self.uffd_minor:  # UFFDIO_CONTINUE install path: minor faults on the memfd
            required |= Feature.MINOR_SHMEM
            mode |= Mode.MINOR
        if self.staging_pages:  # UFFDIO_MOVE install path
            required |= Feature.MOVE
        optional = Feature.THREAD_ID | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
        self.uffd = Userfaultfd(features=required, optional=optional)
        self.uffd.register(self.address, self.ram_size, mode)

    def _map_staging(self, pages: int) -> None:
        self._staging = mmap.mmap(-1, pages * self.page_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # Base pages only: a THP here would be split by every partial move.
        self._staging.madvise(mmap.MADV_NOHUGEPAGE)
        self.staging_address = int(ffi.cast("uintptr_t", ffi.from_buffer(self._staging)))
        # The kernel refuses cross-mm moves (userfaultfd_move: mm != current->mm ->
        # EINVAL), so the agent cannot issue UFFDIO_MOVE itself: a mover thread of this
        # process does, on requests over a socketpair.
        mine, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._mover_peer = peer
        threading.Thread(target=self._mover, args=(mine,), name="uffd-mover", daemon=True).start()

    def _mover(self, sock: socket.socket) -> None:
        """Serve UFFDIO_MOVE requests ``(dst, src, len)`` (3 x u64) from staging into
        RAM; each reply is the ioctl's result as an i64 (bytes moved, or -errno)."""
        fd = self.uffd.fileno()
        ram_lo, ram_hi = self.address, self.address + self.ram_size
        st_lo, st_hi = self.staging_address, self.staging_address + self.staging_pages * self.page_size
        request, reply = struct.Struct("=QQQ"), struct.Struct("=q")
        with sock:
            while True:
                try:
                    msg = sock.recv(request.size)
                except OSError:
                    return
                if len(msg) != request.size:
                    return  # the agent closed its end
                dst, src, length = request.unpack(msg)
                if not (ram_lo <= dst and dst + length <= ram_hi and st_lo <= src and src + length <= st_hi):
                    result = -22  # EINVAL: only staging -> RAM
                else:
                    result = lib.pc_uffd_move(fd, dst, src, length, 0, ffi.NULL)
                try:
                    sock.send(reply.pack(result))
                except OSError:
                    return

    def boot(self, params: BootParams) -> None:
        """Write a fresh state page and shared slice (the guest stays paused)."""
        error = layout_error(self.ram_size, params.threads, params.workload, params.working_set,
                             params.free_fraction)
        if error:
            raise ValueError(error)
        rc = lib.pc_guest_boot(self._ram, self.ram_size, self.page_size, params.threads,
                               WORKLOADS[params.workload], params.seed & _UNLIMITED,
                               params.steps or 0, float(params.rate), float(params.working_set),
                               float(params.free_fraction))
        if rc:
            raise ValueError(_CHECK_ERRORS.get(rc, f"boot error {rc}"))
        self._load()

    def _load(self) -> None:
        """Read and check the state page (may block on a userfaultfd fault)."""
        info = ffi.new("struct pc_guest_info *")
        rc = lib.pc_guest_check(self._ram, self.ram_size, self.page_size, info)
        if rc:
            raise GuestStateError(_CHECK_ERRORS.get(rc, f"state page check failed ({rc})"))
        if self._vcpus is not None:
            raise GuestStateError("the state page was loaded already")
        locals_ = ffi.gc(lib.pc_vcpu_locals_new(info.threads), lib.pc_vcpu_locals_free)
        lib.pc_guest_load_locals(self._ram, locals_, info.threads)
        try:
            vcpus = Vcpus(self._ram, self.ram_size, int(info.threads), locals_)
        except OSError as exc:
            raise GuestStateError(str(exc)) from None
        vcpus.set_pacing(throttle=self._throttle, rate_cap=self._rate_cap)
        with self._cond:
            self._info = info
            self._locals = locals_
            self._local_ptrs = [locals_ + t for t in range(info.threads)]
            self._vcpus = vcpus

    # ---- bookkeeping ----------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def threads(self) -> int | None:
        return int(self._info.threads) if self._info else None

    @property
    def steps_target(self) -> int | None:
        return int(self._info.steps_target) or None if self._info else None

    def steps(self) -> list[int]:
        """Steps done per vCPU (process-local mirror; never touches guest RAM)."""
        return [int(p.steps_done) for p in self._local_ptrs]

    def last_heartbeat_ns(self) -> int | None:
        beats = [int(p.last_step_ns) for p in self._local_ptrs]
        return max(beats) if beats and max(beats) else None

    def first_step_after_resume_ns(self) -> int | None:
        firsts = [int(p.first_step_ns) for p in self._local_ptrs if p.first_step_ns]
        return min(firsts) if firsts else None

    def _spawn(self, limits: list[int] | None = None) -> None:
        """Release the parked vCPUs (cond held): each to its limit in ``limits``, else
        all to the stop point (or the step target)."""
        notify = limits is None  # a free run: its end wakes the main thread (wait)
        if limits is None:
            target = self.steps_target or _UNLIMITED
            limit = min(target, self._stop_at) if self._stop_at is not None else target
            limits = [limit] * len(self._local_ptrs)
        for p in self._local_ptrs:
            p.first_step_ns = 0
        self._running = True
        self._vcpus.release(limits, notify=notify)

    def _settle(self) -> None:
        """Take note of the vCPUs having parked (cond held); idempotent."""
        if not self._running or not self._vcpus.parked:
            return
        self._running = False
        for tid, rc in enumerate(self._vcpus.results()):
            if rc < 0:
                self._fatal = self._vcpu_error(tid, rc)
        self._paused_ns = self._vcpus.parked_ns
        target = self.steps_target
        if not self._pause_requested and target and all(s >= target for s in self.steps()):
            self._state = "finished"
        else:  # paused by request, or stopped at run_until / --pause-at
            self._state = "paused"
        if self._fatal or self._state == "finished":
            self._vcpus.notify()  # the main thread waits for these (wait)
        self._cond.notify_all()

    def _vcpu_error(self, tid: int, rc: int) -> str:
        """The fatal error for vCPU ``tid``'s negative run result."""
        return f"vCPU {tid} refused to run: {_CHECK_ERRORS.get(rc, rc)}"

    def _wait_parked(self) -> None:
        """Wait (no lock held) until an incoming guest has started and every vCPU is
        parked; the vCPUs are waited for in C, GIL released."""
        with self._cond:
            while self._starting:
                self._cond.wait()
            running = self._running
        if running:
            self._vcpus.wait_parked()
        with self._cond:
            self._settle()

    def _start_incoming(self) -> None:
        try:
            self._load()  # faults on the state page: served by whoever holds the uffd
        except GuestStateError as exc:
            with self._cond:
                self._fatal = f"incoming RAM: {exc}"
                self._starting = False
                self._cond.notify_all()
            return
        with self._cond:
            self._starting = False
            if self._pause_requested:
                self._paused_ns = time.monotonic_ns()
                self._state = "paused"
            else:
                self._spawn()
                self._resumed_ns = self._vcpus.resumed_ns
            self._cond.notify_all()

    # ---- commands ---------------------------------------------------------------------

    def _pause_reply(self) -> dict:
        return {"state": self._state, "paused_ns": self._paused_ns,
                "last_heartbeat_ns": self.last_heartbeat_ns(), "steps": self.steps(),
                "resume_to_first_step_ns": self._resume_to_first_step_ns()}

    def resume(self, *, stop_at: int | None = None) -> dict:
        """Let the vCPUs run (from ``paused`` or ``incoming``). An incoming guest reads
        its state page in the background, so the reply does not wait for the page."""
        with self._op, self._cond:
            return self._resume_locked(stop_at=stop_at)

    def _resume_locked(self, *, stop_at: int | None = None, limits: list[int] | None = None) -> dict:
        self._settle()
        if self._state == "running":
            raise GuestStateError("guest is already running")
        if self._state == "finished":
            raise GuestStateError("guest has finished its steps")
        if self._state == "incoming" and not self._fds_taken:
            raise GuestStateError("resume of an incoming guest before its userfaultfd was handed "
                                  "out (fds): the first page would never arrive")
        self._stop_at = stop_at
        self._pause_requested = False
        if self._state == "incoming":
            self._resumed_ns = time.monotonic_ns()
            self._state = "running"
            self._starting = True
            threading.Thread(target=self._start_incoming, name="incoming", daemon=True).start()
        else:
            self._state = "running"
            self._spawn(limits)
            self._resumed_ns = self._vcpus.resumed_ns
        self._cond.notify_all()
        return {"resumed_ns": self._resumed_ns}

    def pause(self) -> dict:
        """Park every vCPU at a step boundary; returns once all are parked (so it waits
        as long as a vCPU waits for a userfaultfd fault to be served). The reply's
        ``was`` is the state before (only "running" means this pause stopped it) and
        ``stop_at`` the step limit it ran to, so a caller that pauses only briefly (a
        soft-dirty harvest) can resume exactly what it interrupted."""
        with self._op:
            with self._cond:
                self._settle()
                if self._state == "incoming":
                    raise GuestStateError("guest is incoming: nothing runs yet")
                was, stop_at = self._state, self._stop_at
                if was == "running":
                    self._pause_requested = True
                    if self._running:  # else an incoming guest still loading sees the request
                        self._vcpus.request_pause()
            if was == "running":
                self._wait_parked()
            with self._cond:
                return {**self._pause_reply(), "was": was, "stop_at": stop_at,
                        "pause_to_parked_ns": self._pause_to_parked_ns() if was == "running" else None}

    def run_until(self, steps: int) -> dict:
        """Resume and park again when every vCPU has done exactly ``steps`` steps (or
        reached its target first, or a ``pause`` came in between)."""
        with self._op, self._cond:
            self._check_paused("run_until")
            done = self.steps()
            if steps < max(done):
                raise GuestStateError(f"vCPUs are already past step {steps}: {done}")
            self._resume_locked(stop_at=steps)
        self._wait_parked()
        with self._cond:
            return self._pause_reply()

    def run(self, steps: int, *, harvest: bool = False) -> dict:
        """One epoch in one command: every vCPU does exactly ``steps`` more steps (fewer
        if it reaches its target first, or a ``pause`` comes in between) and parks. With
        ``harvest``, the dirty log (``dirty_track``) is harvested right after the park,
        before the reply: ``dirty_runs`` (base64 of native u64 pairs ``first
        page, count``) are the pages written since the previous harvest."""
        if harvest and self._dirty is None:
            raise GuestStateError("run with harvest needs dirty tracking on (dirty_track)")
        with self._op, self._cond:
            self._check_paused("run")
            target = self.steps_target or _UNLIMITED
            limits = [min(done + steps, target) for done in self.steps()]
            self._resume_locked(stop_at=max(limits), limits=limits)
        self._wait_parked()
        reply: dict = {}
        if harvest:
            with self._op:
                t0 = time.monotonic_ns()
                reply["dirty_runs"] = self._harvest_encoded()
                reply["harvest_ns"] = time.monotonic_ns() - t0
        with self._cond:
            return {**self._pause_reply(), **reply}

    def set_throttle(self, percent: int) -> dict:
        """Park each vCPU ``percent`` (0..99) of its time from its next step on (QEMU's
        auto-converge throttle); 0 lifts it. Timing only: not guest state, not migrated."""
        if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 99:
            raise GuestStateError("throttle wants an integer 'percent' 0..99 (0 lifts it)")
        return self._set_pacing(percent, self._rate_cap)

    def set_rate_cap(self, steps_per_s: float) -> dict:
        """Cap each vCPU at ``steps_per_s`` steps/s from its next step on (as ``--rate``,
        the slower of the two holds); 0 lifts it. Not one of the guest's parameters."""
        if (not isinstance(steps_per_s, (int, float)) or isinstance(steps_per_s, bool)
                or not 0 <= steps_per_s <= 1e18):
            raise GuestStateError("rate_cap wants a number 'steps_per_s' >= 0 (0 lifts the cap)")
        return self._set_pacing(self._throttle, float(steps_per_s))

    def _set_pacing(self, throttle: int, rate_cap: float) -> dict:
        with self._cond:
            if self._vcpus is not None:
                self._vcpus.set_pacing(throttle=throttle, rate_cap=rate_cap)
            self._throttle, self._rate_cap = throttle, rate_cap
            return {"throttle_pct": throttle, "rate_cap": rate_cap}

    def _check_paused(self, what: str) -> None:
        self._settle()
        if self._state != "paused":
            raise GuestStateError(f"{what} needs a paused guest (state {self._state})")

    def _pause_to_parked_ns(self) -> int | None:
        """From the latest pause request to the last vCPU parked (ns)."""
        asked, parked = self._vcpus.pause_requested_ns, self._vcpus.parked_ns
        return parked - asked if asked and parked >= asked else None

    def _resume_to_first_step_ns(self) -> int | None:
        """From the latest resume to the first step any vCPU completed after it (ns)."""
        first = self.first_step_after_resume_ns()
        return first - self._resumed_ns if first and self._resumed_ns and first >= self._resumed_ns else None

    def status(self) -> dict:
        with self._cond:
            self._settle()
            info = self._info
            return {
                "state": self._state,
                "pid": os.getpid(),
                "ram_size": self.ram_size,
                "page_size": self.page_size,
                "backing": self.backing,
                "ram_address": self.address,
                "threads": self.threads,
                "workload": WORKLOAD_NAMES.get(int(info.workload)) if info else None,
                "seed": int(info.seed) if info else None,
                "working_set": float(info.working_set) if info else None,
                "rate": float(info.rate) if info else None,
                "throttle_pct": self._throttle,
                "rate_cap": self._rate_cap,
                "steps": self.steps(),
                "steps_target": self.steps_target,
                "stop_at": self._stop_at,
                "last_heartbeat_ns": self.last_heartbeat_ns(),
                "first_step_after_resume_ns": self.first_step_after_resume_ns(),
                "resumed_ns": self._resumed_ns,
                "paused_ns": self._paused_ns,
                "uffd": self.uffd is not None,
                "uffd_minor": self.uffd_minor,
                "staging_address": self.staging_address,
                "staging_pages": self.staging_pages,
                "dirty_tracking": self._dirty is not None,
                "vcpu_thread_ids": self._vcpus.thread_ids() if self._vcpus is not None else [],
                "free_fraction": float(info.free_fraction) if info else None,
                "free_pages": int(info.free_pages) * int(info.threads) if info else None,
            }

    def ram_arriving(self) -> bool:
        """Whether pages may still arrive: an incoming guest's RAM stays registered with
        its userfaultfd until the destination has every page in (it unregisters then).
        Until that, a read that bypasses the mapping (the hash's SEEK_DATA on the memfd,
        or skipping non-present pages) would see missing pages as zeros."""
        if self.uffd is None or self._ram_settled:
            return False
        if _uffd_registered(self.address, self.ram_size):
            return True
        self._ram_settled = True  # nothing registers it again
        return False

    def ram_hash(self) -> str:
        """Hash of the whole RAM without heartbeats (paused or finished guests only).
        Pages that read as zero without being present are not touched, so an incoming
        guest refuses until every page has arrived (see :meth:`ram_arriving`)."""
        with self._op:
            with self._cond:
                self._settle()
                if self._state not in ("paused", "finished") or self._starting or self._running:
                    raise GuestStateError(f"hash needs a paused or finished guest (state {self._state})")
            if self.ram_arriving():
                raise GuestStateError("hash needs every page in: the RAM is still registered with the incoming "
                                      "userfaultfd (the destination has not received every page yet)")
            value = lib.pc_guest_hash(self._ram, self.ram_size, self.page_size,
                                      -1 if self.memfd is None else self.memfd)
            return f"{value:016x}"

    def fds(self) -> tuple[dict, list[int]]:
        """The reply for ``fds`` and the descriptors to send with it (memfd, uffd)."""
        with self._op:
            names, fds = [], []
            if self.memfd is not None:
                names.append("memfd")
                fds.append(self.memfd)
            if self.uffd is not None:
                names.append("uffd")
                fds.append(self.uffd.fileno())
            if self._mover_peer is not None:
                names.append("mover")
                fds.append(self._mover_peer.fileno())
            self._fds_taken = True
            reply = {"fds": names, "ram_address": self.address, "ram_size": self.ram_size,
                     "page_size": self.page_size, "pid": os.getpid(), "backing": self.backing,
                     "uffd_features": int(self.uffd.features) if self.uffd is not None else 0,
                     "uffd_minor": self.uffd_minor, "staging_address": self.staging_address,
                     "staging_pages": self.staging_pages}
            return reply, fds

    def discard(self, ranges: list) -> dict:
        """Drop RAM ranges so they read as missing again (under userfaultfd) or zero.

        Each range is ``[offset, length]``, page aligned and inside RAM. Allowed while
        the vCPUs are parked (paused, finished) or before an incoming guest starts.
        With UFFD_FEATURE_EVENT_REMOVE the kernel's madvise() blocks until the uffd
        reader has read the REMOVE event, so the uffd holder must be reading events
        meanwhile; a discard before the uffd was handed out is refused for that reason.
        """
        checked = self._check_ranges(ranges)
        with self._op:
            with self._cond:
                self._settle()
                if self._state == "running" or self._starting or self._running:
                    raise GuestStateError("discard needs parked vCPUs (pause first)")
            if self._dirty is not None:
                raise GuestStateError("discard while dirty tracking is on would go unreported (a punched "
                                      "hole keeps its write-protect marker): turn dirty_track off first")
            if (self.uffd is not None and not self._fds_taken
                    and int(self.uffd.features) & int(_feature("EVENT_REMOVE"))):
                raise GuestStateError("discard would block: nobody reads the userfaultfd's REMOVE "
                                      "events (take the fds first)")
            total = 0
            for off, length in checked:
                rc = lib.pc_guest_discard(self._ram, off, length, -1 if self.memfd is None else self.memfd)
                if rc:
                    raise GuestStateError(f"discard [{off}, +{length}): {os.strerror(-rc)}")
                total += length
            return {"discarded": total}

    # ---- dirty tracking, free pages, touch, step gaps ----------------------------------

    def dirty_track(self, on: bool) -> dict:
        """Turn async write-protect dirty tracking of the RAM on or off (see
        :mod:`postcopy.guest.dirtytrack`). On when already on protects everything again
        (a fresh epoch). Refused on a guest whose RAM is registered with a missing-mode
        userfaultfd (incoming): one VMA takes one userfaultfd context, and that one
        lacks WP_ASYNC. Off: unregister and close (idempotent)."""
        with self._op:
            if not on:
                tracker, self._dirty = self._dirty, None
                if tracker is not None:
                    tracker.close()
                return {"tracking": False, "was": tracker is not None}
            if self.uffd is not None:
                raise GuestStateError("dirty tracking needs a guest without a userfaultfd: this one's RAM is "
                                      "registered (missing mode) with the incoming userfaultfd, and a VMA takes "
                                      "only one userfaultfd context")
            restarted = self._dirty is not None
            try:
                if not restarted:
                    self._dirty = DirtyTracker(self.address, self.ram_size, shmem=self.memfd is not None)
                self._dirty.protect_all()
            except TrackingError as exc:
                tracker, self._dirty = self._dirty, None
                if tracker is not None:
                    tracker.close()
                raise GuestStateError(str(exc)) from None
            return {"tracking": True, "restarted": restarted}

    def _harvest_encoded(self) -> str:
        """The dirty log's pages written since the previous harvest (``_op`` held)."""
        if self._dirty is None:
            raise GuestStateError("dirty tracking was turned off during the run")
        try:
            return self._dirty.harvest_encoded()
        except OSError as exc:
            raise GuestStateError(f"harvest: {exc}") from None

    def free_ranges(self) -> dict:
        """Pages free right now: sorted, merged ``[offset, length]`` byte ranges. A
        snapshot: the vCPUs may take any of them back right after (zero-filling first)."""
        with self._cond:
            if self._info is None:
                raise GuestStateError(f"free_ranges needs the guest's state page (state {self._state})")
        while True:
            cap = self._free_cap
            buf = ffi.new("uint64_t[]", 2 * cap)
            n = lib.pc_guest_free_runs(self._ram, self.ram_size, self.page_size, buf, cap)
            if n < 0:
                raise GuestStateError(f"free_ranges: {os.strerror(-n)}")
            if n <= cap:
                break
            self._free_cap = n + n // 4 + 16  # the set moves: leave room
        flat = ffi.unpack(buf, 2 * n)
        ps = self.page_size
        ranges = [[first * ps, count * ps] for first, count in zip(flat[0::2], flat[1::2])]
        return {"ranges": ranges, "free_pages": sum(flat[1::2])}

    def touch(self, *, pages=None, spread=None) -> dict:
        """Write to pages without changing them (atomic OR of 0 into the first word):
        they become dirty for any dirty log. ``pages`` is a list of page indexes;
        ``spread`` is ``{"first", "count", "n", "seed"}``: n distinct pseudo-random pages
        of [first, first + count). Like a vCPU write, but not stopped by pause."""
        with self._cond:
            if self._state == "incoming":
                raise GuestStateError("guest is incoming: its RAM has not arrived")
        npages = self.ram_size // self.page_size
        if pages is not None:
            if not isinstance(pages, list) or not all(_is_int(p) and 0 <= p < npages for p in pages):
                raise GuestStateError(f"touch: pages must be a list of page indexes below {npages}")
            arr = ffi.new("uint64_t[]", pages)
            rc = lib.pc_guest_touch(self._ram, self.ram_size, self.page_size, arr, len(pages))
            count = len(pages)
        elif spread is not None:
            keys = ("first", "count", "n", "seed")
            if not isinstance(spread, dict) or not all(_is_int(spread.get(k)) and spread[k] >= 0 for k in keys):
                raise GuestStateError("touch: spread wants non-negative integers first, count, n, seed")
            first, span, count, seed = (spread[k] for k in keys)
            if first + span > npages or count > span:
                raise GuestStateError(f"touch: spread [{first}, +{span}) of {count} pages does not fit "
                                      f"{npages} pages")
            rc = lib.pc_guest_touch_spread(self._ram, self.ram_size, self.page_size, first, span, count,
                                           seed & _UNLIMITED)
        else:
            raise GuestStateError("touch wants 'pages' or 'spread'")
        if rc:
            raise GuestStateError(f"touch: {os.strerror(-rc)}")
        return {"touched": count}

    def take_max_step_gap(self) -> dict:
        """Longest time any vCPU went without a step (pauses included) since the
        previous call, in ns; resets it."""
        with self._cond:
            n = len(self._local_ptrs)
            locals_ = self._locals
        gap = lib.pc_vcpu_take_max_gap(locals_, n) if n else 0
        return {"max_gap_ns": int(gap)}

    def _check_ranges(self, ranges) -> list[tuple[int, int]]:
        if not isinstance(ranges, list):
            raise GuestStateError("ranges must be a list of [offset, length]")
        out = []
        for item in ranges:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
                raise GuestStateError(f"bad range {item!r}: want [offset, length] integers")
            off, length = item
            if off < 0 or length <= 0 or off % self.page_size or length % self.page_size:
                raise GuestStateError(f"range [{off}, {length}] is not page aligned and non-empty")
            if off + length > self.ram_size:
                raise GuestStateError(f"range [{off}, {length}] ends beyond RAM ({self.ram_size})")
            out.append((off, length))
        return out

    def abandon(self, reason: str) -> None:
        """Stop for good (the main thread exits 1 with ``reason``): an incoming guest
        whose destination agent is gone would otherwise wait forever on its faults."""
        with self._cond:
            self._fatal = self._fatal or reason
            if self._vcpus is not None:
                self._vcpus.request_pause()  # no step after this; the main thread exits 1
                self._vcpus.notify()
            self._cond.notify_all()

    def request_quit(self) -> None:
        """Ask the main thread to exit (after the reply went out)."""
        with self._cond:
            self._quit = True
            if self._vcpus is not None:
                self._vcpus.request_pause()  # stop stepping; exit does not wait for it
                self._vcpus.notify()
            self._cond.notify_all()

    def wait(self, *, finished_ok: bool = True) -> str:
        """Block the main thread until ``finished`` (if finished_ok), quit or a fatal
        error; returns "finished", "quit" or "fatal"."""
        while True:
            with self._cond:
                vcpus = self._vcpus
                seen = vcpus.events() if vcpus is not None else 0  # before settling: no event lost
                self._settle()
                if self._fatal:
                    return "fatal"
                finished = finished_ok and self._state == "finished"
                # A guest that ran to its end (by a run epoch too, which does not wake
                # this thread) reports it before a quit that came after.
                if finished and not self.ram_arriving():
                    return "finished"
                if self._quit:
                    return "quit"
                if finished:
                    # An incoming guest that ran to its end before every page arrived
                    # stays parked: its hash and exit wait for the rest of its RAM
                    # (nothing signals the unregistration: poll it, briefly).
                    self._cond.wait(0.02)
                    continue
                if vcpus is None:
                    self._cond.wait(0.5)  # short waits keep SIGTERM (KeyboardInterrupt) prompt
                    continue
            # In C, GIL released; woken by a free run's end, quit or a fatal error, not
            # by every epoch of run / run_until. Short for the same SIGTERM reason.
            vcpus.wait_event(seen, 0.5)

    @property
    def fatal(self) -> str | None:
        return self._fatal


def _uffd_registered(address: int, size: int) -> bool:
    """Whether any mapping in [address, address + size) is registered with a
    userfaultfd in missing or minor mode (VmFlags ``um`` / ``ui`` in /proc/self/smaps)."""
    end = address + size
    overlaps = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                overlaps = lo < end and address < hi
            elif overlaps and head == "VmFlags:":
                flags = line.split()[1:]
                if "um" in flags or "ui" in flags:
                    return True
    return False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _feature(name: str):
    from postcopy.kernel.uffd import Feature

    return getattr(Feature, name)
