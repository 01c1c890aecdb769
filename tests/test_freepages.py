"""Free-page hints of the guest (--free-fraction): a deterministic hash whatever the
timing, free_ranges snapshots, free pages hashed as zero, and migrations in miniature
that skip the hinted pages (the destination holds garbage there) yet verify."""
from __future__ import annotations

import dataclasses
import mmap
import os
import subprocess
import threading
import time

import pytest

from conftest import require_uffd as need_uffd

from postcopy.guest import GuestClient, GuestParams, parse_final_hash, reference_hash

PAGE = mmap.PAGESIZE
RAM = 4 << 20
NPAGES = RAM // PAGE
BASE = GuestParams(ram=RAM, threads=2, workload="random-write", seed=5, steps=40_000, free_fraction=0.3)




def run_guest(params: GuestParams) -> str:
    proc = subprocess.run(params.argv(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return parse_final_hash(proc.stdout)


def final_hash_of(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return parse_final_hash(out)


def wait_state(client: GuestClient, state: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.status()
        if status["state"] == state:
            return status
        assert time.monotonic() < deadline, f"guest never reached {state}: {status}"
        time.sleep(0.01)


def free_pages(client: GuestClient) -> set[int]:
    return {p for off, length in client.free_ranges() for p in range(off // PAGE, (off + length) // PAGE)}


def data_pages(memfd: int, size: int) -> list[int]:
    """Pages of the memfd that hold data (SEEK_DATA/SEEK_HOLE)."""
    pages, pos = [], 0
    while pos < size:
        try:
            data = os.lseek(memfd, pos, os.SEEK_DATA)
        except OSError:
            break
        hole = min(os.lseek(memfd, data, os.SEEK_HOLE), size)
        pages.extend(range(data // PAGE, (hole + PAGE - 1) // PAGE))
        pos = hole
    return pages


def runs(pages) -> list[tuple[int, int]]:
    """Sorted page numbers -> (offset, length) byte ranges."""
    out: list[list[int]] = []
    for page in sorted(pages):
        if out and out[-1][0] + out[-1][1] == page:
            out[-1][1] += 1
        else:
            out.append([page, 1])
    return [(first * PAGE, n * PAGE) for first, n in out]


# ---- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("workload", ["random-write", "sequential", "hotspot"])
def test_hash_is_deterministic_with_free_pages(workload):
    params = dataclasses.replace(BASE, workload=workload)
    first = run_guest(params)
    assert run_guest(dataclasses.replace(params, backing="anon")) == first  # and backing-blind
    if workload == "random-write":
        assert run_guest(params) == first
        assert first != run_guest(dataclasses.replace(params, free_fraction=0.0))
        assert first != run_guest(dataclasses.replace(params, free_fraction=0.5))


def test_split_and_interrupted_runs_give_the_same_hash(launch):
    params = dataclasses.replace(BASE, workload="hotspot", steps=8000, rate=40_000)
    half = params.steps // 2
    proc, sock = launch(params, pause_at=half)
    with GuestClient(sock) as guest:
        assert wait_state(guest, "paused")["steps"] == [half, half]
        guest.resume()
        for _ in range(3):  # pauses at arbitrary steps: a swap never straddles one
            time.sleep(0.01)
            guest.pause()
            guest.resume()
    assert final_hash_of(proc) == reference_hash(params)


# ---- free_ranges ----------------------------------------------------------------------------


def test_free_ranges_snapshot(launch):
    params = dataclasses.replace(BASE, steps=None, rate=40_000)
    _, sock = launch(params)
    with GuestClient(sock) as guest:
        status = guest.status()
        assert status["free_fraction"] == pytest.approx(0.3) and status["free_pages"] > 0
        reply = guest.request("free_ranges")
        ranges = reply["ranges"]
        assert reply["free_pages"] == status["free_pages"] == sum(n for _, n in ranges) // PAGE
        shared_end = PAGE + RAM // 16  # state page and shared slice are never free
        for off, length in ranges:
            assert off % PAGE == 0 and length % PAGE == 0 and length > 0
            assert shared_end <= off and off + length <= RAM
        for (a, la), (b, _) in zip(ranges, ranges[1:]):
            assert a + la < b  # sorted and merged: no touching ranges
        first = free_pages(guest)
        deadline = time.monotonic() + 20
        while free_pages(guest) == first:  # the free set moves as the vCPUs run
            assert time.monotonic() < deadline, "free set never changed"
            time.sleep(0.01)
        guest.quit()


def test_no_free_pages_without_the_option(launch):
    _, sock = launch(dataclasses.replace(BASE, free_fraction=0.0), start_paused=True)
    with GuestClient(sock) as guest:
        assert guest.status()["free_pages"] == 0
        assert guest.free_ranges() == []
        guest.quit()


def test_free_pages_hash_as_zero(launch):
    """Garbage in a free page leaves the hash alone; in a page in use it does not."""
    params = dataclasses.replace(BASE, steps=None)
    _, sock = launch(params, start_paused=True)
    with GuestClient(sock) as guest:
        guest.run_until(5000)
        before = guest.hash()
        free = sorted(free_pages(guest))
        _, fds = guest.take_fds()
        with mmap.mmap(fds["memfd"], RAM, mmap.MAP_SHARED) as ram:
            for page in free[::7]:
                ram[page * PAGE:(page + 1) * PAGE] = b"\xab" * PAGE
            assert guest.hash() == before
            used = next(p for p in data_pages(fds["memfd"], RAM) if p > RAM // 16 // PAGE + 1 and p not in free)
            ram[used * PAGE] ^= 0xFF
            assert guest.hash() != before
        os.close(fds["memfd"])
        guest.quit()


def test_bad_free_fraction_exits_2():
    for value, reason in (("1", "free-fraction"), ("-0.1", "free-fraction"), ("nan", "free-fraction")):
        proc = subprocess.run([*BASE.argv()[:3], "guest", "--ram", "4M", "--free-fraction", value],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and reason in proc.stderr and "Traceback" not in proc.stderr


# ---- migrations in miniature ----------------------------------------------------------------


class FaultServer(threading.Thread):
    """Serves the incoming guest's missing-page faults with UFFDIO_COPY from the
    source's RAM (its memfd mapped here); installs whole runs on request."""

    def __init__(self, uffd_fd: int, features: int, base: int, source: mmap.mmap):
        super().__init__(daemon=True)
        from postcopy.kernel.uffd import Userfaultfd, address_of

        self.uffd = Userfaultfd.from_fd(os.dup(uffd_fd), features)
        self.base, self.source, self.src = base, source, address_of(source)
        self.faults: list[int] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def install(self, offset: int, length: int, src: int | None = None) -> None:
        """Copy [offset, +length) from the source (or from address src), page by page
        where a page already exists."""
        from postcopy.kernel.uffd import PageExistsError

        done = 0
        while done < length:
            try:
                done += self.uffd.copy(self.base + offset + done, (src or self.src + offset) + done, length - done)
            except PageExistsError:
                done += PAGE

    def run(self) -> None:
        from postcopy.kernel.uffd import EventKind

        try:
            while not self.stop.is_set():
                for event in self.uffd.read_events(timeout=0.02):
                    if event.kind is EventKind.PAGEFAULT:
                        self.faults.append(event.address - self.base)
                        self.install(event.address - self.base, PAGE)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.join()
        self.uffd.close()
        assert self.error is None, self.error


@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_migration_skipping_free_pages_verifies(launch, backing):
    """Source paused halfway; only its populated, non-free pages are copied, the free
    ones get garbage. The incoming guest must finish with the reference hash."""
    need_uffd()
    from postcopy.kernel.uffd import address_of

    params = dataclasses.replace(BASE, backing=backing)
    half = params.steps // 2
    _, src_sock = launch(dataclasses.replace(params, backing="memfd"), name="src", pause_at=half)
    dst, dst_sock = launch(params, name="dst", incoming=True)
    garbage = bytearray(b"\xa5" * RAM)
    with GuestClient(src_sock) as source, GuestClient(dst_sock) as target:
        wait_state(source, "paused")
        free = free_pages(source)
        _, src_fds = source.take_fds()
        info, dst_fds = target.take_fds(incoming=True)
        with mmap.mmap(src_fds["memfd"], RAM, mmap.MAP_SHARED, mmap.PROT_READ) as src_ram:
            server = FaultServer(dst_fds["uffd"], info["uffd_features"], info["ram_address"], src_ram)
            server.start()
            try:
                populated = data_pages(src_fds["memfd"], RAM)
                sent = [p for p in populated if p not in free]
                skipped = set(populated) & free
                assert free and skipped  # the hint did save something
                for off, length in runs(sent):
                    server.install(off, length)
                for off, length in runs(free):  # "stale" content where the hint said free
                    server.install(off, length, src=address_of(garbage) + off)
                target.resume()
                result = final_hash_of(dst)
            finally:
                server.close()
        for fd in (*src_fds.values(), *dst_fds.values()):
            os.close(fd)
        assert not {f // PAGE for f in server.faults} & set(sent)  # everything sent arrived
        assert result == reference_hash(params)
        source.quit()


@pytest.mark.precopy
def test_precopy_with_dirty_log_and_free_hint_verifies(launch):
    """The order the source agent uses, while the source runs: start the dirty log,
    then take the free hint, copy what is populated and not free, harvest and copy
    again; at the stop point a final harvest and copy, then resume the destination. A
    hinted page the guest takes back is zero-filled, so the log reports it and it is
    copied; a missed one would keep the garbage the destination holds there.

    Pages are written into the incoming guest's memfd (overwriting is what precopy
    rounds do; UFFDIO_COPY cannot overwrite); pages never copied fault and are served."""
    need_uffd()
    from postcopy.kernel.dirtylog import DirtyLogUnavailable, open_dirty_log

    params = dataclasses.replace(BASE, workload="hotspot", steps=90_000, rate=60_000)
    _, src_sock = launch(params, name="src", start_paused=True)
    dst, dst_sock = launch(params, name="dst", incoming=True)
    with GuestClient(src_sock) as source, GuestClient(dst_sock) as target:
        try:
            log = open_dirty_log("auto", source, source.status())
        except DirtyLogUnavailable as exc:
            pytest.skip(str(exc))
        source.run_until(params.steps // 5)
        _, src_fds = source.take_fds()
        info, dst_fds = target.take_fds(incoming=True)
        with mmap.mmap(src_fds["memfd"], RAM, mmap.MAP_SHARED, mmap.PROT_READ) as src_ram, \
                mmap.mmap(dst_fds["memfd"], RAM, mmap.MAP_SHARED) as dst_ram, log:
            server = FaultServer(dst_fds["uffd"], info["uffd_features"], info["ram_address"], src_ram)
            server.start()

            def copy(first: int, count: int) -> None:
                dst_ram[first * PAGE:(first + count) * PAGE] = src_ram[first * PAGE:(first + count) * PAGE]

            try:
                source.resume(stop_at=params.steps // 2)
                log.start()
                free = free_pages(source)
                for page in free:  # the destination holds garbage there
                    dst_ram[page * PAGE:(page + 1) * PAGE] = b"\x5a" * PAGE
                sent = [p for p in data_pages(src_fds["memfd"], RAM) if p not in free]
                for off, length in runs(sent):
                    copy(off // PAGE, length // PAGE)
                rounds = []
                for _ in range(3):
                    time.sleep(0.02)
                    rounds.append(log.harvest())
                    for first, count in rounds[-1]:
                        copy(first, count)
                wait_state(source, "paused")  # reached stop_at: the "switchover"
                rounds.append(log.harvest())
                for first, count in rounds[-1]:
                    copy(first, count)
                reused = free - free_pages(source)  # hinted free, taken back since
                reported = {p for r in rounds for first, count in r for p in range(first, first + count)}
                target.resume()
                result = final_hash_of(dst)
            finally:
                server.close()
        for fd in (*src_fds.values(), *dst_fds.values()):
            os.close(fd)
        assert free and all(rounds)
        assert reused and reused <= reported  # the log caught every page taken back
        assert result == reference_hash(params)
        source.quit()
