"""Checkpoint epochs through a doorbell in shared memory (native/epoch_doorbell.c).

The control command ``doorbell`` starts a session on a paused guest with dirty tracking
on: the guest maps a small memfd, starts a C server thread on it and hands the memfd to
the caller (SCM_RIGHTS). From then on each epoch is a request in that memory: every vCPU
does N more steps and parks, the last one to park harvests the dirty log and answers
there, with no control line, JSON or Python on the guest's side. While a session lasts
the guest's state is ``checkpointing`` (``running`` with ``doorbell: true`` in
``status``); resume, run and run_until are refused. The session ends when the caller
rings STOP, when the connection that started it closes, when the guest reaches its step
target or a vCPU fails; then the guest is ``paused`` (or ``finished``) as after a ``run``.
"""
from __future__ import annotations

import mmap
import os
import threading
from typing import Callable

from postcopy._native import ffi, lib
from postcopy.guest.params import GuestStateError

STATES = {lib.PC_DB_PARKED: "paused", lib.PC_DB_FINISHED: "finished", lib.PC_DB_ENDED: "paused",
          lib.PC_DB_ERROR: "error"}
# Answers after which the server thread touches the vCPUs no more.
FINAL = (lib.PC_DB_FINISHED, lib.PC_DB_ENDED, lib.PC_DB_ERROR)


class Doorbell:
    """A doorbell memfd mapped in this process (either side)."""

    def __init__(self, fd: int, size: int | None = None):
        self.fd = fd
        self.size = os.fstat(fd).st_size if size is None else size
        self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = ffi.from_buffer(self._map)
        self.db = ffi.cast("struct pc_doorbell *", self._buf)
        if self.size < lib.pc_doorbell_bytes(0) or lib.pc_doorbell_bytes(self.db.runs_cap) > self.size:
            self.close()
            raise ValueError("not a doorbell: too small for the runs it claims to hold")

    def ring(self, cmd: int, steps: int = 0, harvest: bool = False) -> int:
        """Post a request; returns its number (see :meth:`wait`)."""
        return lib.pc_doorbell_ring(self.db, cmd, steps, harvest)

    def wait(self, req: int, timeout: float | None) -> bool:
        """Block (GIL released) until request ``req`` is answered; False after ``timeout`` s."""
        return bool(lib.pc_doorbell_wait(self.db, req, -1 if timeout is None else int(timeout * 1e9)))

    def close(self) -> None:
        self.db = None
        ffi.release(self._buf)
        self._map.close()
        os.close(self.fd)


class DoorbellServer:
    """The guest's side of a session: the memfd, the C server thread and a watcher
    thread that calls ``on_end`` once the server thread has ended."""

    def __init__(self, vm, locals_, threads: int, steps_target: int, address: int, size: int, runs_cap: int,
                 on_end: Callable[["DoorbellServer"], None]):
        nbytes = lib.pc_doorbell_bytes(runs_cap)
        fd = os.memfd_create("postcopy-doorbell", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            self.doorbell = Doorbell(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise
        self.doorbell.db.runs_cap = runs_cap
        self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        err = ffi.new("int *")
        self._server = lib.pc_doorbell_start(vm, self.doorbell.db, locals_, threads, steps_target, self._pagemap,
                                             address, size, err)
        if self._server == ffi.NULL:
            os.close(self._pagemap)
            self.doorbell.close()
            raise OSError(-err[0], f"cannot start the doorbell: {os.strerror(-err[0])}")
        self._on_end = on_end
        self._lock = threading.Lock()  # the mapping goes when the server thread has ended
        self._closed = False
        self._watcher = threading.Thread(target=self._watch, name="doorbell-watch", daemon=True)
        self._watcher.start()

    @property
    def fd(self) -> int:
        return self.doorbell.fd

    @property
    def ended(self) -> bool:
        """The server has given its last answer: the vCPUs are the guest's again."""
        with self._lock:
            return self._closed or self.doorbell.db.state in FINAL

    def stop(self) -> None:
        """End the session from the guest's side (its caller went away)."""
        with self._lock:
            if not self._closed:
                self.doorbell.ring(lib.PC_DB_STOP)

    def _watch(self) -> None:
        lib.pc_doorbell_join(self._server, -1)  # GIL released until the server ends
        with self._lock:
            self._closed = True
            os.close(self._pagemap)
            self.doorbell.close()
        self._on_end(self)


class DoorbellCommands:
    """The guest's doorbell commands, mixed into :class:`~postcopy.guest.runtime.Guest`
    (which provides the vCPUs, the locks, ``_check_paused`` and ``_settle``)."""

    def start_doorbell(self, runs_cap: int) -> tuple[dict, list[int]]:
        """Start a doorbell session (:mod:`postcopy.guest.doorbell`) on this paused,
        dirty-tracked guest; returns the reply and the doorbell memfd to send with it.
        ``runs_cap``: the most dirty runs one epoch may report."""
        if not isinstance(runs_cap, int) or isinstance(runs_cap, bool) or not 1 <= runs_cap <= 1 << 24:
            raise GuestStateError("doorbell wants an integer 'runs_cap' 1..16777216")
        with self._op, self._cond:
            if self._dirty is None:
                raise GuestStateError("doorbell needs dirty tracking on (dirty_track)")
            self._check_paused("doorbell")
            for p in self._local_ptrs:
                p.first_step_ns = 0
            self._doorbell = DoorbellServer(self._vcpus.vm, self._locals, self.threads, self.steps_target or 0,
                                            self.address, self.ram_size, runs_cap, self._doorbell_ended)
            self._state = "checkpointing"
            return ({"doorbell_bytes": self._doorbell.doorbell.size, "runs_cap": runs_cap, "threads": self.threads},
                    [self._doorbell.fd])

    def stop_doorbell(self) -> None:
        """End the doorbell session, if one runs (its caller went away)."""
        with self._cond:
            server = self._doorbell
        if server is not None:
            server.stop()

    def _doorbell_ended(self, server: DoorbellServer) -> None:
        """The doorbell's server thread ended: the guest is parked (or finished)."""
        with self._cond:
            if self._doorbell is server:
                self._settle()
