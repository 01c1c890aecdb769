"""Dirty-log backends on real guests: exact reports, get-and-clear, no write lost to a
harvest racing the vCPUs, detection by trying, refusal before the guest is touched.

soft-dirty needs CONFIG_MEM_SOFT_DIRTY (not on this machine's kernel: those tests run
in the kernel matrix on Debian's 6.1); pagemap-scan needs PAGEMAP_SCAN and
UFFD_FEATURE_WP_ASYNC (Linux 6.7+). Each test skips naming what is missing."""
from __future__ import annotations

import dataclasses
import mmap
import os
import time

import pytest

from postcopy.kernel.dirtylog import (DirtyLogUnavailable, available_backends, merge_runs, open_dirty_log)
from postcopy.guest import GuestClient, GuestError, GuestParams, parse_final_hash, reference_hash

PAGE = mmap.PAGESIZE
RAM = 8 << 20
NPAGES = RAM // PAGE
BASE = GuestParams(ram=RAM, threads=2, workload="random-write", seed=21, steps=None)

pytestmark = pytest.mark.precopy

BACKEND_PARAMS = [
    pytest.param("soft-dirty", marks=pytest.mark.softdirty, id="soft-dirty"),
    pytest.param("pagemap-scan", id="pagemap-scan"),
]


def require_backend(name: str) -> None:
    reason = available_backends()[name]
    if reason is not None:
        pytest.skip(reason)  # names CONFIG_MEM_SOFT_DIRTY / PAGEMAP_SCAN + UFFD_FEATURE_WP_ASYNC




def page_runs(pages) -> list[tuple[int, int]]:
    return merge_runs([(p, 1) for p in sorted(set(pages))])


def pages_of(runs) -> set[int]:
    return {p for first, count in runs for p in range(first, first + count)}


class RamReader:
    """Snapshots of a guest's RAM from outside, without touching its page tables'
    dirty state: the memfd mapped here (memfd), or /proc/PID/mem (anon)."""

    def __init__(self, client: GuestClient, info: dict):
        self.size = info["ram_size"]
        self.address = info["ram_address"]
        self._map = None
        self._mem = None
        if info["backing"] == "memfd":
            _, fds = client.take_fds()
            try:
                self._map = mmap.mmap(fds["memfd"], self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                for fd in fds.values():
                    os.close(fd)
        else:
            self._mem = os.open(f"/proc/{info['pid']}/mem", os.O_RDONLY)

    def snapshot(self) -> bytes:
        if self._map is not None:
            return self._map[:]
        return os.pread(self._mem, self.size, self.address)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        if self._mem is not None:
            os.close(self._mem)


def changed_pages(a: bytes, b: bytes) -> set[int]:
    return {p for p in range(len(a) // PAGE) if a[p * PAGE:(p + 1) * PAGE] != b[p * PAGE:(p + 1) * PAGE]}


# ---- detection ------------------------------------------------------------------------


def test_available_backends_name_what_is_missing():
    backends = available_backends()
    assert set(backends) == {"soft-dirty", "pagemap-scan"}
    if backends["soft-dirty"] is not None:
        assert "CONFIG_MEM_SOFT_DIRTY" in backends["soft-dirty"]
    if backends["pagemap-scan"] is not None:
        assert "PAGEMAP_SCAN" in backends["pagemap-scan"] and "WP_ASYNC" in backends["pagemap-scan"]
    assert available_backends(refresh=True) == backends  # decided by trying, stable


def test_auto_prefers_soft_dirty_else_pagemap_scan(launch):
    backends = available_backends()
    usable = [name for name in ("soft-dirty", "pagemap-scan") if backends[name] is None]
    if not usable:
        pytest.skip("no dirty log on this kernel: " + "; ".join(backends.values()))
    _, sock = launch(BASE, start_paused=True)
    with GuestClient(sock) as guest:
        log = open_dirty_log("auto", guest, guest.status())
        assert log.name == usable[0]
        if backends["soft-dirty"] is not None:  # this machine: soft-dirty missing
            assert log.name == "pagemap-scan"
        with pytest.raises(ValueError, match="unknown dirty log"):
            open_dirty_log("dirty-ring", guest, guest.status())
        guest.quit()


@pytest.mark.parametrize("name", ["soft-dirty", "pagemap-scan"])
def test_missing_backend_refused_before_the_guest_is_touched(launch, name):
    reason = available_backends()[name]
    if reason is None:
        pytest.skip(f"{name} works on this kernel: nothing to refuse")
    params = dataclasses.replace(BASE, steps=600, rate=2000)
    proc, sock = launch(params)
    with GuestClient(sock) as guest:
        before = guest.status()
        with pytest.raises(DirtyLogUnavailable) as exc:
            open_dirty_log(name, guest, before)
        feature = "CONFIG_MEM_SOFT_DIRTY" if name == "soft-dirty" else "WP_ASYNC"
        assert feature in str(exc.value)
        after = guest.status()
        assert after["state"] == "running" and not after["dirty_tracking"]
    # Untouched: it runs to the end with the result of a guest nobody looked at.
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert parse_final_hash(out) == reference_hash(params)


# ---- exact reports ----------------------------------------------------------------------


@pytest.mark.parametrize("backing", ["memfd", "anon"])
@pytest.mark.parametrize("name", BACKEND_PARAMS)
def test_reports_exactly_the_pages_written(launch, name, backing):
    """On a paused guest only ``touch`` writes (content unchanged): the harvest must be
    exactly those pages. Neither backend documents extra reports for present pages of
    a VMA that exists before start (soft-dirty: a VMA made after the clear reads dirty
    whole; pagemap-scan: a zapped PTE reads written), so none are allowed here."""
    require_backend(name)
    _, sock = launch(dataclasses.replace(BASE, backing=backing), start_paused=True)
    with GuestClient(sock) as guest:
        log = open_dirty_log(name, guest, guest.status())
        with log:
            log.start()
            assert log.harvest() == []  # nothing written since start
            first = [0, 3, 4, 5, 100, 511, 512, 513, NPAGES - 1]  # incl. a 2 MiB boundary
            guest.touch(first)
            assert log.harvest() == page_runs(first)
            assert log.harvest() == []  # get-and-clear
            second = [1, 2, 3, 1000, 1001, NPAGES - 2]
            guest.touch(second)
            guest.touch(second)  # twice: still reported once
            assert log.harvest() == page_runs(second)
            assert log.last_harvest_ms > 0 and log.last_pause_ms == 0  # paused guest: not paused by us
        assert guest.status()["dirty_tracking"] is False
        guest.quit()


@pytest.mark.parametrize("name", BACKEND_PARAMS)
def test_small_native_buffers_continue(launch, monkeypatch, name):
    """Output buffers of 3 runs: the native loops stop and go on where they stopped
    (PAGEMAP_SCAN after a full buffer, the pagemap pass after a full run list); runs
    cut at a call boundary come back merged."""
    require_backend(name)
    from postcopy.kernel.dirtylog.pagemapscan import PagemapScanLog
    from postcopy.kernel.dirtylog.softdirty import SoftDirtyLog

    monkeypatch.setattr(PagemapScanLog, "scan_buffer", 3)
    monkeypatch.setattr(SoftDirtyLog, "run_buffer", 3)
    _, sock = launch(BASE, start_paused=True)
    with GuestClient(sock) as guest:
        with open_dirty_log(name, guest, guest.status()) as log:
            log.start()
            pages = [1, 2, 3, 10, 20, 30, 40, 41, 42, 43, 500, 700, 1500, NPAGES - 1]
            guest.touch(pages)
            assert log.harvest() == page_runs(pages)
            guest.touch_spread(0, NPAGES, 200, seed=9)
            assert len(pages_of(log.harvest())) == 200
            assert log.harvest() == []
        guest.quit()


# ---- no write lost to a racing harvest -----------------------------------------------------


@pytest.mark.parametrize("backing", ["memfd", "anon"])
@pytest.mark.parametrize("name", BACKEND_PARAMS)
def test_harvest_racing_writers_loses_nothing(launch, name, backing):
    """The shape of the kernel selftest pagemap_ioctl "transact" test, with the vCPUs
    as writers: snapshots S_i taken after harvest H_i. A page that differs between S_i
    and S_(i+1) was written after H_i's clear and before H_(i+2) began, so it must be in
    H_(i+1) or H_(i+2). Extra reports are allowed, missing ones never."""
    require_backend(name)
    params = dataclasses.replace(BASE, backing=backing, threads=2, working_set=1.0)
    _, sock = launch(params)
    with GuestClient(sock) as guest:
        info = guest.status()
        reader = RamReader(guest, info)
        log = open_dirty_log(name, guest, info)
        try:
            log.start()
            snaps, harvests = [reader.snapshot()], []
            for _ in range(10):  # bounded
                time.sleep(0.01)
                harvests.append(pages_of(log.harvest()))
                snaps.append(reader.snapshot())
            harvests.append(pages_of(log.harvest()))
            assert guest.status()["state"] == "running"  # soft-dirty resumed it every time
        finally:
            log.stop()
            reader.close()
        guest.quit()
    written_total = 0
    for i in range(len(snaps) - 1):
        changed = changed_pages(snaps[i], snaps[i + 1])
        written_total += len(changed)
        missing = changed - harvests[i] - harvests[i + 1]
        assert not missing, f"interval {i}: pages written but never reported: {sorted(missing)[:20]}"
    assert written_total > 100  # the writers did run meanwhile


# ---- the guest is left as it was --------------------------------------------------------------


@pytest.mark.parametrize("name", BACKEND_PARAMS)
def test_tracking_keeps_the_guest_result_and_its_stop_point(launch, name):
    """Harvests while the guest runs towards --pause-at K: soft-dirty's pause/resume
    must keep the stop point, and neither backend may change what the guest computes."""
    require_backend(name)
    params = dataclasses.replace(BASE, workload="hotspot", steps=6000, rate=20_000)
    half = params.steps // 2
    proc, sock = launch(params, pause_at=half)
    with GuestClient(sock) as guest:
        log = open_dirty_log(name, guest, guest.status())
        log.start()
        seen = 0
        while guest.status()["state"] == "running":
            seen += len(log.harvest())
            time.sleep(0.005)
        status = guest.status()
        assert status["state"] == "paused" and status["steps"] == [half, half]
        assert seen > 0
        log.stop()
        log.stop()  # idempotent
        assert not guest.status()["dirty_tracking"]
        guest.resume()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert parse_final_hash(out) == reference_hash(params)


def test_soft_dirty_pauses_only_a_running_guest(launch):
    """The harvest's pause/resume, exercised on any kernel: the backend is made
    directly (its bits simply never get set where soft-dirty is missing). A paused
    guest stays paused; a running one runs on after each harvest."""
    from postcopy.kernel.dirtylog.softdirty import SoftDirtyLog

    _, sock = launch(dataclasses.replace(BASE, rate=5000), start_paused=True)
    with GuestClient(sock) as guest:
        log = SoftDirtyLog(guest, guest.status())
        with log:
            log.start()
            log.harvest()
            assert guest.status()["state"] == "paused" and log.last_pause_ms == 0
            guest.resume()
            log.harvest()
            assert guest.status()["state"] == "running" and log.last_pause_ms > 0
            steps = guest.status()["steps"]
            deadline = time.monotonic() + 60  # it runs on: every vCPU passes where any was
            while min(guest.status()["steps"]) <= max(steps) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert min(guest.status()["steps"]) > max(steps)
        guest.quit()


def test_soft_dirty_reports_memfd_data_without_a_pte(launch):
    """A shared page that lost its PTE (reclaim to swap) keeps its data but not its
    soft-dirty bit: the backend reports every page that has data in the memfd and no
    PTE. Made here by writing through another mapping of the memfd, which the guest
    never maps in; runs on any kernel."""
    from postcopy.kernel.dirtylog.softdirty import SoftDirtyLog

    _, sock = launch(dataclasses.replace(BASE, working_set=0.5), start_paused=True)
    with GuestClient(sock) as guest:
        log = SoftDirtyLog(guest, guest.status())
        _, fds = guest.take_fds()
        with log, mmap.mmap(fds["memfd"], RAM, mmap.MAP_SHARED) as ram:
            log.start()
            assert log.harvest() == []  # what boot wrote is mapped in the guest (and old)
            ram[(NPAGES - 3) * PAGE] = 1  # past every working set: never mapped by the guest
            assert NPAGES - 3 in pages_of(log.harvest())
        os.close(fds["memfd"])
        guest.quit()


# ---- guest-side rules --------------------------------------------------------------------------


def test_pagemap_scan_refuses_a_guest_with_a_missing_mode_uffd(launch):
    require_backend("pagemap-scan")
    _, sock = launch(BASE, incoming=True)
    with GuestClient(sock) as guest:
        status = guest.status()
        assert status["uffd"] is True
        with pytest.raises(DirtyLogUnavailable, match="missing-mode userfaultfd"):
            open_dirty_log("pagemap-scan", guest, status)
        with pytest.raises(GuestError, match="only one userfaultfd context"):
            guest.dirty_track(True)
        guest.quit()


def test_dirty_track_command(launch):
    require_backend("pagemap-scan")
    _, sock = launch(BASE, start_paused=True)
    with GuestClient(sock) as guest:
        assert guest.dirty_track(True) == {"ok": True, "tracking": True, "restarted": False}
        assert guest.status()["dirty_tracking"] is True
        with pytest.raises(GuestError, match="dirty_track off first"):
            guest.discard([(RAM - PAGE, PAGE)])
        assert guest.dirty_track(True)["restarted"] is True
        assert guest.dirty_track(False)["was"] is True
        assert guest.dirty_track(False)["was"] is False
        with pytest.raises(GuestError, match="boolean"):
            guest.request("dirty_track", on="yes")
        for bad in ([NPAGES], [-1], ["x"], "all"):
            with pytest.raises(GuestError, match="page indexes"):
                guest.request("touch", pages=bad)
        with pytest.raises(GuestError, match="does not fit"):
            guest.touch_spread(NPAGES - 10, 20, 5)
        assert guest.touch_spread(0, NPAGES, 50, seed=3) == 50
        guest.quit()


def test_touch_spread_writes_distinct_pages(launch):
    require_backend("pagemap-scan")
    _, sock = launch(BASE, start_paused=True)
    with GuestClient(sock) as guest:
        log = open_dirty_log("pagemap-scan", guest, guest.status())
        with log:
            log.start()
            for n, span in ((1, 1), (100, 1000), (999, 1000), (300, 300)):
                guest.touch_spread(7, span, n, seed=n)
                pages = pages_of(log.harvest())
                assert len(pages) == n and pages <= set(range(7, 7 + span))
        guest.quit()


def test_harvest_table_smoke():
    from postcopy.bench.harvest import C_LOOP, format_side_by_side, format_table, harvest_table

    backends = [name for name, reason in available_backends().items() if reason is None]
    if not backends:
        pytest.skip("no dirty log on this kernel: " + "; ".join(available_backends().values()))
    rows = harvest_table(sizes=(16 << 20,), dirty=(0, 100, 10**9), repeats=2)
    expect = {"pagemap-read", *backends, *(C_LOOP[b] for b in backends)}
    assert {r["method"] for r in rows} == expect
    assert {r["dirty_pages"] for r in rows} == {0, 100}  # more pages than RAM: left out
    for r in rows:
        assert r["ram_bytes"] == 16 << 20 and r["harvest_ms"] >= r["harvest_ms_min"] >= 0
        if r["method"] != "pagemap-read":  # exactly the pages touched, plus the state page
            assert r["dirty_pages"] <= r["reported_pages"] <= r["dirty_pages"] + 1
        if r["method"] in ("soft-dirty", "c-soft-dirty"):  # paused across read + clear
            assert r["pause_ms"] > 0
    text = format_table(rows)
    assert all(method in text for method in expect) and "16 MiB" in text
    side = format_side_by_side(rows).splitlines()
    assert len(side) == 2 + 2  # header, rule, one line per (RAM, dirty count)
    assert all(f"{abbrev} C ms" in side[0] for name, abbrev in (("soft-dirty", "SD"), ("pagemap-scan", "PS"))
               if name in backends)
