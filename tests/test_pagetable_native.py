"""The page table in C (native/dp_dest.c) behind its Python face: the legal moves come
from Python's LEGAL, the timeline and fault records it keeps, waiting for every page,
and the stop event that reaches its C loops."""
from __future__ import annotations

import threading
import weakref

import pytest

from postcopy import report
from postcopy.migration import pagetable
from postcopy.migration.pagetable import (MISSING, PRESENT, REMOVED, REQUESTED, ZERO, IllegalTransition,
                                          PageTable, StopEvent, TableClosed)

CAUSES = report.PAGE_CAUSES


def test_the_c_table_takes_its_moves_from_legal(monkeypatch):
    """LEGAL is the one definition: a table made while it forbids REMOVED -> ZERO refuses
    that move; the table made before it still allows it."""
    before = PageTable(2, CAUSES)
    monkeypatch.setitem(pagetable.LEGAL, REMOVED, frozenset({MISSING, REMOVED}))
    after = PageTable(2, CAUSES)
    for table in (before, after):
        table.removed(0, 1, by_guest=False)
    before.mark_zero(0, 1)
    assert before[0] == ZERO
    with pytest.raises(IllegalTransition, match="page 0: REMOVED -> ZERO is not allowed"):
        after.mark_zero(0, 2)
    assert after[0] == REMOVED and after[1] == MISSING and after.pages["zero"] == 0


def test_timeline_counts_installs_per_bucket_by_cause():
    timeline = report.Timeline(bucket_ms=10.0, start_ns=1_000_000_000)
    table = PageTable(100, CAUSES, timeline)
    ms = 1_000_000
    table.installed(0, 4, "pushed", 1_000_000_000 + 3 * ms)     # bucket 0
    table.installed(4, 2, "demand", 1_000_000_000 + 25 * ms)    # bucket 2
    table.installed(6, 1, "pushed", 1_000_000_000 + 29 * ms)    # bucket 2
    table.installed(7, 3, "precopy", 500_000_000)               # before the start: bucket 0
    table.mark_zero(50, 10)  # at the clock's now: some bucket of the "zero" series
    table.sync_timeline()
    series = timeline.series
    assert set(series) == set(CAUSES)
    assert {len(values) for values in series.values()} == {len(series["zero"])}
    assert series["pushed"][:3] == [4, 0, 1]
    assert series["demand"][:3] == [0, 0, 2]
    assert series["precopy"][:3] == [3, 0, 0]
    assert sum(series["pushed"]) == 5 and sum(series["zero"]) == 10 and sum(series["resent"]) == 0
    assert timeline.as_dict()["installed"] is series


def test_mark_zero_returns_every_waiter_beyond_one_buffer():
    table = PageTable(1000, CAUSES)
    for page in range(0, 1000, 5):
        table.fault(page, page)
    assert sorted(table.mark_zero(0, 1000)) == list(range(0, 1000, 5))
    assert table.pages["zero"] == 1000 and all(table[p] == ZERO for p in range(1000))


def test_a_page_out_of_range_is_refused_with_its_number():
    table = PageTable(4, CAUSES)
    with pytest.raises(IndexError, match="page 4 is beyond the table"):
        table.fault(4, 0)
    with pytest.raises(IndexError, match=r"\[2, 6\)"):
        table.installed(2, 4, "pushed", 0)
    assert table.count_in == 0 and table.pages["pushed"] == 0


def test_all_in_wakes_a_waiter_when_the_last_page_comes_in():
    table = PageTable(8, CAUSES)
    assert table.all_in.wait(0.001) is False  # nothing can make it true meanwhile
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(table.all_in.wait(None)))
    waiter.start()
    table.installed(0, 4, "pushed", 0)
    table.mark_zero(4, 3)
    table.removed(7, 8, by_guest=False)
    waiter.join()
    assert result == [True] and table.all_in.is_set()
    table.discard([(0, 1)])
    assert not table.all_in.is_set()


def test_fault_records_are_pairs_of_read_ns_and_wake_us():
    table = PageTable(4, CAUSES)
    table.fault(0, 1_000)
    table.fault(1, 2_000)
    table.installed(0, 2, "demand", 4_500)
    assert sorted(table.faults) == [(1_000, 3.5), (2_000, 2.5)]
    assert all(isinstance(ns, int) and isinstance(us, float) for ns, us in table.faults)
    assert table[0] == PRESENT and table[2] == MISSING and table.fault(2, 0) == MISSING
    assert table[2] == REQUESTED


def test_the_gate_is_a_context_manager_and_a_lock():
    table = PageTable(1, CAUSES)
    with table.gate:
        pass
    assert table.gate.acquire() is True
    table.gate.release()


def test_a_stop_event_reaches_tables_attached_before_and_after_it_is_set():
    first, second = PageTable(1, CAUSES), PageTable(1, CAUSES)
    stop = StopEvent()
    stop.attach(first)
    stop.set()
    stop.attach(second)
    assert stop.is_set()
    # A stopped table's fault loop returns at once (no userfaultfd needed for that).
    from postcopy._native import ffi, lib
    runs = ffi.new("uint64_t[]", 128)
    for table in (first, second):
        assert lib.pc_dp_fault_loop(table.native, 0, 0, runs, 64) == 0


@pytest.mark.parametrize("end", ["close", "abandon"])
def test_a_closed_table_refuses_every_use_clearly(end):
    """The destination frees its table at the end of its run (the collector freed it
    under a live view at interpreter exit); any later use is a clear error, not a read
    of freed memory."""
    table = PageTable(8, CAUSES)
    table.installed(0, 2, "pushed", 1)
    stop = StopEvent()
    stop.attach(table)
    getattr(table, end)()
    getattr(table, end)()  # idempotent
    assert table.closed
    uses = [lambda: table[0], lambda: table.count_in, lambda: table.pages, lambda: table.find(PRESENT, 0, 8),
            lambda: table.runs({PRESENT}), lambda: table.installed(2, 1, "pushed", 2),
            lambda: table.all_in.wait(0), lambda: table.gate.acquire(), lambda: table.native]
    for use in uses:
        with pytest.raises(TableClosed, match="page table of 8 pages is closed"):
            use()
    stop.set()  # stopping a closed table is nothing to do


def test_close_after_leaves_the_memory_to_a_thread_still_using_it(capsys):
    table, release = PageTable(4, CAUSES), threading.Event()
    busy = threading.Thread(target=release.wait, daemon=True)
    busy.start()
    table.close_after(None, busy)
    assert table.closed and "did not stop in time" in capsys.readouterr().err
    release.set()
    busy.join()
    done = PageTable(4, CAUSES)
    done.close_after(None, busy)
    assert done.closed and capsys.readouterr().err == ""


def test_an_unclosed_table_goes_with_its_last_reference():
    """No reference cycle through its lock or gate: the C table is freed when the
    table is dropped, not at some later collection (or at interpreter exit)."""
    table = PageTable(4, CAUSES)
    with table.gate:
        pass
    gone = weakref.ref(table)
    del table
    assert gone() is None
