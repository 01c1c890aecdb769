"""The guest runtime: determinism of the RAM, pause/resume, control socket, fd hand-over
and an incoming guest whose faults the test serves from a paused guest's memfd."""
from __future__ import annotations

import dataclasses
import mmap
import os
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

from conftest import require_uffd as need_uffd

from postcopy.guest import GuestClient, GuestError, GuestParams, parse_final_hash, reference_hash

RAM = 4 << 20
PAGE = mmap.PAGESIZE
BASE = GuestParams(ram=RAM, threads=2, workload="random-write", seed=7, steps=40_000)




def run_guest(params: GuestParams, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(params.argv() + list(extra), capture_output=True, text=True, timeout=60)


def wait_state(client: GuestClient, state: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.status()
        if status["state"] == state:
            return status
        assert time.monotonic() < deadline, f"guest never reached {state}: {status}"
        time.sleep(0.01)


def final_hash_of(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [line for line in out.splitlines() if not line.startswith("max_step_gap_ns ")]  # incoming guests
    assert len(lines) == 1, out
    return parse_final_hash(out)


# ---- determinism ----------------------------------------------------------------------


@pytest.mark.parametrize("workload", ["idle", "random-write", "sequential", "hotspot"])
def test_same_parameters_same_hash(workload):
    params = dataclasses.replace(BASE, workload=workload, steps=150 if workload == "idle" else 40_000,
                                 working_set=0.5)
    first, second = run_guest(params), run_guest(params)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    assert len(first.stdout.splitlines()) == 1
    assert len(parse_final_hash(first.stdout)) == 16


def test_backings_give_the_same_hash():
    memfd = reference_hash(dataclasses.replace(BASE, backing="memfd"))
    anon = reference_hash(dataclasses.replace(BASE, backing="anon"))
    assert memfd == anon


def test_parameters_change_the_hash():
    hashes = {reference_hash(p) for p in (
        BASE,
        dataclasses.replace(BASE, seed=8),
        dataclasses.replace(BASE, workload="hotspot"),
        dataclasses.replace(BASE, steps=BASE.steps - 1),
        dataclasses.replace(BASE, working_set=0.5),
    )}
    assert len(hashes) == 5


def test_rate_is_timing_not_state():
    limited = run_guest(dataclasses.replace(BASE, steps=300, rate=20_000))
    assert limited.returncode == 0, limited.stderr
    assert parse_final_hash(limited.stdout) == reference_hash(dataclasses.replace(BASE, steps=300))


# ---- pause / resume -------------------------------------------------------------------


@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_split_run_equals_straight_run(launch, backing):
    params = dataclasses.replace(BASE, backing=backing)
    half = params.steps // 2
    proc, sock = launch(params, pause_at=half)
    with GuestClient(sock) as guest:
        status = wait_state(guest, "paused")
        assert status["steps"] == [half, half]
        first = guest.hash()
        time.sleep(0.05)
        assert guest.hash() == first  # nothing moves while paused
        assert guest.status()["steps"] == [half, half]
        resumed = guest.resume()
        assert resumed["resumed_ns"] > 0
    assert final_hash_of(proc) == reference_hash(params)
    assert first != reference_hash(params)


def test_run_until_and_async_pauses_keep_the_result(launch):
    # Rate limited so that the pauses land at arbitrary steps while it runs.
    params = dataclasses.replace(BASE, workload="hotspot", steps=3000, rate=20_000)
    proc, sock = launch(params, start_paused=True)
    with GuestClient(sock) as guest:
        assert guest.status()["state"] == "paused"
        parked = guest.run_until(500)
        assert parked["state"] == "paused" and parked["steps"] == [500, 500]
        for _ in range(3):
            guest.resume()
            time.sleep(0.02)
            reply = guest.pause()
            assert reply["state"] == "paused"
            assert reply["steps"] == guest.status()["steps"]
        guest.resume()
    assert final_hash_of(proc) == reference_hash(params)


def test_timing_fields(launch):
    params = dataclasses.replace(BASE, steps=None, rate=2000)
    _, sock = launch(params, start_paused=True)
    with GuestClient(sock) as guest:
        status = guest.status()
        assert status["state"] == "paused"
        assert status["first_step_after_resume_ns"] is None and status["last_heartbeat_ns"] is None
        resumed = guest.resume()["resumed_ns"]
        status = wait_state_steps(guest)
        assert status["state"] == "running" and status["resumed_ns"] == resumed
        assert status["first_step_after_resume_ns"] >= resumed
        assert status["last_heartbeat_ns"] >= status["first_step_after_resume_ns"]
        paused = guest.pause()
        assert paused["paused_ns"] >= paused["last_heartbeat_ns"] >= resumed
        # a second resume resets the first-step time
        again = guest.resume()["resumed_ns"]
        status = wait_state_steps(guest, above=max(paused["steps"]))
        assert status["first_step_after_resume_ns"] >= again > paused["paused_ns"]
        guest.quit()


def test_pause_says_what_it_stopped_and_resume_keeps_the_stop_point(launch):
    """What a brief pauser (the soft-dirty harvest) needs: ``was`` and ``stop_at`` in
    the pause reply, and resume with that stop_at parks at the same step."""
    params = dataclasses.replace(BASE, steps=None, rate=20_000)
    _, sock = launch(params, pause_at=2000)
    with GuestClient(sock) as guest:
        first = guest.pause()
        assert first["was"] == "running" and first["stop_at"] == 2000
        assert guest.pause()["was"] == "paused"
        guest.resume(stop_at=first["stop_at"])
        assert wait_state(guest, "paused")["steps"] == [2000, 2000]
        with pytest.raises(GuestError, match="stop_at"):
            guest.request("resume", stop_at=-1)
        guest.quit()


def test_touch_and_step_gaps_leave_the_state_alone(launch):
    proc, sock = launch(BASE, pause_at=BASE.steps // 2)
    with GuestClient(sock) as guest:
        wait_state(guest, "paused")
        before = guest.hash()
        assert guest.touch([0, 1, RAM // PAGE - 1]) == 3
        assert guest.touch_spread(0, RAM // PAGE, RAM // PAGE) == RAM // PAGE  # every page
        assert guest.hash() == before  # a write, but of what was there
        assert guest.max_step_gap_ns() > 0 and guest.max_step_gap_ns() == 0  # read and reset
        assert guest.status()["free_pages"] == 0 and guest.free_ranges() == []
        guest.resume()
    assert final_hash_of(proc) == reference_hash(BASE)


def wait_state_steps(guest: GuestClient, above: int = 0) -> dict:
    deadline = time.monotonic() + 20
    while True:
        status = guest.status()
        if min(status["steps"]) > above and status["first_step_after_resume_ns"]:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.005)


# ---- control socket -------------------------------------------------------------------


def test_control_errors_and_quit(launch):
    proc, sock = launch(dataclasses.replace(BASE, steps=None, rate=1000))
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    with GuestClient(sock) as guest:
        status = guest.status()
        assert status["state"] == "running" and status["pid"] == proc.pid
        assert status["ram_size"] == RAM and status["page_size"] == PAGE and status["threads"] == 2
        assert status["workload"] == "random-write" and status["uffd"] is False
        with pytest.raises(GuestError, match="paused or finished"):
            guest.hash()
        with pytest.raises(GuestError, match="already running"):
            guest.resume()
        with pytest.raises(GuestError, match="pause first"):
            guest.discard([(0, PAGE)])
        with pytest.raises(GuestError, match="unknown command"):
            guest.request("frobnicate")
        guest.pause()
        for bad, why in (([[1, PAGE]], "aligned"), ([[RAM, PAGE]], "beyond"), ([[0, 0]], "aligned"),
                         ([["x", PAGE]], "integers"), ([[0]], "integers"), ("all", "list")):
            with pytest.raises(GuestError, match=why):
                guest.request("discard", ranges=bad)
        guest.quit()
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and out == ""
    assert not os.path.exists(sock)


def test_linger_serves_after_finishing(launch):
    proc, sock = launch(BASE, linger=True)
    line = proc.stdout.readline()
    with GuestClient(sock) as guest:
        status = wait_state(guest, "finished")
        assert status["steps"] == [BASE.steps] * 2
        assert line == f"final_hash {guest.hash()}\n"
        with pytest.raises(GuestError, match="finished"):
            guest.resume()
        guest.quit()
    assert proc.wait(timeout=20) == 0


@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_take_fds(launch, backing):
    proc, sock = launch(dataclasses.replace(BASE, backing=backing), start_paused=True)
    with GuestClient(sock) as guest:
        info, fds = guest.take_fds()
        try:
            assert info["pid"] == proc.pid and info["ram_size"] == RAM and info["page_size"] == PAGE
            assert info["backing"] == backing and info["ram_address"] == guest.status()["ram_address"]
            if backing == "anon":
                assert info["fds"] == [] and fds == {}
                return
            assert info["fds"] == ["memfd"] and set(fds) == {"memfd"}
            assert os.fstat(fds["memfd"]).st_size == RAM
            with mmap.mmap(fds["memfd"], RAM, mmap.MAP_SHARED, mmap.PROT_READ) as ram:
                assert ram[:8] == b"PCGUEST1"
                assert struct.unpack_from("<Q", ram, 16)[0] == RAM
        finally:
            for fd in fds.values():
                os.close(fd)
        guest.quit()


def read_guest_ram(pid: int, address: int, offset: int, length: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(address + offset)
        return mem.read(length)


@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_discard_makes_pages_read_zero(launch, backing):
    params = dataclasses.replace(BASE, backing=backing, working_set=0.5)
    proc, sock = launch(params, linger=True)
    with GuestClient(sock) as guest:
        wait_state(guest, "finished")
        before = guest.hash()
        status = guest.status()
        # The last page of RAM is past every working set: never written.
        guest.discard([(RAM - PAGE, PAGE)])
        assert guest.hash() == before
        # The first private slice starts after state page and shared slice (RAM/16).
        slice0 = PAGE + RAM // 16
        rng = (slice0, 4 * PAGE)
        assert read_guest_ram(proc.pid, status["ram_address"], *rng) != bytes(rng[1])
        reply = guest.discard([rng])
        assert reply["discarded"] == rng[1]
        assert guest.hash() != before
        if backing == "memfd":
            _, fds = guest.take_fds()
            try:  # a hole in the memfd, not just unmapped (checked before reading populates it)
                assert os.lseek(fds["memfd"], rng[0], os.SEEK_DATA) >= rng[0] + rng[1]
            finally:
                os.close(fds["memfd"])
        assert read_guest_ram(proc.pid, status["ram_address"], *rng) == bytes(rng[1])
        guest.quit()


# ---- command line ---------------------------------------------------------------------


@pytest.mark.parametrize("args, reason", [
    (["--ram", "4097"], "page size"),
    (["--ram", "16K", "--threads", "4"], "too small"),
    (["--ram", "4M", "--workload", "bogus"], "invalid choice"),
    (["--ram", "4M", "--working-set", "0"], "working-set"),
    (["--ram", "4M", "--threads", "100"], "threads"),
    (["--ram", "lots"], "size"),
    (["--ram", "4M", "--incoming", "--threads", "2", "--control", "/nonexistent/x"], "--threads"),
    (["--ram", "4M", "--start-paused"], "--control"),
])
def test_bad_command_line_exits_2(args, reason):
    proc = subprocess.run([sys.executable, "-m", "postcopy", "guest", *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and reason in errors[0], proc.stderr


# ---- incoming guest, faults served by the test -----------------------------------------


class FaultServer(threading.Thread):
    """A minimal postcopy destination: every missing-page fault of the incoming guest is
    answered with UFFDIO_COPY of the same page of the source guest's RAM (its memfd
    mapped here); REMOVE events (from ``discard``) are collected."""

    def __init__(self, uffd_fd: int, features: int, base: int, source: mmap.mmap):
        super().__init__(daemon=True)
        from postcopy.kernel.uffd import Userfaultfd, address_of

        self.uffd = Userfaultfd.from_fd(os.dup(uffd_fd), features)
        self.base, self.source, self.src = base, source, address_of(source)
        self.faults: list[int] = []
        self.removed: list[tuple[int, int]] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def install(self, offset: int, length: int = PAGE) -> None:
        from postcopy.kernel.uffd import PageExistsError

        try:
            self.uffd.copy(self.base + offset, self.src + offset, length)
        except PageExistsError:  # two vCPUs faulted on one page: both are woken
            pass

    def complete(self, size: int) -> None:
        """What a destination does last: every page in (the rest copied from the
        source), then unregister. An incoming guest hashes and exits only after it."""
        for offset in range(0, size, PAGE):
            self.install(offset)
        self.uffd.unregister(self.base, size)

    def run(self) -> None:
        from postcopy.kernel.uffd import EventKind

        try:
            while not self.stop.is_set():
                for event in self.uffd.read_events(timeout=0.02):
                    if event.kind is EventKind.PAGEFAULT:
                        self.faults.append(event.address - self.base)
                        self.install(event.address - self.base)
                    elif event.kind is EventKind.REMOVE:
                        self.removed.append((event.address - self.base, event.end - event.address))
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.join()
        self.uffd.close()
        assert self.error is None, self.error


def runs(pages: list[int]) -> list[tuple[int, int]]:
    """Coalesce sorted page numbers into (offset, length) byte ranges."""
    out: list[list[int]] = []
    for page in pages:
        if out and out[-1][0] + out[-1][1] == page:
            out[-1][1] += 1
        else:
            out.append([page, 1])
    return [(first * PAGE, n * PAGE) for first, n in out]


@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_incoming_guest_finishes_with_reference_hash(launch, backing):
    need_uffd()
    params = dataclasses.replace(BASE, backing=backing)
    half = params.steps // 2
    # The source: a memfd guest parked at half its steps.
    _, src_sock = launch(dataclasses.replace(params, backing="memfd"), name="src", pause_at=half)
    dst, dst_sock = launch(params, name="dst", incoming=True)
    with GuestClient(src_sock) as source, GuestClient(dst_sock) as target:
        wait_state(source, "paused")
        _, src_fds = source.take_fds()
        info, dst_fds = target.take_fds(incoming=True)
        status = target.status()
        assert status["state"] == "incoming" and status["uffd"] is True and status["steps"] == []
        assert info["fds"] == (["memfd", "uffd"] if backing == "memfd" else ["uffd"])
        with pytest.raises(GuestError, match="paused or finished"):
            target.hash()
        with mmap.mmap(src_fds["memfd"], RAM, mmap.MAP_SHARED, mmap.PROT_READ) as src_ram:
            server = FaultServer(dst_fds["uffd"], info["uffd_features"], info["ram_address"], src_ram)
            server.start()
            try:
                time.sleep(0.05)
                assert server.faults == []  # nothing touches incoming RAM before resume
                target.resume()
                wait_state(target, "finished")  # on the pages it faulted in
                server.complete(RAM)
                result = final_hash_of(dst)
            finally:
                server.close()
        for fd in (*src_fds.values(), *dst_fds.values()):
            os.close(fd)
        assert server.faults[0] == 0  # the state page comes first
        assert result == reference_hash(params)
        source.quit()


@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_incoming_precopy_discard_postcopy(launch, backing):
    """The migration's whole trick in miniature: copy a snapshot in before resume, let
    the source run on, discard the pages that went stale (they become missing again),
    resume and serve those on demand. The result is the reference run's."""
    need_uffd()
    from postcopy.kernel.uffd import Feature

    params = dataclasses.replace(BASE, backing=backing, workload="hotspot", working_set=0.5)
    _, src_sock = launch(dataclasses.replace(params, backing="memfd"), name="src", start_paused=True)
    dst, dst_sock = launch(params, name="dst", incoming=True, linger=True)
    with GuestClient(src_sock) as source, GuestClient(dst_sock) as target:
        source.run_until(params.steps // 4)
        _, src_fds = source.take_fds()
        info, dst_fds = target.take_fds(incoming=True)
        with mmap.mmap(src_fds["memfd"], RAM, mmap.MAP_SHARED, mmap.PROT_READ) as src_ram:
            server = FaultServer(dst_fds["uffd"], info["uffd_features"], info["ram_address"], src_ram)
            server.start()
            try:
                snapshot = bytes(src_ram)
                sent = [p for p in range(RAM // PAGE) if any(snapshot[p * PAGE:(p + 1) * PAGE])]
                for offset, length in runs(sent):  # "precopy": populated pages only
                    server.install(offset, length)
                source.run_until(params.steps // 2)
                stale = [p for p in sent if snapshot[p * PAGE:(p + 1) * PAGE] != src_ram[p * PAGE:(p + 1) * PAGE]]
                assert 0 in stale and len(stale) < len(sent)
                target.discard(runs(stale))
                if info["uffd_features"] & Feature.EVENT_REMOVE:
                    assert sorted(server.removed) == runs(stale)
                target.resume()
                for offset, length in runs(stale):  # the "pusher": whatever did not fault
                    for page in range(offset, offset + length, PAGE):
                        server.install(page)
                wait_state(target, "finished")
                with pytest.raises(GuestError, match="every page in"):
                    target.hash()  # pages it never touched are still on the source
                server.complete(RAM)
                result = target.hash()
            finally:
                server.close()
        for fd in (*src_fds.values(), *dst_fds.values()):
            os.close(fd)
        # Faults only where the destination had nothing valid: stale or never sent.
        valid = set(sent) - set(stale)
        assert server.faults and not valid & {offset // PAGE for offset in server.faults}
        assert result == reference_hash(params)
        target.quit()
        source.quit()
