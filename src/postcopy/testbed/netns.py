"""Network-namespace testbed: a "source" and a "dest" host joined by a veth pair.

Each host is a named network namespace (bind-mounted under /run/netns, so ``ip netns``
sees it too) with loopback up and one end of a veth pair addressed from the benchmarking
range 198.18.0.0/15.  Commands run inside a host, sockets can be made inside a host, the
link can be shaped with tbf and taken down and up.  Everything the testbed made is removed
on close, also after an exception, Ctrl-C or (via the CLI) SIGTERM; namespaces left behind
by processes that died without cleaning up are removed by the next testbed.

All link configuration goes through pyroute2 (rtnetlink).  Namespace creation, entry and
removal are a few direct syscalls instead of ``pyroute2.netns``, because its ``create``
forks the whole (possibly threaded) interpreter and its ``pushns`` saves
``/proc/self/ns/net``, which names the main thread's namespace, not the caller's.

Threading model: the kernel keeps the network namespace per thread.  Internal work
(netlink, popen, socket) runs in a short-lived helper thread that joins the namespace, so
the caller's thread never moves and an interrupt cannot strand it in the wrong
namespace; only :meth:`Testbed.in_namespace` moves the calling thread, by request.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import logging
import os
import re
import signal
import socket as _socket
import subprocess
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from postcopy.kernel.process import pid_exists

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Where named network namespaces live (the iproute2 convention).
RUN_DIR = "/run/netns"
#: Every namespace we create is named PREFIX<pid>-<counter>-{src,dst}.
PREFIX = "postcopy-"
_NAME_RE = re.compile(re.escape(PREFIX) + r"(\d+)-(\d+)-(src|dst)")

SOURCE_ADDRESS = "198.18.0.1"
DEST_ADDRESS = "198.18.0.2"
PREFIXLEN = 30

IFNAMSIZ = 16  # including the NUL: names are at most 15 characters
_MTU = 1500
# pyroute2 encodes the tbf rate in the 32-bit tc_ratespec field (no TCA_TBF_RATE64).
MAX_RATE = (2**32 - 1) * 8
# Below this the tbf bucket of a single frame takes minutes to fill.
MIN_RATE = 1000

_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_TC_H_ROOT = 0xFFFFFFFF
_KILL_WAIT = 10.0  # seconds to wait for a process to die after SIGKILL

_counter = itertools.count()
_counter_lock = threading.Lock()
# Namespaces this process made and has not removed yet.  Any other namespace carrying our
# pid was left by an earlier process that had the same pid: stale as well.
_live: set[str] = set()
_live_lock = threading.Lock()


class TestbedError(RuntimeError):
    """The testbed could not be set up, used or torn down."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class Host:
    """One end of the testbed: a network namespace with one veth end."""

    name: str  # namespace name (entry in /run/netns)
    address: str  # IPv4 address of the veth end, without prefix length
    ifname: str  # veth interface name inside the namespace


# --------------------------------------------------------------------------- syscalls

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    _check(_c().setns(fd, _CLONE_NEWNET), "setns(CLONE_NEWNET)")


def _unshare_net() -> None:
    """Give the calling thread a fresh network namespace (per thread, allowed when threaded)."""
    _check(_c().unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


# ------------------------------------------------------------------- helper threads


def _in_thread(fn: Callable[[], T], nsfd: int | None = None, patience: float = 10.0) -> T:
    """Run ``fn`` in a fresh thread, first joining the namespace ``nsfd`` if given.

    The thread dies afterwards, taking its namespace membership with it: nothing to undo.
    Python delivers signals to the main thread only, so ``fn`` itself is never cut short
    by Ctrl-C; the caller sees the KeyboardInterrupt once ``fn`` is done (or after
    ``patience`` seconds), so whatever ``fn`` made is recorded and can be cleaned up.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def body() -> None:
        try:
            if nsfd is not None:
                _setns(nsfd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    # Waiting on our own Event, not Thread.join(): on 3.11 an interrupted join() can mark
    # a still-running thread as stopped (the bpo-45274 fix), and we would stop waiting.
    thread = threading.Thread(target=body, name="postcopy-netns", daemon=True)
    pending: BaseException | None = None
    deadline = None
    try:
        thread.start()  # waits for the thread to run: interruptible too
    except KeyboardInterrupt as exc:
        pending, deadline = exc, time.monotonic() + patience
    while not done.is_set():
        try:
            done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt as exc:
            pending, deadline = exc, time.monotonic() + patience
        if deadline is not None and time.monotonic() >= deadline:
            break
    if pending is not None:
        raise pending
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------- namespace lifecycle


def _prepare_run_dir() -> None:
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


def _create_netns(name: str) -> None:
    """Create the named namespace /run/netns/NAME without forking: a helper thread
    unshares its network namespace and bind-mounts it; the mount keeps it alive."""
    path = os.path.join(RUN_DIR, name)

    def make() -> None:
        _unshare_net()
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
        try:
            # thread-self, not self: /proc/self/ns/net is the main thread's namespace.
            _check(_c().mount(b"/proc/thread-self/ns/net", path.encode(), b"none", _MS_BIND, None),
                   f"mount --bind {path}")
        except BaseException:
            os.unlink(path)
            raise

    _in_thread(make)


def _remove_netns(name: str) -> None:
    """Unmount and unlink /run/netns/NAME; missing is fine.  The namespace itself (and
    the veth and qdiscs in it) goes away once nothing else holds it."""
    path = os.path.join(RUN_DIR, name)
    if _c().umount2(path.encode(), _MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _check(-1, f"umount {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pids_in(ns_ids: set[tuple[int, int]]) -> list[int]:
    """Processes (other than us) whose network namespace is one of ``ns_ids``.
    Zombies have no namespace links and are skipped."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if _ns_id(f"/proc/{entry}/ns/net") in ns_ids:
                pids.append(int(entry))
        except OSError:  # exited meanwhile, or a kernel thread
            continue
    return pids


def _kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
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
        with _live_lock:
            ours_or_alive = name in _live if pid == me else pid_exists(pid)
        if ours_or_alive:
            continue
        try:
            _kill_pids(_pids_in({_ns_id(os.path.join(RUN_DIR, name))}))
        except OSError:
            pass  # removed meanwhile by a concurrent cleaner, or never mounted
        try:
            _remove_netns(name)
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
        _in_thread(_unshare_net)  # the probe namespace dies with the helper thread
    except OSError as exc:
        return f"{what}: unshare(CLONE_NEWNET) failed: {exc.strerror}"
    return None


# ------------------------------------------------------------------------ netlink


def _ipr():
    from pyroute2 import IPRoute  # imported lazily: ~0.1 s, not needed by every command

    return IPRoute()


def _ifindex(ipr, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise TestbedError(f"interface {ifname} not found")
    return found[0]


def _default_burst(rate_bytes: int) -> int:
    # 10 ms worth of tokens, at least a few full frames so a single packet always fits.
    return max(rate_bytes // 100, 4 * (_MTU + 14))


# --------------------------------------------------------------------------- state


class _State:
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
            _signal_proc(p, grp, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        unkillable = []
        for p, grp in running:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_proc(p, grp, signal.SIGKILL)
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
            _kill_pids(_pids_in(self.ns_ids))
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
                _remove_netns(name)
            except OSError as exc:
                failed.append(f"{name}: {exc}")
            else:
                with _live_lock:
                    _live.discard(name)
        if failed:
            raise TestbedError("; ".join(failed))


def _signal_proc(p: subprocess.Popen, own_group: bool, sig: int) -> None:
    try:
        if own_group and p.returncode is None:
            os.killpg(p.pid, sig)  # the child and whatever it forked
        else:
            p.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------ testbed


class Testbed:
    """Two hosts, ``source`` (198.18.0.1/30) and ``dest`` (198.18.0.2/30), in their own
    network namespaces, joined by a veth pair; ``rate`` (bits/s) shapes both directions
    with tbf, None leaves the link unshaped.  Use as a context manager or call close().

    ``kill_grace`` is how long close() waits after SIGTERM before SIGKILL.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, *, rate: int | None = None) -> None:
        self._state = _State()
        # Runs close's work at interpreter exit if the owner forgot; close() detaches it.
        self._finalizer = weakref.finalize(self, _State.cleanup_and_log, self._state)
        pid = os.getpid()
        with _counter_lock:
            n = next(_counter)
        tag = f"{pid}-{n}"
        ifbase = f"pc{pid:x}-{n % 0x100000:x}"  # hex keeps it within IFNAMSIZ
        self.source = Host(f"{PREFIX}{tag}-src", SOURCE_ADDRESS, f"{ifbase}s")
        self.dest = Host(f"{PREFIX}{tag}-dst", DEST_ADDRESS, f"{ifbase}d")
        assert len(self.source.ifname) < IFNAMSIZ, self.source.ifname
        try:
            remove_stale()
            self._build()
            if rate is not None:
                self.set_rate(rate)
        except BaseException as exc:
            try:
                self.close()
            except Exception as cleanup_exc:
                log.warning("cleanup after failed setup: %s", cleanup_exc)
            if isinstance(exc, TestbedError) or not isinstance(exc, Exception):
                raise
            hint = "" if os.geteuid() == 0 else " (needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN)"
            raise TestbedError(f"cannot create network testbed: {exc}{hint}") from exc

    def _build(self) -> None:
        _prepare_run_dir()
        st = self._state
        for host in (self.source, self.dest):
            # Recorded first: an interrupt during creation must still lead to removal.
            with st.lock, _live_lock:
                st.namespaces.append(host.name)
                _live.add(host.name)
            try:
                _create_netns(host.name)
            except FileExistsError:
                with st.lock, _live_lock:  # not ours: never remove it
                    st.namespaces.remove(host.name)
                    _live.discard(host.name)
                raise TestbedError(f"network namespace {host.name} already exists") from None
            path = os.path.join(RUN_DIR, host.name)
            st.nsfds[host.name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            st.ns_ids.add(_ns_id(path))
        dest_fd = st.nsfds[self.dest.name]

        def source_side(ipr) -> None:
            # Made inside the source namespace with its peer placed straight into dest,
            # so the pair never appears in (or collides in) the caller's namespace.
            ipr.link("add", ifname=self.source.ifname, kind="veth",
                     peer={"ifname": self.dest.ifname, "net_ns_fd": dest_fd})

        self._netlink(self.source, source_side)
        for host in (self.source, self.dest):
            self._netlink(host, lambda ipr, host=host: _configure(ipr, host))

    def _netlink(self, host: Host, fn: Callable[[Any], T]) -> T:
        """Run ``fn(ipr)`` with a pyroute2 IPRoute bound inside ``host``'s namespace."""

        def work() -> T:
            with _ipr() as ipr:  # its netlink socket is created in this thread's netns
                return fn(ipr)

        return _in_thread(work, self._nsfd(host))

    def _nsfd(self, host: Host) -> int:
        try:
            return self._state.nsfds[host.name]
        except KeyError:
            if not self._finalizer.alive:
                raise TestbedError("testbed is closed") from None
            raise TestbedError(f"{host.name} is not a host of this testbed") from None

    # -- lifecycle

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the exception that is unwinding
            self.close()
        except Exception as cleanup_exc:
            log.warning("testbed cleanup: %s", cleanup_exc)

    def close(self) -> None:
        """Kill the processes started here (SIGTERM, SIGKILL after ``kill_grace``) and
        any other process inside the namespaces, then remove the namespaces (with them
        the veth pair and qdiscs).  Idempotent."""
        if self._finalizer.detach() is None:
            return
        # In a helper thread so that a Ctrl-C cannot cut the teardown short half-way.
        errors = _in_thread(self._state.cleanup, patience=self._state.kill_grace + _KILL_WAIT + 5)
        if errors:
            raise TestbedError("testbed cleanup incomplete: " + "; ".join(errors))

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def kill_grace(self) -> float:
        return self._state.kill_grace

    @kill_grace.setter
    def kill_grace(self, seconds: float) -> None:
        self._state.kill_grace = float(seconds)

    # -- running things inside a host

    def popen(self, host: Host, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace (the child inherits the namespace of
        the thread that forks it; no preexec_fn, no wrapper).  The process is tracked and
        killed at close.  By default it gets its own session (``start_new_session``), so
        close() also kills what it forked and a terminal's Ctrl-C goes to us, not to it."""
        nsfd = self._nsfd(host)
        popen_kwargs.setdefault("start_new_session", True)
        own_group = bool(popen_kwargs["start_new_session"]) and popen_kwargs.get("process_group") is None
        st = self._state

        def spawn() -> subprocess.Popen:
            proc = subprocess.Popen(argv, **popen_kwargs)
            with st.lock:
                if not st.closing:
                    st.procs = [(p, g) for p, g in st.procs if p.returncode is None]
                    st.procs.append((proc, own_group))
                    return proc
            _signal_proc(proc, own_group, signal.SIGKILL)  # raced with close()
            proc.wait()
            raise TestbedError("testbed is closed")

        return _in_thread(spawn, nsfd)

    def run(self, host: Host, argv: list[str], *, timeout: float | None = None,
            input: bytes | str | None = None, check: bool = False, capture_output: bool = False,
            **kw: Any) -> subprocess.CompletedProcess:
        """Like :func:`subprocess.run`, inside ``host``'s namespace."""
        if capture_output:
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        kw.setdefault("start_new_session", True)
        own_group = bool(kw["start_new_session"]) and kw.get("process_group") is None
        with self.popen(host, argv, **kw) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except BaseException:  # timeout, Ctrl-C: do not leave it running
                _signal_proc(proc, own_group, signal.SIGKILL)
                proc.wait()
                raise
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def socket(self, host: Host, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM) -> _socket.socket:
        """A socket created inside ``host``'s namespace; it stays there for its lifetime
        (and keeps that namespace alive, unnamed, if it outlives the testbed)."""
        return _in_thread(lambda: _socket.socket(family, type), self._nsfd(host))

    @contextmanager
    def in_namespace(self, host: Host) -> Iterator[None]:
        """Move the calling thread into ``host``'s namespace for the block, then back.
        Sockets, processes and threads created in the block belong to ``host`` (a new
        thread starts in its creator's network namespace); other threads are unaffected."""
        nsfd = self._nsfd(host)
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(nsfd)
            try:
                yield
            finally:
                try:
                    _setns(saved)
                except OSError as exc:  # should not happen: we hold the fd
                    raise TestbedError(f"cannot return to the original network namespace: {exc}") from exc
        finally:
            os.close(saved)

    # -- link control

    def set_rate(self, rate: int | None, *, burst: int | None = None, latency_ms: float = 50) -> None:
        """Shape both directions with a tbf qdisc at ``rate`` bits/s (``burst`` bytes,
        default 10 ms of tokens; queue ``latency_ms``), or remove the shaping (None)."""
        if rate is not None:
            if not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
                raise TestbedError(f"rate must be an integer from {MIN_RATE} to {MAX_RATE} bits/s, not {rate!r}")
            rate_bytes = rate // 8
            burst = _default_burst(rate_bytes) if burst is None else burst
            if burst < _MTU + 14 or burst > rate_bytes * 100:
                raise TestbedError(f"burst must hold a full frame ({_MTU + 14} bytes) and drain within "
                                   f"100 s at the rate ({rate_bytes * 100} bytes), not {burst}")
            if not 0 < latency_ms or rate_bytes * latency_ms / 1000 + burst > 2**32 - 1:
                raise TestbedError(f"latency_ms must be positive and the queue it implies below 4 GiB, "
                                   f"not {latency_ms}")
        for host in (self.source, self.dest):
            self._netlink(host, lambda ipr, host=host: _shape(ipr, host.ifname, rate, burst, latency_ms))

    def link_down(self) -> None:
        """Take both veth ends down: packets are dropped (and the connected route goes
        away, so new connects fail at once); established TCP stalls, retransmitting."""
        for host in (self.source, self.dest):
            self._netlink(host, lambda ipr, host=host: ipr.link("set", index=_ifindex(ipr, host.ifname), state="down"))

    def link_up(self) -> None:
        """Bring both veth ends up again; stalled TCP resumes at its next retransmission
        (exponential backoff: after a long outage that can take a while)."""
        for host in (self.source, self.dest):
            self._netlink(host, lambda ipr, host=host: ipr.link("set", index=_ifindex(ipr, host.ifname), state="up"))

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Testbed {self.source.name} <-> {self.dest.name} {state}>"


def _configure(ipr, host: Host) -> None:
    ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
    index = _ifindex(ipr, host.ifname)
    ipr.addr("add", index=index, address=host.address, prefixlen=PREFIXLEN)
    ipr.link("set", index=index, state="up")


def root_qdiscs(ipr, index: int) -> list:
    """The root qdisc messages of interface ``index`` (pyroute2 ``tcmsg``)."""
    return [q for q in ipr.get_qdiscs(index=index) if q["parent"] == _TC_H_ROOT]


def _shape(ipr, ifname: str, rate: int | None, burst: int, latency_ms: float) -> None:
    index = _ifindex(ipr, ifname)
    if rate is None:
        if any(q.get("kind") == "tbf" for q in root_qdiscs(ipr, index)):
            ipr.tc("del", index=index, root=True)
        return
    # pyroute2 takes the rate in bytes/s and the latency in microseconds
    ipr.tc("replace", "tbf", index, "1:", rate=rate // 8, burst=burst, latency=int(latency_ms * 1000))
