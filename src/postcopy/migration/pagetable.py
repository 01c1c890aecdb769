"""The destination's page table: the state of every guest page, the legal moves
between states, the count of pages in, and the waiters' fault latencies, all behind
one lock (sans-IO: no userfaultfd, no socket; see :mod:`postcopy.migration.faults`
and :mod:`postcopy.migration.install` for who drives it).

A page is *in* when it is PRESENT (installed), ZERO (known to hold only zeros: the
kernel fills it) or REMOVED (the guest dropped it: it reads zeros). Every non-zero page
is in when the count reaches the page total, and :attr:`PageTable.all_in` is set.
"""
from __future__ import annotations

import enum
import functools
import threading
from typing import Iterator, Protocol


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


@functools.lru_cache(maxsize=32)
def _flags(states: frozenset) -> bytes:
    """A bytes.translate table: 1 for each state in ``states``, 0 otherwise."""
    return bytes(1 if i in states else 0 for i in range(256))


# Per target state: 1 for every state that may not move there (checked in C by translate).
_ILLEGAL_FROM = {new: _flags(frozenset(old for old in PageState if not is_legal(old, new))) for new in PageState}
_NOT_IN = _flags(frozenset({MISSING, REQUESTED}))
_IS_IN = _flags(IN)


class IllegalTransition(RuntimeError):
    """A page was asked to move between states the table does not allow."""


class Timeline(Protocol):
    def add(self, cause: str, pages: int, now_ns: int | None = None) -> None: ...


class PageTable:
    """States of ``npages`` pages (all MISSING at first). Thread-safe: every method
    takes the table's lock. ``timeline`` (optional) gets every install and zero mark,
    under that lock."""

    def __init__(self, npages: int, causes: tuple[str, ...] = (), timeline: Timeline | None = None) -> None:
        self.npages = npages
        self._state = bytearray(npages)
        self._lock = threading.Lock()
        self._in = 0
        self._timeline = timeline
        self.all_in = threading.Event()
        if npages == 0:
            self.all_in.set()
        self.pages = {cause: 0 for cause in causes}  # pages in, by cause
        self.removed_by_guest = 0  # pages the guest dropped after the switchover
        self._waiting: dict[int, int] = {}  # page -> ns its fault was read
        self.faults: list[tuple[int, float]] = []  # (ns the fault was read, µs to wake)

    # -- reading ---------------------------------------------------------------------
    def __getitem__(self, page: int) -> PageState:
        return PageState(self._state[page])

    def __len__(self) -> int:
        return self.npages

    @property
    def count_in(self) -> int:
        """Pages PRESENT, ZERO or REMOVED."""
        return self._in

    def find(self, state: PageState, lo: int, hi: int) -> int:
        """First page of [lo, hi) in ``state``, or -1."""
        return self._state.find(state, lo, hi)

    def first_of(self, states, lo: int, hi: int) -> int:
        """Offset from ``lo`` of the first page of [lo, hi) in one of ``states``, or -1."""
        return self._state[lo:hi].translate(_flags(frozenset(states))).find(1)

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
            flags = self._state.translate(_flags(frozenset(states)))
        runs, pos = [], 0
        while True:
            first = flags.find(1, pos)
            if first < 0:
                return runs
            end = flags.find(0, first)
            end = len(flags) if end < 0 else end
            runs.append((first, end - first))
            pos = end

    def outstanding(self) -> tuple[list[tuple[int, int]], list[int]]:
        """After a link loss: the runs not in yet, and the pages threads wait on."""
        with self._lock:
            waiting = sorted(self._waiting)
        return self.runs((MISSING, REQUESTED)), waiting

    # -- transitions -----------------------------------------------------------------
    def _move(self, lo: int, hi: int, new: PageState) -> int:
        """Move [lo, hi) to ``new`` (lock held); returns how many pages came in."""
        part = self._state[lo:hi]
        bad = part.translate(_ILLEGAL_FROM[new]).find(1)
        if bad >= 0:
            raise IllegalTransition(f"page {lo + bad}: {PageState(part[bad]).name} -> {new.name} is not allowed")
        came_in = part.translate(_NOT_IN).count(1) if new in IN else 0
        went_out = part.translate(_IS_IN).count(1) if new not in IN else 0
        self._state[lo:hi] = bytes([new]) * (hi - lo)
        self._in += came_in - went_out
        if self._in >= self.npages:
            self.all_in.set()
        elif went_out:
            self.all_in.clear()
        return came_in

    def _woken(self, page: int, now: int) -> None:
        started = self._waiting.pop(page, None)
        if started is not None:
            self.faults.append((started, (now - started) / 1e3))

    def fault(self, page: int, now: int) -> PageState:
        """A guest thread faulted on ``page`` at ``now`` (ns): its wait is timed
        unless the page is installed or asked for; a MISSING page becomes REQUESTED.
        Returns the state the page was in."""
        with self._lock:
            state = PageState(self._state[page])
            if state in (MISSING, ZERO, REMOVED) and page not in self._waiting:
                self._waiting[page] = now
            if state == MISSING:
                self._move(page, page + 1, REQUESTED)
            return state

    def installed(self, first: int, count: int, cause: str, now: int) -> None:
        """Pages [first, first+count) are installed (by ``cause``); their waiters woke."""
        end = first + count
        with self._lock:
            self._move(first, end, PRESENT)
            self.pages[cause] = self.pages.get(cause, 0) + count
            if self._timeline is not None:
                self._timeline.add(cause, count, now)
            if self._waiting:
                for page in [p for p in self._waiting if first <= p < end]:
                    self._woken(page, now)

    def woken(self, page: int, now: int) -> None:
        """The thread waiting on ``page`` (if any) was woken at ``now``."""
        with self._lock:
            self._woken(page, now)

    def mark_zero(self, first: int, count: int) -> list[int]:
        """Pages [first, first+count) hold only zeros (installed ones stay as they are).
        Returns the pages threads already wait on (they need a UFFDIO_ZEROPAGE now)."""
        end = first + count
        with self._lock:
            new = sum(self._move(lo, hi, ZERO) for lo, hi in self._spans_not(PRESENT, first, end))
            self.pages["zero"] = self.pages.get("zero", 0) + new
            if self._timeline is not None:
                self._timeline.add("zero", new)
            return [p for p in self._waiting if first <= p < end]

    def removed(self, first: int, end: int, *, by_guest: bool) -> None:
        """The guest dropped [first, end): those pages read zeros from now on."""
        with self._lock:
            self._move(first, end, REMOVED)
            if by_guest:
                self.removed_by_guest += end - first

    def discard(self, runs) -> None:
        """Hybrid: these runs (first, count) are dropped to be sent again: MISSING."""
        with self._lock:
            for first, count in runs:
                self._move(first, first + count, MISSING)

    def _spans_not(self, state: PageState, first: int, end: int) -> Iterator[tuple[int, int]]:
        """Sub-ranges of [first, end) whose pages are not in ``state``."""
        pos = first
        while pos < end:
            hit = self._state.find(state, pos, end)
            if hit < 0:
                yield pos, end
                return
            if hit > pos:
                yield pos, hit
            pos = hit + 1
