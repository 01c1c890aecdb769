"""/proc/PID/pagemap reads, runs computed in C, PAGEMAP_SCAN, clear_refs."""
from __future__ import annotations

import mmap

import pytest

from conftest import require_uffd
from postcopy.kernel import pagemap as pm
from postcopy._native import lib
from postcopy.kernel.pagemap import (PM_PRESENT, PM_SOFT_DIRTY, PM_SWAP, Category, Pagemap, PagemapError,
                              ScanFlag, clear_refs)
from postcopy.kernel.uffd import PAGE_SIZE, Feature, Mode, Userfaultfd, address_of, supported_features

PS = PAGE_SIZE
POPULATED = PM_PRESENT | PM_SWAP


@pytest.fixture
def anon():
    maps = []

    def make(npages: int) -> tuple[mmap.mmap, int]:
        m = mmap.mmap(-1, npages * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_NOHUGEPAGE)  # one entry per 4 KiB page
        maps.append(m)
        return m, address_of(m)

    yield make
    for m in maps:
        m.close()


def write_pages(m: mmap.mmap, pages) -> None:
    for p in pages:
        m[p * PS] = 1  # writes only: a read would map the zero page (present too)


def test_read_reports_present_pages(anon):
    m, base = anon(4)
    write_pages(m, [1, 3])
    with Pagemap() as pagemap:
        entries = pagemap.read(base, 4)
    assert len(entries) == 4
    assert [bool(e & PM_PRESENT) for e in entries] == [False, True, False, True]
    assert pagemap.closed


def test_runs_of_populated_and_untouched_pages(anon):
    m, base = anon(64)
    write_pages(m, [3, 4, 5, 10, 63])
    with Pagemap("self") as pagemap:
        assert pagemap.runs(base, 64, POPULATED) == [(3, 3), (10, 1), (63, 1)]
        assert pagemap.runs(base, 64, POPULATED, invert=True) == [(0, 3), (6, 4), (11, 52)]
        assert pagemap.runs(base + 4 * PS, 3, POPULATED) == [(0, 2)]
        assert pagemap.runs(base, 0, POPULATED) == []


def test_runs_are_chunked_and_resumed_across_native_calls(anon):
    # More pages than one native read chunk, more runs than the run buffer holds.
    npages = 2 * lib.PC_PAGEMAP_CHUNK + 77
    m, base = anon(npages)
    written = sorted({0, 1, 2, lib.PC_PAGEMAP_CHUNK - 1, lib.PC_PAGEMAP_CHUNK, npages - 1,
                      *range(100, npages, 997)})
    write_pages(m, written)
    expect: list[tuple[int, int]] = []
    for p in written:
        if expect and expect[-1][0] + expect[-1][1] == p:
            expect[-1] = (expect[-1][0], expect[-1][1] + 1)
        else:
            expect.append((p, 1))
    with Pagemap(run_buffer=3) as pagemap:
        assert pagemap.runs(base, npages, POPULATED) == expect
    with Pagemap() as pagemap:
        assert pagemap.runs(base, npages, POPULATED) == expect


def test_runs_past_the_address_space_end_are_empty():
    with Pagemap() as pagemap:
        top = (1 << 47) - 16 * PS  # end of the x86-64 user address space: nothing mapped
        assert pagemap.runs(top, 16, POPULATED) == []


def test_pagemap_of_a_missing_process_is_a_clear_error():
    with pytest.raises(FileNotFoundError):
        Pagemap(2**22 + 12345)  # above the default pid_max


def test_clear_refs_accepts_soft_dirty_clear(anon):
    m, base = anon(1)
    write_pages(m, [0])
    clear_refs("self", 4)
    m[0] = 2
    with Pagemap() as pagemap:
        entry = pagemap.read(base, 1)[0]
    assert entry & PM_PRESENT
    with pytest.raises(PagemapError):
        clear_refs(2**22 + 12345, 4)


# -- PAGEMAP_SCAN ---------------------------------------------------------------------

def require_pagemap_scan() -> None:
    require_uffd()
    if not supported_features() & Feature.WP_ASYNC:
        pytest.skip("kernel lacks UFFD_FEATURE_WP_ASYNC (PAGEMAP_SCAN write tracking, Linux 6.7+)")


HARVEST = dict(flags=ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC,
               category_mask=Category.WRITTEN, return_mask=Category.WRITTEN)
PEEK = dict(category_mask=Category.WRITTEN, return_mask=Category.WRITTEN)


@pytest.fixture
def tracked(anon):
    """An anonymous region under async write-protect, all pages protected."""
    require_pagemap_scan()
    uffds = []

    def make(npages: int) -> tuple[mmap.mmap, int]:
        m, base = anon(npages)
        u = Userfaultfd(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
        uffds.append(u)
        u.register(base, npages * PS, Mode.WP)
        u.writeprotect(base, npages * PS, protect=True)
        return m, base

    yield make
    for u in uffds:
        u.close()


def pages_of(regions, base: int) -> list[int]:
    return [p for s, e, _ in regions for p in range((s - base) // PS, (e - base) // PS)]


def test_scan_finds_exactly_the_written_pages_then_none(tracked):
    m, base = tracked(64)
    written = [0, 7, 8, 9, 40, 63]
    write_pages(m, written)
    end = base + 64 * PS
    with Pagemap() as pagemap:
        first = pagemap.scan(base, end, **HARVEST)
        assert pages_of(first, base) == written
        assert [(s - base) // PS for s, _, _ in first] == [0, 7, 40, 63]  # dense regions
        assert all(c == Category.WRITTEN for _, _, c in first)
        assert pagemap.scan(base, end, **HARVEST) == []
        write_pages(m, [8])
        assert pages_of(pagemap.scan(base, end, **HARVEST), base) == [8]


def test_scan_with_small_buffer_covers_range_once(tracked):
    # Isolated written pages: one region each, more than the kernel's 512-entry bounce
    # buffer per call and an exact multiple of our buffer, the case where walk_end
    # lags behind the last region reported.
    npages, cap = 2 * 1300, 650
    m, base = tracked(npages)
    written = list(range(0, npages, 2))
    write_pages(m, written)
    end = base + npages * PS
    with Pagemap(scan_buffer=cap) as pagemap:
        peek = pagemap.scan(base, end, **PEEK)  # no re-protect: duplicates would show
        assert pages_of(peek, base) == written
        assert len(peek) == len(written)
        assert pages_of(pagemap.scan(base, end, **HARVEST), base) == written
        assert pagemap.scan(base, end, **HARVEST) == []


def test_scan_stops_at_max_pages(tracked):
    m, base = tracked(32)
    write_pages(m, range(32))
    end = base + 32 * PS
    with Pagemap(scan_buffer=4) as pagemap:
        got = pagemap.scan(base, end, max_pages=5, **HARVEST)
        assert pages_of(got, base) == [0, 1, 2, 3, 4]
        assert pages_of(pagemap.scan(base, end, **HARVEST), base) == list(range(5, 32))


def test_scan_category_selection(tracked):
    m, base = tracked(16)
    write_pages(m, [2, 3])
    end = base + 16 * PS
    with Pagemap() as pagemap:
        # Present pages and whether written: 2-3 both.
        present = pagemap.scan(base, end, category_mask=Category.PRESENT,
                               return_mask=Category.PRESENT | Category.WRITTEN)
        assert present == [(base + 2 * PS, base + 4 * PS, int(Category.PRESENT | Category.WRITTEN))]
        # Not written (inverted): everything else.
        clean = pagemap.scan(base, end, category_mask=Category.WRITTEN,
                             category_inverted=Category.WRITTEN, return_mask=Category.WRITTEN)
        assert pages_of(clean, base) == [0, 1, *range(4, 16)]


def test_scan_check_wpasync_rejects_untracked_memory(anon):
    require_pagemap_scan()
    m, base = anon(4)
    write_pages(m, [0])
    with Pagemap() as pagemap:
        with pytest.raises(PagemapError) as info:
            pagemap.scan(base, base + 4 * PS, **HARVEST)
        assert "WP_ASYNC" in str(info.value)


def test_soft_dirty_bit_tracks_writes(anon):
    from postcopy.kernel.probes import probe_soft_dirty

    if not probe_soft_dirty().ok:
        pytest.skip("kernel built without CONFIG_MEM_SOFT_DIRTY (soft-dirty bit never set)")
    m, base = anon(8)
    write_pages(m, range(8))
    clear_refs("self", pm.CLEAR_REFS_SOFT_DIRTY)
    write_pages(m, [2, 5, 6])
    with Pagemap() as pagemap:
        assert pagemap.runs(base, 8, PM_SOFT_DIRTY) == [(2, 1), (5, 2)]
