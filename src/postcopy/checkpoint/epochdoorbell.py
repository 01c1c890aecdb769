"""Letting the parked guest run one epoch through its doorbell (shared memory, see
:mod:`postcopy.guest.doorbell`): the request is a store and a futex wake, the answer (the
steps, the park time and the harvested dirty runs) is read from the same memory, so an
epoch needs no control request, JSON or Python in the guest. Same interface as
:class:`postcopy.checkpoint.epochrun.EpochRunner`, used with the pagemap-scan log when
no interval ends the epochs."""
from __future__ import annotations

import time
from array import array
from typing import Callable

from postcopy._native import ffi, lib
from postcopy.guest.control import GuestClient, GuestError
from postcopy.guest.doorbell import FINAL, STATES, Doorbell

# The answer is waited for in slices this long; between them the control connection
# tells whether the guest is still there (a killed guest never answers).
_SLICE = 0.02


class DoorbellRunner:
    """Epochs through the guest's doorbell. The session starts at the first
    :meth:`start` (the guest is parked then) on a connection of its own, and ends with
    :meth:`end` (or that connection)."""

    interval_pauses = 0  # no interval: that needs a pause from outside (EpochRunner)

    def __init__(self, client: GuestClient, runs_cap: int):
        self._client = client.another()
        self._runs_cap = runs_cap
        self._doorbell: Doorbell | None = None
        self._req = 0
        self._threads = 0
        self._over = False
        self.pending = False
        self._started = 0.0

    def start(self, steps: int, harvest: bool) -> None:
        """Every vCPU does exactly ``steps`` more steps and parks; with ``harvest`` the
        guest harvests its dirty log at the park."""
        if self._doorbell is None:
            reply, fd = self._client.doorbell(self._runs_cap)
            self._threads = reply["threads"]
            try:
                self._doorbell = Doorbell(fd)
            except (OSError, ValueError) as exc:
                raise GuestError(f"the guest's doorbell is unusable: {exc}") from None
        self._started = time.monotonic()
        self._req = self._doorbell.ring(lib.PC_DB_RUN, steps, harvest)
        self.pending = True

    def wait(self, heartbeat: Callable[[], None], every: float) -> dict:
        """The epoch's answer (state, steps, paused_ns, harvest_ns, runs: flat u64
        pairs); ``heartbeat`` is called every ``every`` seconds while the guest runs."""
        beat = self._started + every
        while not self._doorbell.wait(self._req, _SLICE):
            self._check_alive()
            if time.monotonic() >= beat:
                heartbeat()
                beat = time.monotonic() + every
        self.pending = False
        db = self._doorbell.db
        self._over = db.state in FINAL  # the guest's server has ended the session
        if db.state == lib.PC_DB_ERROR:
            raise GuestError(f"the guest's doorbell failed: error {db.error}")
        runs = None
        if db.harvest:
            runs = array("Q")
            runs.frombytes(ffi.buffer(db.runs, 16 * db.nruns))  # copied: the next epoch reuses the memory
        return {"state": STATES.get(db.state, "paused"), "steps": [db.steps_done[t] for t in range(self._threads)],
                "paused_ns": db.paused_ns, "harvest_ns": db.harvest_ns if db.harvest else 0, "runs": runs}

    def _check_alive(self) -> None:
        """Raise GuestError if the guest closed the control connection (it died)."""
        if self._client.peer_gone():
            raise GuestError("the guest went away during an epoch")

    check_alive = _check_alive

    # -- lending the session to the native epoch loop (native/ckpt_primary.c) ----------
    @property
    def native(self):
        """The doorbell (``struct pc_doorbell *``) and the request under way (0: none),
        for the native epoch loop; hand them back with :meth:`adopt`."""
        return self._doorbell.db, self._req if self.pending else 0

    @property
    def runs_cap(self) -> int:
        return self._runs_cap

    def adopt(self, req: int, final_state: int) -> None:
        """The native loop's request under way (0: none) and the last answer's state."""
        self._req, self.pending = (req, True) if req else (self._req, False)
        self._over = final_state in FINAL

    def settle(self) -> None:
        """After a failure between start and wait: take the answer if it comes soon."""
        if self.pending and self._doorbell is not None:
            self.pending = False
            self._doorbell.wait(self._req, 2.0)

    def end(self) -> None:
        """End the session (the guest is left parked); idempotent, never raises."""
        if self._doorbell is not None:
            self.settle()
            if not self._over:
                req = self._doorbell.ring(lib.PC_DB_STOP)
                if not self._client.peer_gone():  # a dead guest never answers
                    self._doorbell.wait(req, 2.0)
            self._doorbell.close()
            self._doorbell = None
        self._client.close()

    def close(self) -> None:
        self.end()
