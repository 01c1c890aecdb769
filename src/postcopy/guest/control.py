"""The guest's control socket: both ends.

Protocol: a Unix SOCK_STREAM socket, one JSON object per line each way. A request is
``{"cmd": NAME, ...fields}``; a reply is ``{"ok": true, ...}`` or ``{"ok": false,
"error": "..."}``. The ``fds`` reply carries the guest's memfd and userfaultfd as
SCM_RIGHTS ancillary data on the reply line. Commands:

============ =============================================================================
status       state, pid, RAM geometry, threads, workload, steps, timing fields, uffd,
             dirty_tracking, free_fraction, free_pages, vcpu_thread_ids
pause        parks every vCPU at a step boundary, replies once all are parked; ``was``
             (the state before) and ``stop_at`` let a brief pauser resume what it stopped;
             ``pause_to_parked_ns`` and ``resume_to_first_step_ns`` time the guest's side
resume       lets the vCPUs run (an incoming guest then faults in its state page);
             optional ``{"stop_at": N}``: park again at step N
run_until    ``{"steps": N}``: resume, park when every vCPU has done exactly N steps
run          ``{"steps": N, "harvest": bool}``: one epoch: every vCPU does exactly N more
             steps and parks; with harvest the guest's dirty log is harvested at the park
             (``dirty_runs``, see :func:`postcopy.guest.dirtytrack.decode_runs`)
hash         64-bit RAM hash (heartbeats excluded, free pages as zero), paused or
             finished guests only
fds          memfd / uffd over SCM_RIGHTS plus RAM address, size, page size, pid, backing,
             uffd_features, uffd_minor (RAM also registered for minor faults) and
             staging_address / staging_pages (UFFDIO_MOVE staging area, or null / 0)
discard      ``{"ranges": [[offset, length], ...]}``: the ranges read as missing or zero
dirty_track  ``{"on": true}``: async write-protect dirty tracking of the RAM by a
             userfaultfd of the guest's own (for PAGEMAP_SCAN); ``{"on": false}`` ends it
free_ranges  ``{"ranges": [[offset, length], ...], "free_pages": N}``: pages free now
touch        ``{"pages": [i, ...]}`` or ``{"spread": {"first", "count", "n", "seed"}}``:
             write to pages without changing them (dirty-log tests and benchmarks)
max_step_gap longest gap between two steps of any vCPU since the previous call (ns)
throttle     ``{"percent": P}``, 0..99: each vCPU parks P% of its time (after every 10 ms
             of running it sleeps 10*P/(100-P) ms; auto-converge); 0 lifts it. Timing
             only: not in the state page, not hashed, not migrated (status: throttle_pct)
rate_cap     ``{"steps_per_s": R}``: each vCPU does at most R steps/s (with --rate the
             slower holds); 0 lifts it. Not a guest parameter (status: rate_cap)
kvm_dirty    KVM guests only: ``{"op": "start", "log": "kvm-bitmap|kvm-clear|kvm-ring"}``,
             ``{"op": "harvest"}`` (runs, pages, harvest_ms), ``{"op": "stop"}``
lease        exclusive lease for one migration agent: ``{"token": T}``; refused while
             another connection holds it or while a fence holds; it ends when its
             connection closes (or ``release``). When it ends, dirty tracking ends, and
             an incoming guest whose RAM has not all arrived stops (exit 1)
release      ``{"token": T}``: end the lease now
fence        ``{"token": T, "seconds": S}``: a destination may run this guest for S more
             seconds (only ever extended); ``{"token": T, "lift": true}``: it confirmed
             completion. While a fence holds, ``lease``, ``resume``, ``run_until`` and ``run`` are
             refused: the guest must not run, or move again, in two places
watchdog     ``{"token": T, "seconds": S}``: an incoming guest whose pages are still
             arriving stops itself (exit 1) unless this comes again within S seconds
             (its destination agent may be stopped or cut off: it must not run on)
quit         reply, then the guest exits 0 without printing its hash
============ =============================================================================

Connections are served one thread each, commands one at a time.
"""
from __future__ import annotations

import array
import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from postcopy.guest.lease import Lease
from postcopy.kernel.dirtylog import GuestLinkError

MAX_LINE = 1 << 20  # requests
MAX_REPLY = 64 << 20  # replies: free_ranges of a fragmented free set can be long
MAX_FDS = 8


class GuestError(GuestLinkError):
    """The guest refused a request (``ok`` false) or is gone."""


# ---- server ---------------------------------------------------------------------------


class ControlServer:
    """Serves a :class:`postcopy.guest.runtime.Guest` on a Unix socket (mode 0600)."""

    def __init__(self, path: str, guest, on_quit: Callable[[], None]):
        self.path = path
        self.guest = guest
        self.on_quit = on_quit
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        _remove_stale(path)
        old = os.umask(0o177)  # the socket file is born 0600
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._lease = Lease()
        self._watchdog: threading.Thread | None = None
        self._watchdog_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_lines(conn)
        finally:
            if self._lease.drop(conn):
                self._lease_ended()

    def _start_watchdog(self) -> None:
        with self._watchdog_lock:
            if self._watchdog is not None:
                return
            self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        """Stop an incoming guest whose agent stopped renewing the watchdog while its
        pages were still arriving."""
        while not self._lease.watchdog_expired():
            time.sleep(0.05)
        if self.guest.ram_arriving():
            self.guest.abandon("its destination agent did not renew the watchdog in time (stopped, or cut off "
                               "from the source): it must not run on")

    def _lease_ended(self) -> None:
        """The migration agent that held the lease is gone (or released it): what it
        started on the guest must not outlive it."""
        try:
            self.guest.dirty_track(False)
        except Exception as exc:
            print(f"guest: ending dirty tracking: {exc!r}", file=sys.stderr)
        if self.guest.ram_arriving():
            self.guest.abandon("its destination agent went away before every page arrived")

    def _serve_lines(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rfile:
            while True:
                line = rfile.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    _send(conn, {"ok": False, "error": "request line too long"})
                    return
                reply, fds, quitting = self._dispatch(line, conn)
                try:
                    _send(conn, reply, fds)
                except OSError:
                    return
                if quitting:
                    self.on_quit()
                    return

    def _dispatch(self, line: bytes, conn: socket.socket | None = None) -> tuple[dict, list[int], bool]:
        from postcopy.guest.params import GuestStateError

        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("want a JSON object with a string 'cmd'")
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}, [], False
        cmd, g = req["cmd"], self.guest
        try:
            fds: list[int] = []
            if cmd == "status":
                reply = {**g.status(), **self._lease.status()}
            elif cmd == "pause":
                reply = g.pause()
            elif cmd == "resume":
                stop_at = req.get("stop_at")
                if stop_at is not None and (not _is_count(stop_at)):
                    raise GuestStateError("resume wants a non-negative integer 'stop_at' (or none)")
                self._lease.check_unfenced("resume")
                reply = g.resume(stop_at=stop_at)
            elif cmd == "run_until":
                steps = req.get("steps")
                if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                    raise GuestStateError("run_until wants a non-negative integer 'steps'")
                self._lease.check_unfenced("run_until")
                reply = g.run_until(steps)
            elif cmd == "run":
                steps, harvest = req.get("steps"), req.get("harvest", False)
                if not _is_count(steps) or not isinstance(harvest, bool):
                    raise GuestStateError("run wants a non-negative integer 'steps' and a boolean 'harvest'")
                self._lease.check_unfenced("run")
                reply = g.run(steps, harvest=harvest)
            elif cmd in ("lease", "release", "fence", "watchdog"):
                reply = self._lease.command(cmd, req, conn)
                if cmd == "watchdog":
                    self._start_watchdog()
                if cmd == "release":
                    self._lease_ended()
            elif cmd == "throttle":
                reply = g.set_throttle(req.get("percent"))
            elif cmd == "rate_cap":
                reply = g.set_rate_cap(req.get("steps_per_s"))
            elif cmd == "hash":
                reply = {"hash": g.ram_hash()}
            elif cmd == "fds":
                reply, fds = g.fds()
            elif cmd == "discard":
                reply = g.discard(req.get("ranges"))
            elif cmd == "dirty_track":
                on = req.get("on")
                if not isinstance(on, bool):
                    raise GuestStateError("dirty_track wants a boolean 'on'")
                reply = g.dirty_track(on)
            elif cmd == "free_ranges":
                reply = g.free_ranges()
            elif cmd == "touch":
                reply = g.touch(pages=req.get("pages"), spread=req.get("spread"))
            elif cmd == "max_step_gap":
                reply = g.take_max_step_gap()
            elif cmd == "quit":
                return {"ok": True}, [], True
            elif cmd in getattr(g, "commands", {}):  # a guest kind's own (KvmGuest: kvm_dirty)
                reply = g.commands[cmd](req)
            else:
                raise GuestStateError(f"unknown command {cmd!r}")
        except GuestStateError as exc:
            return {"ok": False, "error": str(exc)}, [], False
        except Exception as exc:  # keep serving; the client gets the reason
            print(f"guest: {cmd} failed: {exc!r}", file=sys.stderr)
            return {"ok": False, "error": f"{cmd} failed: {exc}"}, [], False
        return {"ok": True, **reply}, fds, False


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse to steal a live one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return  # not a socket: bind() reports it
    finally:
        probe.close()
    raise OSError(f"control socket {path} is in use by another guest")


def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


# ---- client ---------------------------------------------------------------------------


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
            _send(self._sock, {"cmd": cmd, **fields})
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

    def pause(self) -> dict:
        return self.request("pause")

    def resume(self, stop_at: int | None = None) -> dict:
        """Let the vCPUs run; with ``stop_at`` they park again at that step."""
        return self.request("resume") if stop_at is None else self.request("resume", stop_at=stop_at)

    def run_until(self, steps: int) -> dict:
        """Resume a paused guest and wait until every vCPU has done exactly ``steps``."""
        return self.request("run_until", steps=steps)

    def run(self, steps: int, harvest: bool = False) -> dict:
        """One epoch: every vCPU does exactly ``steps`` more steps, then parks; with
        ``harvest`` the reply's ``dirty_runs`` holds the guest's dirty log."""
        return self.request("run", steps=steps, harvest=harvest)

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


def wait_for_control(path: str, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
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


# ---- launching ------------------------------------------------------------------------


# One set of defaults for every way of starting a guest (``postcopy guest``, ``postcopy
# demo``, GuestParams): the same flags give the same guest, and the same reference hash.
GUEST_DEFAULTS: dict = {"threads": 2, "workload": "random-write", "seed": 1, "rate": 0.0, "working_set": 1.0,
                        "free_fraction": 0.0, "backing": "memfd", "vm": "process"}


@dataclass(frozen=True)
class GuestParams:
    """Everything that determines a guest's final RAM (plus its backing)."""

    ram: int
    threads: int = GUEST_DEFAULTS["threads"]
    workload: str = GUEST_DEFAULTS["workload"]
    seed: int = GUEST_DEFAULTS["seed"]
    steps: int | None = None
    rate: float = GUEST_DEFAULTS["rate"]
    working_set: float = GUEST_DEFAULTS["working_set"]
    backing: str = GUEST_DEFAULTS["backing"]
    free_fraction: float = GUEST_DEFAULTS["free_fraction"]
    vm: str = GUEST_DEFAULTS["vm"]  # or "kvm": the same RAM and workload run by KVM vCPUs

    def reference_command(self) -> str:
        """The ``postcopy guest`` command line that runs this guest without migration
        to its reference hash (printed as ``final_hash``); every parameter is spelled
        out, so it does not depend on any default."""
        argv = dataclasses.replace(self, rate=0).argv()[4:]
        if not self.free_fraction:
            argv += ["--free-fraction", "0.0"]
        return shlex.join(["postcopy", "guest", *argv])

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def argv(self, *, control: str | None = None, incoming: bool = False, linger: bool = False,
             start_paused: bool = False, pause_at: int | None = None) -> list[str]:
        """Command line that starts this guest. An incoming guest gets only RAM size and
        backing: the rest comes with its state page."""
        argv = [sys.executable, "-m", "postcopy", "guest", "--ram", str(self.ram), "--backing", self.backing]
        if self.vm != "process":
            argv += ["--vm", self.vm]
        if incoming:
            argv.append("--incoming")
        else:
            argv += ["--threads", str(self.threads), "--workload", self.workload, "--seed", str(self.seed),
                     "--rate", repr(float(self.rate)), "--working-set", repr(float(self.working_set))]
            if self.free_fraction:
                argv += ["--free-fraction", repr(float(self.free_fraction))]
            if self.steps is not None:
                argv += ["--steps", str(self.steps)]
        if control:
            argv += ["--control", control]
        if linger:
            argv.append("--linger")
        if start_paused:
            argv.append("--start-paused")
        if pause_at is not None:
            argv += ["--pause-at", str(pause_at)]
        return argv


def parse_final_hash(stdout: str) -> str:
    """The hash from a guest's ``final_hash <16 hex>`` stdout line."""
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "final_hash" and len(parts[1]) == 16:
            return parts[1]
    raise GuestError(f"no final_hash line in guest output {stdout!r}")


def reference_hash(params: GuestParams, timeout: float | None = None) -> str:
    """Run the same guest without migration to completion and return its final hash.

    The rate limit is dropped (it is timing, not state, and is not hashed)."""
    if params.steps is None:
        raise ValueError("reference_hash needs a step target (steps)")
    proc = subprocess.run(dataclasses.replace(params, rate=0).argv(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise GuestError(f"reference guest exited {proc.returncode}: {proc.stderr.strip()}")
    return parse_final_hash(proc.stdout)
