"""The client end of a guest's control socket (protocol: :mod:`postcopy.guest.control`).
Loads no native code: agents and tests use it without the guest machine."""
from __future__ import annotations

import array
import json
import os
import select
import socket
import subprocess
import time

from postcopy.guest.controlwire import MAX_FDS, MAX_REPLY, GuestError, send_line


class GuestClient:
    """Client of a guest's control socket. Context manager; not thread safe."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self._buf = b""
        self._fds: list[int] = []
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            self._sock = None
            raise GuestError(f"cannot reach guest control socket {path}: {exc.strerror or exc}") from None

    def __enter__(self) -> "GuestClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _roundtrip(self, cmd: str, fields: dict) -> tuple[dict, list[int]]:
        if self._sock is None:
            raise GuestError(f"guest control connection {self.path} is closed")
        try:
            send_line(self._sock, {"cmd": cmd, **fields})
            line, fds = self._read_line()
        except (OSError, ValueError) as exc:
            self.close()  # a late reply would desynchronise the stream
            what = "no reply within the timeout" if isinstance(exc, TimeoutError) else exc
            raise GuestError(f"guest {self.path}: {cmd}: {what}") from None
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self.close()
            raise GuestError(f"{self.path} answered {cmd!r} with something other than a JSON object: "
                             f"not a postcopy guest's control socket")
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise GuestError(f"guest {cmd}: {reply.get('error', 'failed')}")
        return reply, fds

    def _read_line(self) -> tuple[bytes, list[int]]:
        chunks = [self._buf]  # joined once: long replies arrive in many pieces
        size, newline = len(self._buf), b"\n" in self._buf
        while not newline:
            fds = array.array("i")
            data, anc, flags, _ = self._sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise OSError("file descriptors truncated (too many)")
            if not data:
                raise ConnectionError("guest closed the connection")
            chunks.append(data)
            size += len(data)
            newline = b"\n" in data
            if size > MAX_REPLY and not newline:
                raise ValueError("reply line too long")
        line, self._buf = b"".join(chunks).split(b"\n", 1)
        fds, self._fds = self._fds, []
        return line, fds

    def another(self) -> "GuestClient":
        """A new connection to the same guest (a client is not shared between threads)."""
        return GuestClient(self.path)

    def request(self, cmd: str, **fields) -> dict:
        """Send one command; returns the reply. Raises GuestError if ok is false or the
        guest is gone. Descriptors that come with the reply are closed."""
        reply, fds = self._roundtrip(cmd, fields)
        for fd in fds:
            os.close(fd)
        return reply

    def status(self) -> dict:
        return self.request("status")

    def pause(self, fence: dict | None = None) -> dict:
        """Park the vCPUs; with ``fence`` (``{"token", "seconds"}``) the fence is set
        first, in the same round trip (see the ``fence`` command)."""
        return self.request("pause") if fence is None else self.request("pause", fence=fence)

    def resume(self, stop_at: int | None = None, watchdog: dict | None = None) -> dict:
        """Let the vCPUs run; with ``stop_at`` they park again at that step; with
        ``watchdog`` (``{"token", "seconds"}``) the watchdog is renewed first, in the
        same round trip (see the ``watchdog`` command)."""
        fields = {k: v for k, v in (("stop_at", stop_at), ("watchdog", watchdog)) if v is not None}
        return self.request("resume", **fields)

    def run_until(self, steps: int) -> dict:
        """Resume a paused guest and wait until every vCPU has done exactly ``steps``."""
        return self.request("run_until", steps=steps)

    def run(self, steps: int, harvest: bool = False) -> dict:
        """One epoch: every vCPU does exactly ``steps`` more steps, then parks; with
        ``harvest`` the reply's ``dirty_runs`` holds the guest's dirty log."""
        return self.request("run", steps=steps, harvest=harvest)

    def peer_gone(self) -> bool:
        """With no request outstanding: whether the guest closed this connection (it
        died or quit). Never blocks."""
        if self._sock is None:
            return True
        return bool(select.select([self._sock], [], [], 0)[0])

    def doorbell(self, runs_cap: int) -> tuple[dict, int]:
        """Start a checkpoint doorbell session (:mod:`postcopy.guest.doorbell`): the
        reply and the doorbell memfd. The session lasts as long as this connection."""
        reply, fds = self._roundtrip("doorbell", {"runs_cap": runs_cap})
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise GuestError(f"guest sent {len(fds)} descriptors for its doorbell")
        return reply, fds[0]

    def hash(self) -> str:
        return self.request("hash")["hash"]

    def take_fds(self, incoming: bool = False) -> tuple[dict, dict[str, int]]:
        """The ``fds`` reply and the received descriptors by name ("memfd", "uffd");
        the caller owns (and must close) them. Only a destination (``incoming=True``)
        may take those of an incoming guest: its userfaultfd is its destination's."""
        if not incoming and self.status().get("state") == "incoming":
            raise GuestError(f"{self.path} belongs to an incoming guest waiting for its RAM (a destination's): "
                             f"it cannot be migrated from here")
        reply, fds = self._roundtrip("fds", {})
        if len(fds) != len(reply["fds"]):
            for fd in fds:
                os.close(fd)
            raise GuestError(f"guest sent {len(fds)} descriptors for {reply['fds']}")
        return reply, dict(zip(reply["fds"], fds))

    def discard(self, ranges: list[tuple[int, int]]) -> dict:
        return self.request("discard", ranges=[[int(o), int(n)] for o, n in ranges])

    def dirty_track(self, on: bool) -> dict:
        """Turn the guest's async write-protect dirty tracking on or off."""
        return self.request("dirty_track", on=bool(on))

    def free_ranges(self) -> list[tuple[int, int]]:
        """Byte ranges ``(offset, length)`` of the pages free right now (a snapshot)."""
        return [(o, n) for o, n in self.request("free_ranges")["ranges"]]

    def touch(self, pages: list[int]) -> int:
        """Write to these pages (by index) without changing them."""
        return self.request("touch", pages=[int(p) for p in pages])["touched"]

    def touch_spread(self, first: int, count: int, n: int, seed: int = 0) -> int:
        """Write to n distinct pseudo-random pages of [first, first + count)."""
        return self.request("touch", spread={"first": first, "count": count, "n": n, "seed": seed})["touched"]

    def max_step_gap_ns(self) -> int:
        """Longest gap between two steps of any vCPU since the previous call."""
        return self.request("max_step_gap")["max_gap_ns"]

    def lease(self) -> str:
        """Take the guest's exclusive migration lease (held while this connection
        stays open); returns its token. Raises GuestError if another agent holds it or
        a fence holds."""
        return self.request("lease")["token"]

    def fence(self, token: str, seconds: float | None = None, *, lift: bool = False) -> float:
        """Extend the fence (a destination may run the guest ``seconds`` more), or
        lift it; returns the seconds left."""
        fields = {"token": token, "lift": True} if lift else {"token": token, "seconds": float(seconds)}
        return self.request("fence", **fields)["fence_remaining_s"]

    def watchdog(self, token: str, seconds: float) -> None:
        """Incoming guest: stop by itself unless renewed within ``seconds``."""
        self.request("watchdog", token=token, seconds=float(seconds))

    def quit(self) -> None:
        """Ask the guest to exit (0, no hash printed)."""
        self.request("quit")
        self.close()


# How long a starting guest may take before its control socket answers: Python alone
# took 47 s to start inside an emulated (TCG) kernel of the kernel matrix; a guest that
# exits is reported at once, so only a hung start waits this long.
GUEST_START_TIMEOUT_S = 300.0


def wait_for_control(path: str, timeout: float = GUEST_START_TIMEOUT_S, proc: subprocess.Popen | None = None) -> None:
    """Wait until the guest's control socket answers ``status``. If ``proc`` (the
    guest) exits first, raise GuestError at once with its exit code and stderr."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            err = ""
            if proc.stderr is not None:
                err = proc.stderr.read()
                err = err.decode(errors="replace") if isinstance(err, bytes) else err
            raise GuestError(f"guest exited with status {proc.returncode} before its control socket "
                             f"answered: {err.strip() or '(no stderr)'}")
        try:
            with GuestClient(path, timeout=max(0.1, deadline - time.monotonic())) as client:
                client.status()
            return
        except GuestError:
            if time.monotonic() >= deadline:
                raise GuestError(f"guest control socket {path} did not answer within {timeout} s") from None
        time.sleep(0.02)
