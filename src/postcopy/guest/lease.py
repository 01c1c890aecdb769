"""The guest's migration lease and fence, kept by its control server (see the
``lease``, ``release``, ``fence`` and ``watchdog`` commands in
:mod:`postcopy.guest.control`)."""
from __future__ import annotations

import secrets
import socket
import struct
import threading
import time


class Lease:
    """Who may migrate the guest, and until when a destination may run it.

    One connection at a time holds the lease (a second migration agent is refused).
    After a switchover the agent sets a fence: a destination may run this guest until
    then, so it must neither run here nor be migrated again before (a second copy).
    The fence outlives the lease (the agent may die); it is lifted only when the
    destination confirmed, or when its time has passed. On an incoming guest the
    holder (its destination agent) renews a watchdog instead: see ``watchdog_expired``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holder: socket.socket | None = None
        self._holder_pid: int | None = None
        self._token: str | None = None
        self._fence_until = 0.0  # time.monotonic() until which a destination may run the guest
        self._watchdog_until: float | None = None  # incoming: time.monotonic() by which the agent must renew

    def fence_left(self) -> float:
        return max(0.0, self._fence_until - time.monotonic())

    def status(self) -> dict:
        with self._lock:
            watchdog = self._watchdog_until
            return {"lease_pid": self._holder_pid if self._holder is not None else None,
                    "fence_remaining_s": round(self.fence_left(), 3),
                    "watchdog_remaining_s": None if watchdog is None else round(max(0.0, watchdog - time.monotonic()), 3)}

    def check_unfenced(self, what: str) -> None:
        """Refuse ``what`` while a destination may still run this guest."""
        from postcopy.guest.params import GuestStateError

        left = self.fence_left()
        if left > 0:
            until = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + left))
            raise GuestStateError(
                f"{what} refused: this guest was switched over to a destination that may still be running it "
                f"for another {left:.1f} s (until {until}: its recovery timeout plus a margin); running or "
                f"migrating it here before then could run it twice. Retry after {until}.")

    def command(self, cmd: str, req: dict, conn: socket.socket | None) -> dict:
        from postcopy.guest.params import GuestStateError

        with self._lock:
            if cmd == "lease":
                if self._holder is not None and self._holder is not conn:
                    raise GuestStateError(f"the guest is already being migrated or checkpointed (its lease is "
                                          f"held by pid {self._holder_pid}): one agent at a time")
                self.check_unfenced("lease")
                if self._holder is None:
                    self._holder, self._holder_pid = conn, _peer_pid(conn)
                    self._token = secrets.token_hex(16)
                return {"token": self._token}
            if self._token is None or req.get("token") != self._token:
                raise GuestStateError(f"{cmd} needs the token of the current lease")
            if cmd == "release":
                self._holder = self._holder_pid = self._token = None
                return {"released": True}
            if cmd == "fence" and req.get("lift") is True:
                self._fence_until = 0.0
                return {"fence_remaining_s": 0.0}
            seconds = req.get("seconds")
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < 1e6:
                raise GuestStateError(f"{cmd} wants 'seconds' in [0, 1e6)" + (" or 'lift': true" if cmd == "fence"
                                                                              else ""))
            if cmd == "watchdog":
                if self.watchdog_expired():  # the guest stops (or stopped): too late to renew
                    raise GuestStateError("watchdog refused: it lapsed already (the agent was stopped or cut off "
                                          "too long); this incoming guest must not run on")
                self._watchdog_until = time.monotonic() + seconds
                return {"watchdog_s": seconds}
            self._fence_until = max(self._fence_until, time.monotonic() + seconds)
            return {"fence_remaining_s": round(self.fence_left(), 3)}

    def watchdog_expired(self) -> bool:
        until = self._watchdog_until
        return until is not None and time.monotonic() > until

    def drop(self, conn: socket.socket) -> bool:
        """``conn`` closed: end its lease if it held one. Returns whether it did."""
        with self._lock:
            if self._holder is not conn:
                return False
            self._holder = self._holder_pid = self._token = None
            return True


def _peer_pid(conn: socket.socket | None) -> int | None:
    if conn is None:
        return None
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", creds)[0]
