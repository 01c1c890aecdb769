"""Letting the parked guest run one epoch, over a second control connection whose
request and reply are split (so the primary works while the guest runs)."""
from __future__ import annotations

import json
import select
import socket
import time
from typing import Callable

from postcopy.guest.control import GuestClient, GuestError


class ControlLine:
    """The guest's control protocol (one JSON object per line each way, see
    :mod:`postcopy.guest.control`) with request and reply split, so the agent can send
    the previous epoch while the guest runs the next one."""

    def __init__(self, path: str, timeout: float = 60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise GuestError(f"cannot reach guest control socket {path}: {exc.strerror or exc}") from None
        self.rfile = self.sock.makefile("rb")
        self.path = path

    def send(self, cmd: str, **fields) -> None:
        try:
            self.sock.sendall((json.dumps({"cmd": cmd, **fields}, separators=(",", ":")) + "\n").encode())
        except OSError as exc:
            raise GuestError(f"guest {self.path}: {cmd}: {exc}") from None

    def reply(self, cmd: str) -> dict:
        try:
            line = self.rfile.readline()
        except OSError as exc:
            raise GuestError(f"guest {self.path}: {cmd}: {exc}") from None
        if not line:
            raise GuestError(f"guest {self.path}: {cmd}: the guest closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise GuestError(f"guest {cmd}: {reply.get('error', 'failed')}")
        return reply

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


class EpochRunner:
    """Lets the parked guest run one epoch: :meth:`start` sends ``run`` and returns
    at once, :meth:`wait` returns its reply, which comes only once every vCPU is parked
    again, so nothing is harvested while the guest runs.

    With an interval, :meth:`wait` pauses the guest (from the main control connection)
    when the interval is over before the step budget; the run reply follows."""

    def __init__(self, control: str, client: GuestClient, interval_ms: float | None):
        self.client = client
        self.interval = None if interval_ms is None else interval_ms / 1e3
        self.interval_pauses = 0
        self.line = ControlLine(control)
        self.pending = False  # a run awaits its reply
        self._started = 0.0

    def start(self, steps: int, harvest: bool) -> None:
        """Every vCPU does exactly ``steps`` more steps and parks; with ``harvest`` the
        guest harvests its dirty log at the park, into the reply."""
        self._started = time.monotonic()
        self.line.send("run", steps=steps, harvest=harvest)
        self.pending = True

    def wait(self, heartbeat: Callable[[], None], every: float) -> dict:
        """The run reply; ``heartbeat`` is called every ``every`` seconds while the
        guest runs (a long epoch must not look like a dead primary to the standby)."""
        sock = self.line.sock
        interval_end = None if self.interval is None else self._started + self.interval
        beat = self._started + every
        # One request is outstanding and every reply was read whole: the socket turns
        # readable exactly when this one's reply arrives.
        while True:
            now = time.monotonic()
            until = beat if interval_end is None else min(beat, interval_end)
            if select.select([sock], [], [], max(0.0, until - now))[0]:
                break
            now = time.monotonic()
            if interval_end is not None and now >= interval_end:
                self.client.pause()  # the interval ended first: the run reply follows
                self.interval_pauses += 1
                interval_end = None
            if now >= beat:
                heartbeat()
                beat = now + every
        reply = self.line.reply("run")
        self.pending = False
        return reply

    def settle(self) -> None:
        """After a failure between start and wait: park the guest and take the reply."""
        if self.pending:
            self.pending = False
            try:
                self.client.pause()
                self.line.reply("run")
            except (GuestError, ValueError):
                pass

    def end(self) -> None:
        """Nothing to end: each epoch is a request of its own."""

    def close(self) -> None:
        self.line.close()
