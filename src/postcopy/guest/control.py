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
             ``pause_to_parked_ns`` and ``resume_to_first_step_ns`` time the guest's side;
             optional ``{"fence": {"token": T, "seconds": S}}``: set the fence first (one
             round trip for both: a switchover's downtime holds no extra request)
resume       lets the vCPUs run (an incoming guest then faults in its state page);
             optional ``{"stop_at": N}``: park again at step N; optional ``{"watchdog":
             {"token": T, "seconds": S}}``: renew the watchdog first (refused, and no
             resume, if it lapsed already)
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
doorbell     ``{"runs_cap": N}``: start a checkpoint doorbell session on a paused,
             dirty-tracked guest (epochs through shared memory, the memfd over
             SCM_RIGHTS; see :mod:`postcopy.guest.doorbell`); it ends with its connection
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

import json
import os
import socket
import sys
import threading
import time
from typing import Callable

from postcopy.guest.client import GuestClient, wait_for_control
from postcopy.guest.controlwire import MAX_LINE, GuestError, send_line
from postcopy.guest.launch import GUEST_DEFAULTS, GuestParams, parse_final_hash, reference_hash
from postcopy.guest.lease import Lease

# Both ends of the socket stay importable from here, where its protocol is described.
__all__ = ["GUEST_DEFAULTS", "ControlServer", "GuestClient", "GuestError", "GuestParams", "parse_final_hash",
           "reference_hash", "wait_for_control"]


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
        self._doorbell_conns: set = set()  # connections that started a doorbell session

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
            if conn in self._doorbell_conns:  # its checkpointer went away: the session ends
                self._doorbell_conns.discard(conn)
                self.guest.stop_doorbell()
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
                    send_line(conn, {"ok": False, "error": "request line too long"})
                    return
                reply, fds, quitting = self._dispatch(line, conn)
                try:
                    send_line(conn, reply, fds)
                except OSError:
                    return
                if quitting:
                    self.on_quit()
                    return

    def _resume(self, req: dict, conn: socket.socket | None) -> dict:
        """resume, with the destination's widened watchdog in the same request (one
        round trip inside the downtime): renewed first, refused if it lapsed already."""
        from postcopy.guest.params import GuestStateError

        stop_at = req.get("stop_at")
        if stop_at is not None and not _is_count(stop_at):
            raise GuestStateError("resume wants a non-negative integer 'stop_at' (or none)")
        self._lease.check_unfenced("resume")
        if "watchdog" in req:
            self._lease.command("watchdog", _promise(req, "watchdog"), conn)
            self._start_watchdog()
        return self.guest.resume(stop_at=stop_at)

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
                if "fence" in req:
                    self._lease.command("fence", _promise(req, "fence"), conn)
                reply = g.pause()
            elif cmd == "resume":
                reply = self._resume(req, conn)
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
            elif cmd == "doorbell":
                self._lease.check_unfenced("doorbell")
                reply, fds = g.start_doorbell(req.get("runs_cap"))
                self._doorbell_conns.add(conn)
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


def _promise(req: dict, name: str) -> dict:
    """The fence or watchdog a pause or resume carries (checked by the lease)."""
    from postcopy.guest.params import GuestStateError

    value = req[name]
    if not isinstance(value, dict):
        raise GuestStateError(f"{req['cmd']}: {name!r} wants an object with 'token' and 'seconds'")
    return {"token": value.get("token"), "seconds": value.get("seconds")}


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
