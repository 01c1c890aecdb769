"""What a testbed owns (namespaces, their descriptors, the processes started in them)
and its teardown: processes stopped, descriptors closed, namespaces removed."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from postcopy.testbed.hosts import TestbedError
from postcopy.testbed.namespaces import kill_pids, live_lock, live_names, log, pids_in, remove_netns

_KILL_WAIT = 10.0  # seconds to wait for a process to die after SIGKILL


class OwnedState:
    """What a testbed owns; cleaned up by close() or, if forgotten, at interpreter exit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.namespaces: list[str] = []  # recorded before they exist, removal tolerates missing
        self.nsfds: dict[str, int] = {}
        self.ns_ids: set[tuple[int, int]] = set()
        self.procs: list[tuple[subprocess.Popen, bool]] = []  # (process, own process group)
        self.kill_grace = 2.0
        self.closing = False
        self.owner_pid = os.getpid()

    def cleanup(self) -> list[str]:
        """Tear everything down; return error messages instead of stopping at the first."""
        if os.getpid() != self.owner_pid:
            return []  # a forked child exiting must not tear down its parent's testbed
        with self.lock:
            self.closing = True
        errors: list[str] = []
        interrupt: BaseException | None = None
        for step in (self._stop_processes, self._close_fds, self._remove_namespaces):
            try:
                step()
            except KeyboardInterrupt as exc:  # finish tearing down, then honour it
                interrupt = interrupt or exc
            except Exception as exc:
                errors.append(f"{step.__name__.strip('_')}: {exc}")
        if interrupt is not None:
            raise interrupt
        return errors

    def cleanup_and_log(self) -> None:
        for message in self.cleanup():
            log.warning("testbed cleanup: %s", message)

    def _stop_processes(self) -> None:
        with self.lock:
            procs, self.procs = self.procs, []
        running = [(p, grp) for p, grp in procs if p.poll() is None]
        for p, grp in running:
            signal_proc(p, grp, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        unkillable = []
        for p, grp in running:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_proc(p, grp, signal.SIGKILL)
                try:
                    p.wait(_KILL_WAIT)
                except subprocess.TimeoutExpired:  # stuck in the kernel: report, go on
                    unkillable.append(p.pid)
        for p, grp in running:
            # Group members the leader left behind (while any member lives, the pgid
            # number cannot be reused; groups of long-reaped leaders are left to the sweep).
            if grp:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        # Anything else still inside (daemonized grandchildren...) would keep the
        # namespaces and their veth alive after the mounts are gone.
        if self.ns_ids:
            kill_pids(pids_in(self.ns_ids))
        if unkillable:
            raise TestbedError(f"processes {unkillable} did not die within {_KILL_WAIT} s of SIGKILL")

    def _close_fds(self) -> None:
        with self.lock:
            fds, self.nsfds = self.nsfds, {}
        for fd in fds.values():
            os.close(fd)

    def _remove_namespaces(self) -> None:
        with self.lock:
            names, self.namespaces = self.namespaces, []
        failed = []
        for name in names:
            try:
                remove_netns(name)
            except OSError as exc:
                failed.append(f"{name}: {exc}")
            else:
                with live_lock:
                    live_names.discard(name)
        if failed:
            raise TestbedError("; ".join(failed))


def signal_proc(p: subprocess.Popen, own_group: bool, sig: int) -> None:
    try:
        if own_group and p.returncode is None:
            os.killpg(p.pid, sig)  # the child and whatever it forked
        else:
            p.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass
