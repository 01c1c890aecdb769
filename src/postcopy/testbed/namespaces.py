"""Named network namespaces (bind-mounted under /run/netns, as ``ip netns`` makes
them): creation without forking, removal, and the sweep of those left behind by
testbeds whose process died."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import signal
import threading

from postcopy.kernel.process import pid_exists
from postcopy.testbed.nsthread import _c, _check, in_thread, ns_id, unshare_net

log = logging.getLogger("postcopy.testbed.netns")  # the testbed's one logger

#: Where named network namespaces live (the iproute2 convention).
RUN_DIR = "/run/netns"
#: Every namespace we create is named PREFIX<pid>-<counter>-{src,dst}.
PREFIX = "postcopy-"
_NAME_RE = re.compile(re.escape(PREFIX) + r"(\d+)-(\d+)-(src|dst)")

_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2

# Namespaces this process made and has not removed yet.  Any other namespace carrying our
# pid was left by an earlier process that had the same pid: stale as well.
live_names: set[str] = set()
live_lock = threading.Lock()


def prepare_run_dir() -> None:
    """Create RUN_DIR and make it a shared mount, as ``ip netns add`` does, so that
    unmounting a namespace propagates into mount namespaces cloned meanwhile (a private
    copy of the bind mount would keep the namespace alive).  The self bind mount is
    permanent system state, the same one iproute2 leaves; the lock keeps concurrent
    testbeds from stacking it twice."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    fd = os.open(RUN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        libc = _c()
        target = RUN_DIR.encode()
        if libc.mount(b"none", target, None, _MS_SHARED | _MS_REC, None) == 0:
            return
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
            _check(-1, f"mount --make-rshared {RUN_DIR}")
        _check(libc.mount(target, target, b"none", _MS_BIND | _MS_REC, None), f"mount --bind {RUN_DIR}")
        _check(libc.mount(b"none", target, None, _MS_SHARED | _MS_REC, None), f"mount --make-rshared {RUN_DIR}")
    finally:
        os.close(fd)  # releases the lock


def create_netns(name: str) -> None:
    """Create the named namespace /run/netns/NAME without forking: a helper thread
    unshares its network namespace and bind-mounts it; the mount keeps it alive."""
    path = os.path.join(RUN_DIR, name)

    def make() -> None:
        unshare_net()
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
        try:
            # thread-self, not self: /proc/self/ns/net is the main thread's namespace.
            _check(_c().mount(b"/proc/thread-self/ns/net", path.encode(), b"none", _MS_BIND, None),
                   f"mount --bind {path}")
        except BaseException:
            os.unlink(path)
            raise

    in_thread(make)


def remove_netns(name: str) -> None:
    """Unmount and unlink /run/netns/NAME; missing is fine.  The namespace itself (and
    the veth and qdiscs in it) goes away once nothing else holds it."""
    path = os.path.join(RUN_DIR, name)
    if _c().umount2(path.encode(), _MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _check(-1, f"umount {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def pids_in(ns_ids: set[tuple[int, int]]) -> list[int]:
    """Processes (other than us) whose network namespace is one of ``ns_ids``.
    Zombies have no namespace links and are skipped."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if ns_id(f"/proc/{entry}/ns/net") in ns_ids:
                pids.append(int(entry))
        except OSError:  # exited meanwhile, or a kernel thread
            continue
    return pids


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def remove_stale() -> list[str]:
    """Remove namespaces named by this module whose creating process is gone, killing
    any process still inside them (they were started by that testbed).  Returns the
    names removed.  A namespace whose creator is alive is never touched (a live pid that
    was reused by an unrelated process keeps its stale namespaces until it exits)."""
    try:
        names = os.listdir(RUN_DIR)
    except FileNotFoundError:
        return []
    removed = []
    me = os.getpid()
    for name in names:
        match = _NAME_RE.fullmatch(name)
        if not match:
            continue
        pid = int(match.group(1))
        with live_lock:
            ours_or_alive = name in live_names if pid == me else pid_exists(pid)
        if ours_or_alive:
            continue
        try:
            kill_pids(pids_in({ns_id(os.path.join(RUN_DIR, name))}))
        except OSError:
            pass  # removed meanwhile by a concurrent cleaner, or never mounted
        try:
            remove_netns(name)
        except OSError as exc:
            log.warning("cannot remove stale namespace %s: %s", name, exc)
            continue
        removed.append(name)
        log.info("removed stale network namespace %s", name)
    return removed


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    what = "network namespaces (CAP_SYS_ADMIN / CONFIG_NET_NS)"
    if os.geteuid() != 0:
        return f"{what}: needs root"
    if not os.path.exists("/proc/self/ns/net"):
        return f"{what}: kernel built without CONFIG_NET_NS"
    try:
        in_thread(unshare_net)  # the probe namespace dies with the helper thread
    except OSError as exc:
        return f"{what}: unshare(CLONE_NEWNET) failed: {exc.strerror}"
    return None
