"""The source's half of "a guest runs in exactly one place" after the switchover.

Once the guest's state went to a destination, that destination may run it until it
gives up on the source (its recovery timeout). The source guest keeps a fence (see
the ``fence`` command in :mod:`postcopy.guest.control`): while it holds, the guest
refuses ``resume``, ``run_until`` and a new ``lease``, so nobody can run it here or
migrate it again. :class:`FenceKeeper` keeps the fence ahead of the destination:

* the Switchover tells the destination the source's recovery timeout R; it gives up
  (and stops its guest) at most R after it noticed the link break, R being the smaller
  of its own timeout and ours;
* a link break is noticed within ``LINK_TIMEOUT_S + 1`` s on either side (TCP user
  timeout, keepalive after 1 s idle: :func:`postcopy.protocol.channel.tune`);
* the keeper extends the fence to ``now + R + FENCE_MARGIN_S + FENCE_PERIOD_S`` every
  FENCE_PERIOD_S while the source is in contact, and once more before every reconnect
  attempt; it stops when the source notices the break or dies.

So the fence ends at least ``R + FENCE_MARGIN_S`` after the source last knew the link
was up, and the destination gives up at most ``R + LINK_TIMEOUT_S + 1`` s after that
moment: the margin covers detection, one refresh period and the destination's stop.
"""
from __future__ import annotations

import threading
import time

from postcopy.guest.control import GuestClient, GuestError
from postcopy.protocol.channel import LINK_TIMEOUT_S

FENCE_PERIOD_S = 1.0
FENCE_MARGIN_S = LINK_TIMEOUT_S + 1 + FENCE_PERIOD_S + 2.0  # detection, a period, slack for the stop


class FenceKeeper:
    """Keeps the source guest's fence ahead of the destination's give-up. Has its own
    control connection (the agent's main one is not thread safe); the lease token
    authorises it."""

    def __init__(self, control: str, token: str, recovery_timeout: float, in_contact):
        self._client = GuestClient(control)
        self._token = token
        self._seconds = max(0.0, recovery_timeout) + FENCE_MARGIN_S + FENCE_PERIOD_S
        self._in_contact = in_contact  # () -> bool: the source believes the link is up
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fence", daemon=True)

    def arm(self) -> None:
        """Set the fence (before the Switchover goes out) and keep it fresh."""
        self.refresh()
        self._thread.start()

    def refresh(self) -> None:
        with self._lock:
            self._client.fence(self._token, self._seconds)

    def remaining(self) -> float | None:
        """Seconds the fence still holds (None if the guest cannot be asked)."""
        try:
            with self._lock:
                return self._client.status()["fence_remaining_s"]
        except GuestError:
            return None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(FENCE_PERIOD_S):
            if not self._in_contact():
                continue
            try:
                self.refresh()
            except GuestError:
                return  # the guest is gone: nothing left to fence


def fence_note(remaining: float | None) -> str:
    """Plain words on when the paused source guest may run or move again."""
    if remaining is None:
        return "Whether a destination may still run it is unknown: do not resume or migrate it."
    if remaining <= 0:
        return "No destination can run it any more: `postcopy source` can migrate it to a new destination."
    until = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + remaining))
    return (f"The destination may still be running it for up to {remaining:.0f} s more (until {until}: its "
            f"recovery timeout plus a margin); until then the guest refuses to be resumed or migrated again. "
            f"After that, `postcopy source` can migrate it to a new destination.")
