"""The destination's page table, without userfaultfd or sockets: its states, every
legal and illegal transition, the count of pages in, and updates from many threads."""
from __future__ import annotations

import itertools
import threading

import pytest

from postcopy.migration.pagetable import (IN, LEGAL, MISSING, PRESENT, REMOVED, REQUESTED, ZERO,
                                          IllegalTransition, PageState, PageTable, is_legal)

CAUSES = ("precopy", "resent", "demand", "pushed", "zero")


def _move(table: PageTable, page: int, state: PageState) -> None:
    """Ask the table to move ``page`` to ``state`` by the operation that leads there
    (from MISSING, this brings a fresh page into ``state`` by a legal step)."""
    if state == MISSING:
        table.discard([(page, 1)])  # MISSING -> MISSING is legal: a no-op
    elif state == REQUESTED:
        table.fault(page, 0)
    elif state == PRESENT:
        table.installed(page, 1, "demand", 0)
    elif state == ZERO:
        table.mark_zero(page, 1)
    elif state == REMOVED:
        table.removed(page, page + 1, by_guest=True)


def test_states_are_an_intenum_with_the_wire_values():
    assert [int(s) for s in PageState] == [0, 1, 2, 3, 4]
    assert [s.name for s in PageState] == ["MISSING", "REQUESTED", "PRESENT", "ZERO", "REMOVED"]
    assert IN == {PRESENT, ZERO, REMOVED}


def test_the_transition_table_says_what_the_design_says():
    illegal = {(old, new) for old, new in itertools.product(PageState, PageState) if not is_legal(old, new)}
    assert illegal == {
        (REQUESTED, REQUESTED), (PRESENT, REQUESTED), (ZERO, REQUESTED), (REMOVED, REQUESTED),
        (PRESENT, ZERO),  # an installed page is never declared zero
        (REMOVED, PRESENT),  # source data never fills a page the guest dropped
    }
    assert set(LEGAL) == set(PageState)


@pytest.mark.parametrize("old,new", list(itertools.product(PageState, PageState)),
                         ids=lambda s: s.name)
def test_every_transition(old, new):
    """Each (old, new) pair: done by the operation that leads to ``new``. The legal
    ones land; the illegal ones raise (through a direct move) and change nothing."""
    table = PageTable(4, CAUSES)
    _move(table, 1, old)
    assert table[1] == old
    before = table.count_in
    if new == REQUESTED and old != MISSING:
        # fault() on a page that is not MISSING leaves it as it is (a second fault, or
        # one on an installed page): the operation itself never asks for it again.
        assert table.fault(1, 0) == old
        assert table[1] == old
        with pytest.raises(IllegalTransition, match=f"page 1: {old.name} -> REQUESTED"):
            with table._lock:
                table._move(1, 2, REQUESTED)
    elif new == ZERO and old == PRESENT:
        table.mark_zero(0, 4)  # installed pages are skipped, the others become ZERO
        assert table[1] == PRESENT and table[0] == ZERO and table[2] == ZERO
        with pytest.raises(IllegalTransition, match="PRESENT -> ZERO"):
            with table._lock:
                table._move(1, 2, ZERO)
        return
    elif is_legal(old, new):
        _move(table, 1, new)
        assert table[1] == new
    else:
        with pytest.raises(IllegalTransition, match=f"page 1: {old.name} -> {new.name} is not allowed"):
            _move(table, 1, new)
        assert table[1] == old
    assert table.count_in == before + (table[1] in IN) - (old in IN)


def test_illegal_run_changes_nothing():
    table = PageTable(8, CAUSES)
    table.removed(5, 6, by_guest=False)
    with pytest.raises(IllegalTransition, match="page 5: REMOVED -> PRESENT"):
        table.installed(2, 6, "pushed", 0)
    assert [table[p] for p in range(8)] == [MISSING] * 5 + [REMOVED] + [MISSING] * 2
    assert table.count_in == 1 and table.pages["pushed"] == 0


def test_count_in_and_all_in():
    table = PageTable(10, CAUSES)
    assert table.count_in == 0 and not table.all_in.is_set()
    table.fault(0, 0)
    assert table.count_in == 0  # asked for is not in
    table.installed(0, 4, "pushed", 0)
    table.installed(2, 2, "resent", 0)  # a resend of present pages counts once
    assert table.count_in == 4
    table.mark_zero(3, 4)  # 3 is present: 4, 5, 6 come in
    assert table.count_in == 7 and table.pages["zero"] == 3
    table.removed(6, 8, by_guest=True)  # 6 was in (ZERO) already
    assert table.count_in == 8 and table.removed_by_guest == 2
    table.installed(8, 2, "demand", 0)
    assert table.count_in == 10 and table.all_in.is_set()
    table.discard([(0, 2), (7, 1)])
    assert table.count_in == 7 and not table.all_in.is_set()
    assert table.runs((MISSING, REQUESTED)) == [(0, 2), (7, 1)]
    assert table.pages == {"precopy": 0, "resent": 2, "demand": 2, "pushed": 4, "zero": 3}
    assert table.count_in == sum(table[p] in IN for p in range(10))


def test_removed_before_the_switchover_is_not_the_guests():
    table = PageTable(4, CAUSES)
    table.removed(0, 2, by_guest=False)
    assert table.removed_by_guest == 0 and table.count_in == 2


def test_fault_latencies_are_recorded_once_per_wait():
    table = PageTable(4, CAUSES)
    assert table.fault(1, 1_000) == MISSING
    assert table.fault(1, 5_000) == REQUESTED  # the same wait: not restarted
    table.mark_zero(2, 1)
    assert table.fault(2, 2_000) == ZERO
    assert table.outstanding() == ([(0, 2), (3, 1)], [1, 2])
    table.installed(0, 2, "demand", 11_000)
    table.woken(2, 4_000)
    table.woken(2, 9_000)  # nobody waits any more: nothing recorded
    assert sorted(table.faults) == [(1_000, 10.0), (2_000, 2.0)]
    assert table.fault(1, 12_000) == PRESENT  # installed: no wait to time
    assert table.outstanding() == ([(3, 1)], [])


def test_mark_zero_returns_the_waiters():
    table = PageTable(4, CAUSES)
    table.fault(1, 0)
    table.fault(3, 0)
    assert sorted(table.mark_zero(0, 3)) == [1]


def test_concurrent_updates_keep_the_count():
    """Threads install, zero and remove overlapping runs and fault on pages at once;
    the count equals the pages in, and all_in is set once every page is."""
    npages, nthreads = 4096, 8
    table = PageTable(npages, CAUSES)
    start = threading.Barrier(nthreads)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            start.wait()
            for first in range(k * 16, npages, nthreads * 16):
                table.fault(first + 3, first)
                if k % 3 == 0:
                    table.mark_zero(first, 32)
                elif k % 3 == 1:
                    table.removed(first, first + 8, by_guest=True)
                    table.mark_zero(first + 8, 8)
                else:
                    table.installed(first, 16, "pushed", first)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Zero runs overlap the next thread's removals and zeros: all legal moves.
    assert not errors, errors
    assert table.count_in == sum(table[p] in IN for p in range(npages))
    assert table.pages["pushed"] == sum(16 for k in range(2, nthreads, 3) for _ in range(k * 16, npages, 128))
    # The stripes cover every page: all in, set by whichever thread finished last.
    assert table.runs((MISSING, REQUESTED)) == []
    assert table.count_in == npages and table.all_in.is_set()
