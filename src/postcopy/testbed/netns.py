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

import itertools
import os
import signal
import socket as _socket
import subprocess
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from postcopy.testbed.hosts import DEST_ADDRESS, IFNAMSIZ, PREFIXLEN, SOURCE_ADDRESS, Host, TestbedError
from postcopy.testbed.link import (_MTU, MAX_RATE, MIN_RATE, configure, default_burst, ifindex, ipr_client,
                                   root_qdiscs, shape)
from postcopy.testbed.namespaces import (PREFIX, RUN_DIR, create_netns, live_lock, live_names, log,
                                         prepare_run_dir, remove_stale, unavailable_reason)
from postcopy.testbed.nsthread import in_thread, ns_id, setns
from postcopy.testbed.owned import _KILL_WAIT, OwnedState, signal_proc

# What callers import from here: the testbed, its hosts and error, and the namespace facts.
__all__ = ["DEST_ADDRESS", "MAX_RATE", "MIN_RATE", "PREFIX", "PREFIXLEN", "RUN_DIR", "SOURCE_ADDRESS", "Host",
           "Testbed", "TestbedError", "remove_stale", "root_qdiscs", "unavailable_reason"]

T = TypeVar("T")

_counter = itertools.count()
_counter_lock = threading.Lock()


class Testbed:
    """Two hosts, ``source`` (198.18.0.1/30) and ``dest`` (198.18.0.2/30), in their own
    network namespaces, joined by a veth pair; ``rate`` (bits/s) shapes both directions
    with tbf, None leaves the link unshaped.  Use as a context manager or call close().

    ``kill_grace`` is how long close() waits after SIGTERM before SIGKILL.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, *, rate: int | None = None) -> None:
        self._state = OwnedState()
        # Runs close's work at interpreter exit if the owner forgot; close() detaches it.
        self._finalizer = weakref.finalize(self, OwnedState.cleanup_and_log, self._state)
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
        prepare_run_dir()
        st = self._state
        for host in (self.source, self.dest):
            # Recorded first: an interrupt during creation must still lead to removal.
            with st.lock, live_lock:
                st.namespaces.append(host.name)
                live_names.add(host.name)
            try:
                create_netns(host.name)
            except FileExistsError:
                with st.lock, live_lock:  # not ours: never remove it
                    st.namespaces.remove(host.name)
                    live_names.discard(host.name)
                raise TestbedError(f"network namespace {host.name} already exists") from None
            path = os.path.join(RUN_DIR, host.name)
            st.nsfds[host.name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            st.ns_ids.add(ns_id(path))
        dest_fd = st.nsfds[self.dest.name]

        def source_side(ipr) -> None:
            # Made inside the source namespace with its peer placed straight into dest,
            # so the pair never appears in (or collides in) the caller's namespace.
            ipr.link("add", ifname=self.source.ifname, kind="veth",
                     peer={"ifname": self.dest.ifname, "net_ns_fd": dest_fd})

        self._netlink(self.source, source_side)
        for host in (self.source, self.dest):
            self._netlink(host, lambda ipr, host=host: configure(ipr, host))

    def _netlink(self, host: Host, fn: Callable[[Any], T]) -> T:
        """Run ``fn(ipr)`` with a pyroute2 IPRoute bound inside ``host``'s namespace."""

        def work() -> T:
            with ipr_client() as ipr:  # its netlink socket is created in this thread's netns
                return fn(ipr)

        return in_thread(work, self._nsfd(host))

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
        errors = in_thread(self._state.cleanup, patience=self._state.kill_grace + _KILL_WAIT + 5)
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

    def popen(self, host: Host, argv: list[str], *, cpus: frozenset[int] | None = None,
              **popen_kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace (the child inherits the namespace of
        the thread that forks it; no preexec_fn, no wrapper), on ``cpus`` if given (the
        child and every thread and process it makes inherit the forking thread's
        affinity too).  The process is tracked and killed at close.  By default it gets
        its own session (``start_new_session``), so close() also kills what it forked and
        a terminal's Ctrl-C goes to us, not to it."""
        nsfd = self._nsfd(host)
        popen_kwargs.setdefault("start_new_session", True)
        own_group = bool(popen_kwargs["start_new_session"]) and popen_kwargs.get("process_group") is None
        st = self._state

        def spawn() -> subprocess.Popen:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)  # this short-lived thread only
            proc = subprocess.Popen(argv, **popen_kwargs)
            with st.lock:
                if not st.closing:
                    st.procs = [(p, g) for p, g in st.procs if p.returncode is None]
                    st.procs.append((proc, own_group))
                    return proc
            signal_proc(proc, own_group, signal.SIGKILL)  # raced with close()
            proc.wait()
            raise TestbedError("testbed is closed")

        return in_thread(spawn, nsfd)

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
                signal_proc(proc, own_group, signal.SIGKILL)
                proc.wait()
                raise
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def socket(self, host: Host, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM) -> _socket.socket:
        """A socket created inside ``host``'s namespace; it stays there for its lifetime
        (and keeps that namespace alive, unnamed, if it outlives the testbed)."""
        return in_thread(lambda: _socket.socket(family, type), self._nsfd(host))

    @contextmanager
    def in_namespace(self, host: Host) -> Iterator[None]:
        """Move the calling thread into ``host``'s namespace for the block, then back.
        Sockets, processes and threads created in the block belong to ``host`` (a new
        thread starts in its creator's network namespace); other threads are unaffected."""
        nsfd = self._nsfd(host)
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(nsfd)
            try:
                yield
            finally:
                try:
                    setns(saved)
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
            burst = default_burst(rate_bytes) if burst is None else burst
            if burst < _MTU + 14 or burst > rate_bytes * 100:
                raise TestbedError(f"burst must hold a full frame ({_MTU + 14} bytes) and drain within "
                                   f"100 s at the rate ({rate_bytes * 100} bytes), not {burst}")
            if not 0 < latency_ms or rate_bytes * latency_ms / 1000 + burst > 2**32 - 1:
                raise TestbedError(f"latency_ms must be positive and the queue it implies below 4 GiB, "
                                   f"not {latency_ms}")
        for host in (self.source, self.dest):
            self._netlink(host, lambda ipr, host=host: shape(ipr, host.ifname, rate, burst, latency_ms))

    def link_down(self) -> None:
        """Take both veth ends down: packets are dropped (and the connected route goes
        away, so new connects fail at once); established TCP stalls, retransmitting."""
        for host in (self.source, self.dest):
            self._netlink(host, lambda ipr, host=host: ipr.link("set", index=ifindex(ipr, host.ifname), state="down"))

    def link_up(self) -> None:
        """Bring both veth ends up again; stalled TCP resumes at its next retransmission
        (exponential backoff: after a long outage that can take a while)."""
        for host in (self.source, self.dest):
            self._netlink(host, lambda ipr, host=host: ipr.link("set", index=ifindex(ipr, host.ifname), state="up"))

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Testbed {self.source.name} <-> {self.dest.name} {state}>"
