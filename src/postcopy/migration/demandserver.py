"""The source's demand server thread: it answers the destination's page requests on
the urgent channel (in C, see :meth:`postcopy.migration.sender.PageSender.serve_urgent`).

The first one is made before the pause and released right after the Switchover: it
takes its real-time priority while made, so once released it preempts whatever runs;
a thread made at the switchover would first wait for a CPU as an ordinary one, and the
destination guest's first faults (inside the downtime) with it."""
from __future__ import annotations

import threading
import time

from postcopy.kernel.priority import make_current_thread_urgent

SERVER_START_S = 1.0  # how long to wait for the server to reach its C loop


class DemandServer:
    """One demand server thread of ``sender`` on the channel ``urgent()`` returns."""

    def __init__(self, sender, urgent, *, held: bool):
        """Start the thread; ``held``: it waits for :meth:`release` (or :meth:`abandon`)."""
        self._sender, self._urgent = sender, urgent
        self._go = threading.Event()
        self._serve = False
        if not held:
            self._serve = True
            self._go.set()
        sender.serving.clear()
        self.thread = threading.Thread(target=self._run, name="urgent-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        make_current_thread_urgent()
        self._go.wait()
        if self._serve:
            self._sender.serve_urgent(self._urgent())

    def release(self) -> None:
        """Serve from now on (the Switchover went out)."""
        self._serve = True
        self._go.set()

    def abandon(self) -> None:
        """No Switchover went out: a held thread returns without serving."""
        self._go.set()

    def wait_serving(self, marks: dict[str, int]) -> None:
        """Until the server is in its C loop: Python work right after (the pusher's
        planning, events) must not keep it from there (the GIL's 5 ms switch interval).
        Notes when it started and got there in ``marks`` (the downtime's breakdown)."""
        sender = self._sender
        sender.serving.wait(SERVER_START_S)
        marks.setdefault("server_thread", sender.server_started_ns)
        marks.setdefault("server_ready", sender.serving.at_ns or time.monotonic_ns())

    def join(self, timeout: float) -> None:
        self.thread.join(timeout=timeout)
