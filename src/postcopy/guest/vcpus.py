"""The guest's vCPU threads: created once, parked on a futex while paused.

A thin wrapper over the native ``pc_vm`` (native/vcpu_threads.c). The threads are C
pthreads that never hold the GIL; they live as long as the process (an exiting guest
takes them along), so nothing here is ever freed. Every wait is a C futex wait with the
GIL released: the thread that needs the vCPUs parked waits for them itself, no Python
thread hops in between.
"""
from __future__ import annotations

import os

from postcopy._native import ffi, lib


class Vcpus:
    """One guest's vCPU threads. Not thread safe on its own: :class:`Guest` serialises
    :meth:`release` (one control command at a time); the waits and reads may run from
    any thread."""

    def __init__(self, ram, ram_size: int, threads: int, locals_, *, run: list[int] | None = None,
                 notify: bool = False) -> None:
        """Threads parked; with ``run``, threads already in their first run, as if
        :meth:`release` (``run``, ``notify``) had come at once (no wait for them to park
        and no wake-up after: an incoming guest's resume is inside a downtime)."""
        err = ffi.new("int *")
        if run is None:
            vm = lib.pc_vm_new(ram, ram_size, threads, locals_, err)
        else:
            vm = lib.pc_vm_new_running(ram, ram_size, threads, locals_, ffi.new("uint64_t[]", run), notify, err)
        if vm == ffi.NULL:
            raise OSError(-err[0], f"cannot start {threads} vCPU thread(s): {os.strerror(-err[0])}")
        self._vm = vm
        self._locals = locals_  # the threads write these: keep them alive with the vm
        self.threads = threads
        self._limits = ffi.new("uint64_t[]", threads)

    @property
    def vm(self):
        """The native ``struct pc_vm *`` (for C that drives the vCPUs itself)."""
        return self._vm

    def release(self, limits: list[int], *, notify: bool = False) -> None:
        """Let every vCPU t run until it has done ``limits[t]`` steps (or a pause);
        with ``notify`` the end of this run is an event (:meth:`wait_event`)."""
        for t, limit in enumerate(limits):
            self._limits[t] = limit
        rc = lib.pc_vm_resume(self._vm, self._limits, notify)
        if rc:
            raise RuntimeError("vCPUs released while some had not parked yet")

    def set_runner(self, runner=None, ctx=None, pause_flag=None) -> None:
        """While parked: run ``runner(ctx, tid, limit, local)`` (a ``pc_vcpu_runner``
        function pointer; None: the process guest's own step loop) with ``pause_flag``
        (an ``int *``; None: the vm's own) as the pause word from the next release."""
        rc = lib.pc_vm_set_runner(self._vm, ffi.NULL if runner is None else runner,
                                  ffi.NULL if ctx is None else ctx, ffi.NULL if pause_flag is None else pause_flag)
        if rc:
            raise RuntimeError("vCPU runner changed while some vCPU had not parked yet")

    def set_pacing(self, *, throttle: int, rate_cap: float) -> None:
        """Run-time pacing, seen at each vCPU's next step: park ``throttle`` percent
        (0..99) of the time; at most ``rate_cap`` steps/s per vCPU (0: no cap)."""
        if lib.pc_vm_set_throttle(self._vm, throttle) or lib.pc_vm_set_rate_cap(self._vm, rate_cap):
            raise ValueError(f"bad pacing: throttle {throttle}%, rate cap {rate_cap} steps/s")

    def request_pause(self) -> None:
        """Raise the pause flag (returns at once; see :meth:`wait_parked`)."""
        lib.pc_vm_request_pause(self._vm)

    def wait_parked(self, timeout: float | None = None) -> bool:
        """Block (GIL released) until every vCPU is parked; False after ``timeout`` s."""
        return bool(lib.pc_vm_wait_parked(self._vm, -1 if timeout is None else int(timeout * 1e9)))

    def notify(self) -> None:
        """Wake the :meth:`wait_event` waiters."""
        lib.pc_vm_notify(self._vm)

    def events(self) -> int:
        return int(lib.pc_vm_events(self._vm))

    def wait_event(self, seen: int, timeout: float) -> bool:
        """Block (GIL released) until the event count moves from ``seen``: a run
        released with notify ended, or :meth:`notify`. False after ``timeout`` s."""
        return bool(lib.pc_vm_wait_event(self._vm, seen, int(timeout * 1e9)))

    @property
    def parked(self) -> bool:
        return lib.pc_vm_running(self._vm) == 0

    def results(self) -> list[int]:
        """Each vCPU's latest run result (negative: it refused to run)."""
        return [lib.pc_vm_result(self._vm, t) for t in range(self.threads)]

    def thread_ids(self) -> list[int]:
        """OS thread ids of the vCPU threads (stable for the life of the guest)."""
        return [lib.pc_vm_thread_id(self._vm, t) for t in range(self.threads)]

    @property
    def resumed_ns(self) -> int:
        return int(lib.pc_vm_resumed_ns(self._vm))

    @property
    def pause_requested_ns(self) -> int:
        return int(lib.pc_vm_pause_requested_ns(self._vm))

    @property
    def parked_ns(self) -> int:
        """When the last vCPU parked (CLOCK_MONOTONIC ns)."""
        return int(lib.pc_vm_parked_ns(self._vm))
