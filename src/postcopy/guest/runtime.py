"""The guest machine: guest RAM plus vCPU threads that run the C workload in it.

All guest state (parameters, step counters, RNG states, heartbeats, data) lives in the
guest RAM; this module only keeps process-local bookkeeping: the pause flag, the vCPU
threads and the timing of the latest resume. Every access to guest RAM goes through a C
call (cffi releases the GIL), because an incoming guest's RAM is registered with
userfaultfd and a touch may block until some other process serves the page: a thread
blocked while holding the GIL would stop the whole process, control socket included.

States: ``incoming`` (empty RAM waiting for pages and ``resume``), ``running``,
``paused`` (every vCPU parked at a step boundary), ``finished`` (every vCPU reached
the step target), ``checkpointing`` (a doorbell session of a checkpointer drives the
vCPUs epoch by epoch: :mod:`postcopy.guest.doorbell`; replies and ``status`` call it
``running``, with ``doorbell: true``: to anyone else the guest runs, and its lease
says who drives it).
"""
from __future__ import annotations

import os
import socket
import threading
import time

from postcopy._native import ffi, lib
from postcopy.guest.dirtytrack import DirtyTracker
from postcopy.guest.doorbell import DoorbellCommands
from postcopy.guest.pacing import PacingCommands
from postcopy.guest.incoming import StagingArea, open_incoming_uffd
from postcopy.guest.params import (_CHECK_ERRORS, _UNLIMITED, BACKINGS, MAX_THREADS, PAGE_SIZE, WORKLOAD_NAMES,
                                   WORKLOADS, BootParams, GuestStateError, incoming_options_error, layout_error)
from postcopy.guest.ramcommands import RamCommands
from postcopy.guest.vcpus import Vcpus
from postcopy.kernel.pagemap import Pagemap

# The guest's parameters stay importable from here, beside the guest they make.
__all__ = ["BACKINGS", "MAX_THREADS", "PAGE_SIZE", "WORKLOADS", "WORKLOAD_NAMES", "BootParams", "Guest",
           "GuestStateError", "incoming_options_error", "layout_error"]




class Guest(RamCommands, DoorbellCommands, PacingCommands):
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
        # An incoming guest's start, CLOCK_MONOTONIC ns (the downtime's breakdown).
        self._start_marks: dict[str, int] = {}
        self._fatal: str | None = None
        self._quit = False
        self._fds_taken = False
        self._ram_settled = False  # an incoming guest's RAM was seen unregistered (all in)
        # Run-time pacing (throttle, rate_cap): timing only, never in RAM, never migrated.
        self._throttle = 0
        self._rate_cap = 0.0
        self.uffd = None  # missing mode, incoming guests only; handed out by fds
        self._dirty: DirtyTracker | None = None  # async write-protect tracking; never leaves the guest
        self._doorbell = None  # a DoorbellServer while a checkpoint session drives the vCPUs
        self._free_cap = 64  # runs buffer of free_ranges, grown on demand
        self.uffd_minor = uffd_minor
        self.staging_pages = staging_pages
        self._staging: StagingArea | None = None  # UFFDIO_MOVE install path, incoming guests only
        if incoming:
            self.uffd = open_incoming_uffd(self.address, ram_size, shmem=self.memfd is not None,
                                           minor=uffd_minor, move=bool(staging_pages))
            if staging_pages:
                self._staging = StagingArea(self.uffd, self.address, ram_size, staging_pages, self.page_size)

    @property
    def staging_address(self) -> int | None:
        return self._staging.address if self._staging is not None else None

    @property
    def _mover_peer(self) -> socket.socket | None:
        """The agent's end of the mover socketpair, handed out by ``fds``."""
        return self._staging.peer if self._staging is not None else None

    # ---- set-up -------------------------------------------------------------------

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

    # An incoming guest's vCPU threads may start in their first run, made running (see
    # Vcpus); a guest kind that sets its vCPUs up while they are parked says False.
    _RUN_AT_CREATION = True

    def _load(self, run: bool = False) -> None:
        """Read and check the state page (may block on a userfaultfd fault); with
        ``run`` the vCPU threads are made already in a free run (no pacing set)."""
        info = ffi.new("struct pc_guest_info *")
        rc = lib.pc_guest_check(self._ram, self.ram_size, self.page_size, info)
        if rc:
            raise GuestStateError(_CHECK_ERRORS.get(rc, f"state page check failed ({rc})"))
        self._start_marks["state_loaded"] = time.monotonic_ns()
        if self._vcpus is not None:
            raise GuestStateError("the state page was loaded already")
        locals_ = ffi.gc(lib.pc_vcpu_locals_new(info.threads), lib.pc_vcpu_locals_free)
        lib.pc_guest_load_locals(self._ram, locals_, info.threads)
        threads = int(info.threads)
        limits = self._free_run_limits(int(info.steps_target), threads) if run else None
        try:
            vcpus = Vcpus(self._ram, self.ram_size, threads, locals_, run=limits, notify=True)
        except OSError as exc:
            raise GuestStateError(str(exc)) from None
        if not run:
            vcpus.set_pacing(throttle=self._throttle, rate_cap=self._rate_cap)
        self._start_marks["vcpus_ready"] = time.monotonic_ns()
        with self._cond:
            self._info = info
            self._locals = locals_
            self._local_ptrs = [locals_ + t for t in range(info.threads)]
            self._vcpus = vcpus
            self._running = run

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
            limits = self._free_run_limits(self.steps_target or 0, len(self._local_ptrs))
        for p in self._local_ptrs:
            p.first_step_ns = 0
        self._running = True
        self._vcpus.release(limits, notify=notify)

    def _free_run_limits(self, steps_target: int, threads: int) -> list[int]:
        """Each vCPU's limit for a free run: the stop point, or the step target."""
        target = steps_target or _UNLIMITED
        return [min(target, self._stop_at) if self._stop_at is not None else target] * threads

    def _settle(self) -> None:
        """Take note of the vCPUs having parked (cond held); idempotent."""
        if self._doorbell is not None:  # a doorbell session drives the vCPUs until its last answer
            if not self._doorbell.ended:
                return
            self._doorbell = None
            self._running = True
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

    def _state_page_mapped(self) -> bool:
        """Whether the state page is mapped here (it arrived: reading it cannot fault)."""
        try:
            with Pagemap() as pagemap:
                return bool(pagemap.read(self.address, 1)[0] >> 63)
        except OSError:
            return False

    def _start_incoming_now(self) -> bool:
        """An incoming guest's start inside its resume (cond held; its state page is
        here): no thread of its own, and its vCPU threads are made running when no
        pacing needs setting first. This is inside a migration's downtime. False if
        the state page was refused (the guest is fatal then, as after the thread's)."""
        self._start_marks["start"] = time.monotonic_ns()
        try:
            self._load(run=not self._throttle and not self._rate_cap)
        except GuestStateError as exc:
            self._fatal = f"incoming RAM: {exc}"
            self._cond.notify_all()
            return False
        if not self._running:
            self._spawn()
        self._start_marks["released"] = self._vcpus.resumed_ns
        return True

    def _start_incoming(self) -> None:
        self._start_marks["start"] = time.monotonic_ns()
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
                self._start_marks["released"] = self._vcpus.resumed_ns
            self._cond.notify_all()

    # ---- commands ---------------------------------------------------------------------

    def _visible_state(self) -> str:
        """The state as replies give it: a doorbell session's guest is running."""
        return "running" if self._state == "checkpointing" else self._state

    def _pause_reply(self) -> dict:
        return {"state": self._visible_state(), "paused_ns": self._paused_ns,
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
        if self._state == "checkpointing":
            raise GuestStateError("a checkpoint doorbell session drives the guest: resume refused")
        if self._state == "incoming" and not self._fds_taken:
            raise GuestStateError("resume of an incoming guest before its userfaultfd was handed "
                                  "out (fds): the first page would never arrive")
        self._stop_at = stop_at
        self._pause_requested = False
        started = True  # the vCPUs were released by this request
        if self._state == "incoming":
            self._resumed_ns = time.monotonic_ns()
            self._state = "running"
            if self._RUN_AT_CREATION and self._state_page_mapped():
                started = self._start_incoming_now()
            else:  # reading it may fault: the reply must not wait for the page
                started = False
                self._starting = True
                threading.Thread(target=self._start_incoming, name="incoming", daemon=True).start()
        else:
            self._state = "running"
            self._spawn(limits)
            self._resumed_ns = self._vcpus.resumed_ns
        self._cond.notify_all()
        return {"resumed_ns": self._resumed_ns, "vcpus_started": started}

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
                "state": self._visible_state(),
                "doorbell": self._doorbell is not None,
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
                "incoming_start_ns": dict(self._start_marks),
                "uffd": self.uffd is not None,
                "uffd_minor": self.uffd_minor,
                "staging_address": self.staging_address,
                "staging_pages": self.staging_pages,
                "dirty_tracking": self._dirty is not None,
                "vcpu_thread_ids": self._vcpus.thread_ids() if self._vcpus is not None else [],
                "free_fraction": float(info.free_fraction) if info else None,
                "free_pages": int(info.free_pages) * int(info.threads) if info else None,
            }

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
