"""The source's half of "a guest runs in exactly one place" after the switchover.

Once the guest's state went to a destination, that destination may run it until it
gives up on the source (its recovery timeout). The source guest keeps a fence (see
the ``fence`` command in :mod:`postcopy.guest.control`): while it holds, the guest
refuses ``resume``, ``run_until`` and a new ``lease``, so nobody can run it here or
migrate it again. :func:`fence_keeper` keeps the fence ahead of the destination:

* the Switchover tells the destination the source's recovery timeout R; it gives up
  (and stops its guest) at most R after it noticed the link break, R being the smaller
  of its own timeout and ours;
* a link break is noticed within ``LINK_TIMEOUT_S + 1`` s on either side (TCP user
  timeout, keepalive after 1 s idle: :func:`postcopy.protocol.channel.tune`);
* the keeper extends the fence to ``now + R + FENCE_MARGIN_S + FENCE_PERIOD_S`` every
  FENCE_PERIOD_S while the source is in contact, and once more before every reconnect
  attempt; it stops when the source notices the break or dies.

So the fence ends at least ``R + FENCE_MARGIN_S`` after the source last knew the link
was up (t), and the destination gives up at most ``R + LINK_TIMEOUT_S + 1`` s after t.
An agent can also be stopped (SIGSTOP) or starved rather than dead: so the incoming
guest has a watchdog (:func:`watchdog_keeper`) that its agent renews the same way, for
``R + WATCHDOG_SLACK_S``, only while in contact; the guest stops itself when it lapses.
The agent stops renewing at most ``LINK_TIMEOUT_S + 1`` s after t, so its guest stops
by ``t + LINK_TIMEOUT_S + 1 + R + WATCHDOG_SLACK_S``, which FENCE_MARGIN_S exceeds.

The watchdog is armed as soon as the destination holds its incoming guest, before any
frame can carry the Switchover, with R = 0 (it does not know the source's R yet; 0 is
the smallest, so the bound holds whatever the source's is), and widened to the agreed R
when the Switchover is acted on, in the resume request itself (the guest renews it,
then resumes; a watchdog that lapsed already is not renewed, and the guest does not
resume). So an agent stopped between reading the Switchover and acting on it cannot
wake after the fence ended and run its guest: the guest stopped itself meanwhile, and
the agent's resume fails.

The source sets its fence in the pause request itself (the guest sets it, then parks):
before the state leaves, so before any Switchover, as the rule wants, and with no round
trip of its own inside the downtime. Arming it earlier only makes it end earlier by as
much, which the renewals every FENCE_PERIOD_S (counted in the fence's length) cover. A
migration that fails before the Switchover was sent lifts it again (nobody else can
run the guest), so the guest goes on running on the source.
"""
from __future__ import annotations

import threading
import time

from postcopy.guest.control import GuestClient, GuestError
from postcopy.protocol.channel import LINK_TIMEOUT_S

FENCE_PERIOD_S = 1.0
WATCHDOG_SLACK_S = 2 * FENCE_PERIOD_S  # the incoming guest outlives its agent's own give-up
# Detection, the watchdog's slack, and time for the guest to stop.
FENCE_MARGIN_S = LINK_TIMEOUT_S + 1 + WATCHDOG_SLACK_S + 2.0


class LeaseKeeper:
    """Renews a promise on a guest (``fence`` or ``watchdog``) every FENCE_PERIOD_S
    while its agent is in contact with the other agent. Has its own control connection
    (the agent's main one is not thread safe); the lease token authorises it."""

    def __init__(self, control: str, token: str, command: str, seconds: float, in_contact):
        self._client = GuestClient(control)
        self._token = token
        self._command = command
        self._seconds = seconds
        self._in_contact = in_contact  # () -> bool: the agent believes the link is up
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._armed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fence", daemon=True)
        self._thread.start()  # now: its start is a few GIL handoffs, not downtime

    def arm(self, seconds: float | None = None) -> None:
        """Set the promise now (for ``seconds``, if given, instead of the keeper's, and
        at each renewal from then on) and keep it fresh; again to widen or narrow it.
        The keeper connects (and starts its thread) when made: made ahead, arming it is
        one request (it may happen within the migration's downtime)."""
        if seconds is not None:
            with self._lock:
                self._seconds = seconds
        self.refresh()
        self._armed.set()

    def arm_with(self, request, seconds: float | None = None):
        """:meth:`arm` inside another request to the same guest, which carries the
        promise (one round trip for both, inside a switchover's downtime): the source's
        pause sets its fence, the destination's resume renews its watchdog. Calls
        ``request(promise)`` with ``promise = {"token", "seconds"}`` and returns its
        reply; renewals wait meanwhile, so none goes out with the old seconds after it."""
        with self._lock:
            if seconds is not None:
                self._seconds = seconds
            reply = request({"token": self._token, "seconds": self._seconds})
        self._armed.set()
        return reply

    def refresh(self) -> None:
        with self._lock:
            self._client.request(self._command, token=self._token, seconds=self._seconds)

    def remaining(self) -> float | None:
        """Seconds the fence still holds (None if the guest cannot be asked)."""
        try:
            with self._lock:
                return self._client.status()["fence_remaining_s"]
        except GuestError:
            return None

    def lift(self) -> None:
        """End the fence now (a migration that failed before its Switchover), on a
        connection of its own (the keeper's may be closed)."""
        with GuestClient(self._client.path) as client:
            client.request(self._command, token=self._token, lift=True)

    def close(self) -> None:
        self._stop.set()
        self._armed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._client.close()

    def _run(self) -> None:
        self._armed.wait()
        while not self._stop.wait(FENCE_PERIOD_S):
            if not self._in_contact():
                continue
            try:
                self.refresh()
            except GuestError:
                return  # the guest is gone: nothing left to fence


def fence_keeper(control: str, token: str, recovery_timeout: float, in_contact) -> LeaseKeeper:
    """Source: the paused guest must not run or move while the destination may run it."""
    seconds = max(0.0, recovery_timeout) + FENCE_MARGIN_S + FENCE_PERIOD_S
    return LeaseKeeper(control, token, "fence", seconds, in_contact)


def watchdog_seconds(recovery_timeout: float) -> float:
    """How long the incoming guest may go unrenewed for a recovery timeout R."""
    return max(0.0, recovery_timeout) + WATCHDOG_SLACK_S


def watchdog_keeper(control: str, token: str, recovery_timeout: float, in_contact) -> LeaseKeeper:
    """Destination: the incoming guest stops by itself if this agent stops renewing."""
    return LeaseKeeper(control, token, "watchdog", watchdog_seconds(recovery_timeout), in_contact)


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
