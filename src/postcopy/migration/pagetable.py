"""The destination's page table: the state of every guest page, the legal moves
between states, the count of pages in, and the waiters' fault latencies, all behind
one lock (sans-IO: no userfaultfd, no socket; see :mod:`postcopy.migration.faults`
and :mod:`postcopy.migration.install` for who drives it).

The table itself lives in C (``native/dp_dest.c``) so that installs and the fault loop
update it without the GIL; :class:`PageTable` is its Python face. The legal moves are
defined here once (:data:`LEGAL`) and handed to C at creation.

A page is *in* when it is PRESENT (installed), ZERO (known to hold only zeros: the
kernel fills it) or REMOVED (the guest dropped it: it reads zeros). Every non-zero page
is in when the count reaches the page total, and :attr:`PageTable.all_in` is set.
"""
from __future__ import annotations

import enum
import errno
import sys
import threading
from array import array
from collections.abc import Sequence
from typing import Protocol

from postcopy._native import ffi, lib


class FaultRecords(Sequence):
    """Every wait's (ns the fault was read, µs to wake), as two arrays of 8 bytes an
    entry: a guest can fault a million times, and a tuple of two Python numbers per
    fault cost the destination ~110 bytes each (its peak RSS grew with them)."""

    def __init__(self, ns: array, us: array) -> None:
        self.ns, self.us = ns, us

    def __len__(self) -> int:
        return len(self.ns)

    def __getitem__(self, i: int) -> tuple[int, float]:
        return self.ns[i], self.us[i]


class PageState(enum.IntEnum):
    """One page on the destination."""

    MISSING = 0    # not here yet, nobody asked
    REQUESTED = 1  # a guest thread faulted on it: asked for on the urgent channel
    PRESENT = 2    # installed
    ZERO = 3       # holds only zeros: nothing crosses the wire, UFFDIO_ZEROPAGE on a fault
    REMOVED = 4    # dropped by the guest (MADV_DONTNEED, munmap): reads zeros, never filled


MISSING, REQUESTED, PRESENT, ZERO, REMOVED = (PageState.MISSING, PageState.REQUESTED, PageState.PRESENT,
                                              PageState.ZERO, PageState.REMOVED)
IN = frozenset({PRESENT, ZERO, REMOVED})  # counted in

# Which state may become which. Discard (hybrid) sends any page back to MISSING; a
# precopy resend overwrites PRESENT; a page not yet zero-filled may still be installed.
# Never: a page in (or asked for) asked for again, an installed page declared zero, a
# removed page filled with source data.
LEGAL: dict[PageState, frozenset[PageState]] = {
    MISSING: frozenset({MISSING, REQUESTED, PRESENT, ZERO, REMOVED}),
    REQUESTED: frozenset({MISSING, PRESENT, ZERO, REMOVED}),
    PRESENT: frozenset({MISSING, PRESENT, REMOVED}),
    ZERO: frozenset({MISSING, PRESENT, ZERO, REMOVED}),
    REMOVED: frozenset({MISSING, ZERO, REMOVED}),
}


def is_legal(old: PageState, new: PageState) -> bool:
    """Whether a page in state ``old`` may move to ``new``."""
    return new in LEGAL[old]


class IllegalTransition(RuntimeError):
    """A page was asked to move between states the table does not allow."""


class TableClosed(RuntimeError):
    """The page table was used after :meth:`PageTable.close` (its migration ended)."""


class Timeline(Protocol):
    """Pages installed per time bucket, by cause (report.Timeline): the table counts
    them in C from ``start_ns`` in buckets of ``bucket_ns`` and writes ``series``
    (see :meth:`PageTable.sync_timeline`)."""

    start_ns: int
    bucket_ns: int
    series: dict[str, list[int]]


def _flags(states) -> bytes:
    """A bytes.translate table: 1 for each state in ``states``, 0 otherwise."""
    wanted = frozenset(states)
    return bytes(1 if i in wanted else 0 for i in range(256))


def _legal_matrix() -> bytes:
    return bytes(1 if is_legal(old, new) else 0 for old in PageState for new in PageState)


def native_error(rc: int, what: str = "page table") -> Exception:
    """The exception for a failed dp_dest call's code (``rc`` < 0)."""
    message = ffi.string(lib.pc_dp_error()).decode(errors="replace")
    if rc == lib.PC_DP_ILLEGAL:
        return IllegalTransition(message)
    if rc == -errno.ENOMEM:
        return MemoryError(message)
    if rc == -errno.EINVAL:
        return IndexError(f"{what}: {message}")
    return OSError(-rc, message)


class _Handle:
    """The C table, or None once closed (shared by the table and its helpers, which
    must not hold the table itself: the cycle would leave its freeing to the collector)."""

    def __init__(self, native, npages: int) -> None:
        self.raw, self.npages = native, npages

    @property
    def native(self):
        if self.raw is None:
            raise TableClosed(f"the page table of {self.npages} pages is closed: its migration ended")
        return self.raw


class _Mutex:
    """A C mutex of a table as a context manager (taken with the GIL released)."""

    def __init__(self, lock, unlock, table: _Handle) -> None:
        self._lock, self._unlock, self._table = lock, unlock, table

    def acquire(self) -> bool:
        self._lock(self._table.native)
        return True

    def release(self) -> None:
        self._unlock(self._table.native)

    def __enter__(self) -> "_Mutex":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _AllIn:
    """Whether every page is in (PRESENT, ZERO or REMOVED), as a read-only event."""

    def __init__(self, table: _Handle) -> None:
        self._table = table

    def is_set(self) -> bool:
        return bool(lib.pc_dp_all_in(self._table.native))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever) until every page is in."""
        while True:
            step = 1000 if timeout is None else max(0, min(1000, int(timeout * 1000)))
            if lib.pc_dp_wait_all_in(self._table.native, step):
                return True
            if timeout is not None:
                timeout -= step / 1000
                if timeout <= 0:
                    return False


class PageTable:
    """States of ``npages`` pages (all MISSING at first). Thread-safe: every method
    takes the table's lock (a C mutex). ``timeline`` (optional) gets every install and
    zero mark; :meth:`sync_timeline` writes them into it. ``gate`` is the install gate
    (see :class:`postcopy.migration.install.InstallTarget`)."""

    def __init__(self, npages: int, causes: tuple[str, ...] = (), timeline: Timeline | None = None) -> None:
        self.npages = npages
        self._causes: dict[str, int] = {}
        for cause in (*causes, "zero"):
            self._cause(cause)
        self._declared = tuple(causes)
        self._timeline = timeline
        start, bucket = (timeline.start_ns, timeline.bucket_ns) if timeline is not None else (0, 0)
        raw = lib.pc_dp_table_new(npages, _legal_matrix(), self._causes["zero"], start, bucket)
        if raw == ffi.NULL:
            raise MemoryError(f"no memory for the page table of {npages} pages")
        self._handle = _Handle(ffi.gc(raw, lib.pc_dp_table_free), npages)
        self._states = memoryview(ffi.buffer(lib.pc_dp_states(raw), max(npages, 1)))[:npages]
        self._lock = _Mutex(lib.pc_dp_lock, lib.pc_dp_unlock, self._handle)
        self.gate = _Mutex(lib.pc_dp_gate_lock, lib.pc_dp_gate_unlock, self._handle)
        self.all_in = _AllIn(self._handle)

    @property
    def native(self):
        """The C table (``struct pc_dp_table *``); raises :class:`TableClosed` once closed."""
        return self._handle.native

    @property
    def _state(self) -> memoryview:
        """The state bytes, read in place (C memory)."""
        self.native  # raises once closed
        return self._states

    @property
    def closed(self) -> bool:
        return self._handle.raw is None

    def close(self) -> None:
        """Free the C table now, not whenever the collector gets to it (at interpreter
        exit it freed it under a live view). Call it once nothing uses the table any
        more: no C loop, no install, no view of its states. Idempotent; any later use
        raises :class:`TableClosed`."""
        native, self._handle.raw = self._handle.raw, None
        if native is None:
            return
        self._states.release()
        ffi.release(native)  # runs pc_dp_table_free

    def close_after(self, *threads: threading.Thread | None) -> None:
        """:meth:`close`, unless one of ``threads`` (which use the table in C) is still
        alive: then :meth:`abandon` (said on stderr)."""
        if any(t is not None and t.is_alive() for t in threads):
            print("a thread of the page table did not stop in time: its memory stays allocated",
                  file=sys.stderr, flush=True)
            self.abandon()
        else:
            self.close()

    def abandon(self) -> None:
        """Never free the C table (a thread that did not stop may still be in it): the
        collector will not either. Later use raises :class:`TableClosed`."""
        native, self._handle.raw = self._handle.raw, None
        if native is not None:
            ffi.gc(native, None)  # detaches pc_dp_table_free

    def _cause(self, cause: str) -> int:
        index = self._causes.get(cause)
        if index is None:
            if len(self._causes) >= lib.PC_DP_MAX_CAUSES:
                raise ValueError(f"page cause {cause!r}: the table counts at most {lib.PC_DP_MAX_CAUSES} causes")
            index = self._causes[cause] = len(self._causes)
        return index

    def cause_index(self, cause: str) -> int:
        """The C index of a page cause (for :func:`lib.pc_dp_install_copy`)."""
        return self._cause(cause)

    # -- reading ---------------------------------------------------------------------
    def __getitem__(self, page: int) -> PageState:
        return PageState(self._state[page])

    def __len__(self) -> int:
        return self.npages

    @property
    def count_in(self) -> int:
        """Pages PRESENT, ZERO or REMOVED."""
        return lib.pc_dp_count_in(self.native)

    @property
    def pages(self) -> dict[str, int]:
        """Pages in, by cause (a snapshot)."""
        names = list(dict.fromkeys((*self._declared, *self._causes)))
        if "zero" not in self._declared and not lib.pc_dp_pages(self.native, self._causes["zero"]):
            names.remove("zero")
        return {cause: lib.pc_dp_pages(self.native, self._causes[cause]) for cause in names}

    @property
    def removed_by_guest(self) -> int:
        """Pages the guest dropped after the switchover."""
        return lib.pc_dp_removed_by_guest(self.native)

    @property
    def faults(self) -> "FaultRecords":
        """(ns the fault was read, µs to wake), one per wait (a snapshot)."""
        n = lib.pc_dp_nfaults(self.native)
        ns, us = ffi.new("int64_t[]", max(n, 1)), ffi.new("double[]", max(n, 1))
        n = lib.pc_dp_faults(self.native, 0, ns, us, n)
        records = FaultRecords(array("q"), array("d"))
        records.ns.frombytes(ffi.buffer(ns, 8 * n))
        records.us.frombytes(ffi.buffer(us, 8 * n))
        return records

    def find(self, state: PageState, lo: int, hi: int) -> int:
        """First page of [lo, hi) in ``state``, or -1."""
        hit = self._state[lo:hi].tobytes().find(state)
        return hit if hit < 0 else lo + hit

    def first_of(self, states, lo: int, hi: int) -> int:
        """Offset from ``lo`` of the first page of [lo, hi) in one of ``states``, or -1."""
        return self._state[lo:hi].tobytes().translate(_flags(states)).find(1)

    def run_of(self, state: PageState, page: int, end: int) -> int:
        """Length of the run of pages in ``state`` from ``page`` (at least 1: the
        caller knows this one is)."""
        n = 1
        while page + n < end and self._state[page + n] == state:
            n += 1
        return n

    def runs(self, states) -> list[tuple[int, int]]:
        """Runs (first, count) of pages whose state is one of ``states``."""
        with self._lock:
            flags = self._state.tobytes().translate(_flags(states))
        runs, pos = [], 0
        while True:
            first = flags.find(1, pos)
            if first < 0:
                return runs
            end = flags.find(0, first)
            end = len(flags) if end < 0 else end
            runs.append((first, end - first))
            pos = end

    def waiting(self, lo: int = 0, hi: int | None = None) -> list[int]:
        """Pages of [lo, hi) threads wait on (their fault was read, not yet woken)."""
        hi = self.npages if hi is None else hi
        cap = 64
        while True:
            out = ffi.new("uint64_t[]", cap)
            n = lib.pc_dp_waiting(self.native, lo, hi, out, cap)
            if n <= cap:
                return list(out[0:n])
            cap = n + 64

    def outstanding(self) -> tuple[list[tuple[int, int]], list[int]]:
        """After a link loss: the runs not in yet, and the pages threads wait on."""
        return self.runs((MISSING, REQUESTED)), sorted(self.waiting())

    def sync_timeline(self) -> None:
        """Write the pages installed per bucket into the timeline given at creation."""
        if self._timeline is None:
            return
        n = lib.pc_dp_timeline_len(self.native)
        out = ffi.new("uint64_t[]", max(n, 1))
        series = self._timeline.series
        for cause in dict.fromkeys((*series, *self._causes)):
            if cause in self._causes:
                got = lib.pc_dp_timeline(self.native, self._causes[cause], out, n)
                series[cause] = list(out[0:got])
            else:
                series[cause] = [0] * n

    # -- transitions -----------------------------------------------------------------
    def _check(self, rc: int) -> int:
        if rc < 0:
            raise native_error(rc)
        return rc

    def _move(self, lo: int, hi: int, new: PageState) -> int:
        """Move [lo, hi) to ``new`` (lock held); returns how many pages came in."""
        return self._check(lib.pc_dp_move_locked(self.native, lo, hi, new))

    def fault(self, page: int, now: int) -> PageState:
        """A guest thread faulted on ``page`` at ``now`` (ns): its wait is timed
        unless the page is installed or asked for; a MISSING page becomes REQUESTED.
        Returns the state the page was in."""
        return PageState(self._check(lib.pc_dp_fault(self.native, page, now)))

    def installed(self, first: int, count: int, cause: str, now: int) -> None:
        """Pages [first, first+count) are installed (by ``cause``); their waiters woke."""
        self._check(lib.pc_dp_installed(self.native, first, count, self._cause(cause), now))

    def woken(self, page: int, now: int) -> None:
        """The thread waiting on ``page`` (if any) was woken at ``now``."""
        lib.pc_dp_woken(self.native, page, now)

    def mark_zero(self, first: int, count: int) -> list[int]:
        """Pages [first, first+count) hold only zeros (installed ones stay as they are).
        Returns the pages threads already wait on (they need a UFFDIO_ZEROPAGE now)."""
        out = ffi.new("uint64_t[]", 64)
        n = self._check(lib.pc_dp_mark_zero(self.native, first, count, out, 64))
        return list(out[0:n]) if n <= 64 else self.waiting(first, first + count)

    def removed(self, first: int, end: int, *, by_guest: bool) -> None:
        """The guest dropped [first, end): those pages read zeros from now on."""
        self._check(lib.pc_dp_removed(self.native, first, end, int(by_guest)))

    def discard(self, runs) -> None:
        """Hybrid: these runs (first, count) are dropped to be sent again: MISSING."""
        with self._lock:
            for first, count in runs:
                self._move(first, first + count, MISSING)

    def switched(self) -> None:
        """The guest runs here from now on: what it removes counts as removed by it."""
        lib.pc_dp_set_switched(self.native)

    def stop(self) -> None:
        """The migration ends: C loops return, a changing mapping is no longer retried
        (nothing to stop once closed)."""
        if not self.closed:
            lib.pc_dp_set_stop(self.native)


class StopEvent(threading.Event):
    """The migration's stop event; setting it also stops the C loops of the tables
    attached to it."""

    def __init__(self) -> None:
        super().__init__()
        self._tables: list[PageTable] = []

    def attach(self, table: PageTable) -> None:
        self._tables.append(table)
        if self.is_set():
            table.stop()

    def set(self) -> None:
        super().set()
        for table in self._tables:
            table.stop()
