"""The destination's C install loop (copy path) and fault loop, in-process on an
anonymous mapping registered with a userfaultfd: removed pages are never filled,
EEXIST wakes (or overwrites a precopy resend), a changing mapping is retried or
refused, faults become coalesced requests, zero pages and removals are served in C.

Threads touch registered memory only through native helpers that release the GIL."""
from __future__ import annotations

import ctypes
import mmap
import os
import socket
import threading

import pytest

from conftest import require_uffd
from postcopy import report
from postcopy._native import ffi, lib
from postcopy.kernel.uffd import (PAGE_SIZE, Feature, MappingChangedError, Mode, Userfaultfd, address_of,
                                  supported_features)
from postcopy.migration.faults import FaultServer, UrgentLender
from postcopy.migration.install import CopyPath, InstallError, InstallTarget
from postcopy.migration.pagetable import PRESENT, REMOVED, REQUESTED, ZERO, PageTable, StopEvent
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel
from postcopy.protocol.layout import Layout

PS = PAGE_SIZE
NPAGES = 64


def _pattern(first: int, npages: int, salt: int = 0) -> bytes:
    return b"".join(bytes([(first + i + salt) % 251 + 1]) * PS for i in range(npages))


class Guest:
    """An anonymous mapping registered for missing faults, its table and install path."""

    def __init__(self, features: Feature = Feature(0)) -> None:
        self.map = mmap.mmap(-1, NPAGES * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map.madvise(mmap.MADV_NOHUGEPAGE)
        self.base = address_of(self.map)
        self.uffd = Userfaultfd(features)
        self.uffd.register(self.base, NPAGES * PS, Mode.MISSING)
        self.table = PageTable(NPAGES, report.PAGE_CAUSES)
        self.stop = StopEvent()
        self.stop.attach(self.table)
        self.ram_fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
        self.target = InstallTarget(table=self.table, uffd=self.uffd, gate=self.table.gate, base=self.base,
                                    page_size=PS, ram_fd=self.ram_fd, ram_fd_base=self.base, memfd=None,
                                    stop=self.stop)
        self.path = CopyPath(self.target)
        self.readers: list[threading.Thread] = []  # joined before the mapping goes

    def page(self, page: int) -> bytes:
        """The bytes of an installed page (never call it on a missing one)."""
        assert self.table[page] == PRESENT
        return ctypes.string_at(self.base + page * PS, PS)

    def close(self) -> None:
        self.stop.set()
        self.uffd.close()  # wakes any thread still blocked on a fault
        for reader in self.readers:  # out of the mapping before it is unmapped (SIGSEGV otherwise)
            reader.join()
        os.close(self.ram_fd)


@pytest.fixture
def guest():
    require_uffd()
    made: list[Guest] = []

    def make(features: Feature = Feature(0)) -> Guest:
        made.append(Guest(features))
        return made[-1]

    yield make
    for g in made:
        g.close()


class Reader(threading.Thread):
    """Reads one byte per page of [page, page+npages) from C (GIL released)."""

    def __init__(self, g: Guest, page: int, npages: int = 1) -> None:
        super().__init__(daemon=True)
        self.addr, self.length = g.base + page * PS, npages * PS
        g.readers.append(self)
        self.sum: int | None = None

    def run(self) -> None:
        self.sum = lib.pc_mem_read_sum(self.addr, self.length, PS)

    def blocked_on_fault(self) -> bool:
        """Asleep outside any syscall: waiting on its userfault."""
        task = f"/proc/self/task/{self.native_id}"
        try:
            state = open(f"{task}/stat").read().rsplit(")", 1)[1].split()[0]
            return state == "S" and open(f"{task}/syscall").read().startswith("-1 ")
        except (FileNotFoundError, TypeError):
            return False


def _until(predicate) -> None:
    """Wait for an observable state (no deadline: pytest's timeout guards)."""
    event = threading.Event()
    while not predicate():
        event.wait(0.001)


# -- install (copy path) ---------------------------------------------------------------

def test_install_skips_removed_pages_and_counts_exactly(guest):
    g = guest()
    g.table.removed(3, 5, by_guest=True)
    g.path.install(0, 8, _pattern(0, 8), wire.Cause.PUSHED)
    assert [g.table[p] for p in range(8)] == [PRESENT] * 3 + [REMOVED] * 2 + [PRESENT] * 3
    assert g.table.pages["pushed"] == 6
    assert all(g.page(p) == _pattern(p, 1) for p in (0, 1, 2, 5, 6, 7))


def test_existing_pages_are_skipped_unless_a_precopy_resend_overwrites_them(guest):
    g = guest()
    g.path.install(5, 1, _pattern(5, 1, salt=1), wire.Cause.DEMAND)
    g.path.install(4, 3, _pattern(4, 3, salt=2), wire.Cause.PUSHED)  # 5 is there: EEXIST, skipped
    assert g.page(5) == _pattern(5, 1, salt=1) and g.page(4) == _pattern(4, 1, salt=2)
    assert g.table.pages["demand"] == 1 and g.table.pages["pushed"] == 2
    g.path.install(4, 2, _pattern(4, 2, salt=3), wire.Cause.PRECOPY)  # written in place
    assert g.page(4) == _pattern(4, 1, salt=3) and g.page(5) == _pattern(5, 1, salt=3)
    assert g.table.pages["precopy"] == 2 and g.table.count_in == 3


def test_install_wakes_a_waiter_and_records_its_latency(guest):
    g = guest()
    reader = Reader(g, 9)
    reader.start()
    _until(reader.blocked_on_fault)
    g.table.fault(9, 1_000)  # as the fault loop would, with a known read time
    g.path.install(8, 4, _pattern(8, 4), wire.Cause.DEMAND)
    reader.join()
    assert reader.sum == _pattern(9, 1)[0]
    [(read_ns, us)] = g.table.faults
    assert read_ns == 1_000 and us > 0


def test_a_mapping_that_changes_is_retried_then_refused(guest):
    g = guest()
    g.uffd.unregister(g.base, NPAGES * PS)  # every copy now gets ENOENT, and no event explains it
    with pytest.raises(InstallError, match="page 2 stayed unmappable"):
        g.path.install(2, 2, _pattern(2, 2), wire.Cause.PUSHED)
    g.stop.set()  # the migration ends: no more retries
    with pytest.raises(MappingChangedError):
        g.path.install(2, 2, _pattern(2, 2), wire.Cause.PUSHED)
    assert g.table.count_in == 0


def test_a_run_shorter_than_its_pages_is_refused(guest):
    g = guest()
    with pytest.raises(InstallError, match="too few"):
        g.path.install(0, 2, b"x" * PS, wire.Cause.PUSHED)


# -- the fault loop ----------------------------------------------------------------------

class Server:
    """The fault server in a thread; requests are answered by installing the pages."""

    def __init__(self, g: Guest, spin: bool = False) -> None:
        self.g = g
        self.requests: list[tuple[int, int]] = []
        self.server = FaultServer(g.target, g.path, spin=spin)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(self._answer)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.errors.append(exc)

    def _answer(self, runs: list[tuple[int, int]]) -> None:
        self.requests.extend(runs)
        for first, count in runs:
            self.g.path.install(first, count, _pattern(first, count), wire.Cause.DEMAND)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.g.stop.set()
        self.thread.join()
        assert not self.errors, self.errors


def test_neighbouring_faults_of_one_batch_are_one_request(guest):
    g = guest()
    readers = [Reader(g, 10), Reader(g, 11), Reader(g, 13)]
    for reader in readers:
        reader.start()
    _until(lambda: all(r.blocked_on_fault() for r in readers))  # three events queued
    with Server(g) as server:
        for reader in readers:
            reader.join()
    assert server.requests == [(10, 2), (13, 1)]
    assert [r.sum for r in readers] == [_pattern(p, 1)[0] for p in (10, 11, 13)]
    assert g.table.pages["demand"] == 3 and len(g.table.faults) == 3


@pytest.mark.parametrize("spin", [False, True], ids=["sleep", "spin"])
def test_zero_pages_are_filled_in_c_and_never_asked_for(guest, spin):
    g = guest()
    g.table.mark_zero(20, 4)
    with Server(g, spin) as server:
        reader = Reader(g, 20, 4)
        reader.start()
        reader.join()
    assert reader.sum == 0 and server.requests == []
    assert [g.table[p] for p in range(20, 24)] == [ZERO] * 4
    assert len(g.table.faults) == 4


def test_a_waiter_on_a_page_marked_zero_later_is_zero_filled(guest):
    g = guest()
    g.stop.set()  # no loop: the fault is read by hand
    reader = Reader(g, 30)
    reader.start()
    _until(reader.blocked_on_fault)
    [event] = g.uffd.read_events(1, timeout=None)
    g.table.fault((event.address - g.base) // PS, 5)
    server = FaultServer(g.target, g.path)
    server.mark_zero(28, 4)
    reader.join()
    assert reader.sum == 0 and g.table.faults[0][0] == 5


def test_removed_ranges_are_marked_before_the_zap_and_never_filled(guest):
    if not supported_features() & Feature.EVENT_REMOVE:
        pytest.skip("kernel does not offer UFFD_FEATURE_EVENT_REMOVE")
    g = guest(Feature.EVENT_REMOVE)
    g.path.install(38, 8, _pattern(38, 8), wire.Cause.PUSHED)
    g.table.switched()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with Server(g) as server:
        # madvise returns once the loop has read the REMOVE event (and marked the range).
        assert libc.madvise(g.base + 40 * PS, 4 * PS, mmap.MADV_DONTNEED) == 0
        assert [g.table[p] for p in range(38, 46)] == [PRESENT] * 2 + [REMOVED] * 4 + [PRESENT] * 2
        assert g.table.removed_by_guest == 4
        g.path.install(38, 8, _pattern(38, 8, salt=9), wire.Cause.PUSHED)  # a late run: 40..43 stay holes
        reader = Reader(g, 40, 4)
        reader.start()
        reader.join()
    assert reader.sum == 0 and server.requests == []
    assert g.table.pages["pushed"] == 8  # the late run's present pages hit EEXIST: not counted again


# -- requests sent by the fault loop itself ------------------------------------------------

@pytest.mark.parametrize("first,npages", [(0, 1), (17, 3), (2**40 + 5, 1), (2**64 - 2, 1)])
def test_the_c_request_frame_is_the_python_encoding(first, npages):
    table = PageTable(1, report.PAGE_CAUSES)
    lib.pc_dp_set_request_template(table.native, wire.PageRequest(first_page=0, npages=1).encode())
    out = ffi.new("uint8_t[]", lib.PC_DP_REQUEST_BYTES)
    lib.pc_dp_encode_request(table.native, first, npages, out)
    assert ffi.buffer(out)[:] == wire.PageRequest(first_page=first, npages=npages).encode()


def _channels(authenticated: bool) -> tuple[Channel, Channel]:
    """(destination's urgent end, source's end) of a socketpair, keyed as a handshake would."""
    a, b = socket.socketpair()
    layout = Layout(PS, ((0, NPAGES * PS),))
    dest, source = Channel(a, "urgent", layout), Channel(b, "urgent", layout)
    if authenticated:
        k1, k2 = os.urandom(32), os.urandom(32)
        dest.secure(k1, k2)
        source.secure(k2, k1)
    return dest, source


@pytest.mark.parametrize("authenticated", [True, False], ids=["tagged", "untagged"])
def test_the_fault_loop_sends_requests_the_python_decoder_accepts(guest, authenticated):
    """With the urgent channel lent, requests leave from C, tagged in sequence with the
    frames Python sent before; after it is taken back Python's sealer goes on from there."""
    g = guest()
    dest, source = _channels(authenticated)
    dest.send(wire.PageRequest(first_page=1, npages=1))  # sequence 0, from Python
    lender = UrgentLender(g.table)
    lender.lend(dest)
    readers = [Reader(g, 5), Reader(g, 6)]
    for reader in readers:
        reader.start()
    _until(lambda: all(r.blocked_on_fault() for r in readers))
    server = Server(g)
    with server:
        assert source.recv() == wire.PageRequest(first_page=1, npages=1)
        assert source.recv() == wire.PageRequest(first_page=5, npages=2)
        g.path.install(5, 2, _pattern(5, 2), wire.Cause.DEMAND)
        for reader in readers:
            reader.join()
    lender.take_back()
    dest.send(wire.PageRequest(first_page=9, npages=1))  # Python again, next sequence number
    assert source.recv() == wire.PageRequest(first_page=9, npages=1)
    assert server.requests == [] and lib.pc_dp_requests_sent(g.table.native) == 1
    dest.close()
    source.close()


def test_a_failed_send_takes_the_channel_back_and_reports_the_link_lost(guest):
    g = guest()
    dest, source = _channels(True)
    source.close()  # the link is gone
    lender = UrgentLender(g.table)
    lender.lend(dest)
    lost = threading.Event()
    server = FaultServer(g.target, g.path, lender=lender)

    def link_lost() -> None:
        assert dest._send_lock.acquire(blocking=False)  # taken back before the link is reported lost
        dest._send_lock.release()
        lost.set()
        g.stop.set()

    reader = Reader(g, 3)
    reader.start()
    thread = threading.Thread(target=server.run, args=(lambda runs: None, link_lost), daemon=True)
    thread.start()
    thread.join()
    assert lost.is_set() and g.table[3] == REQUESTED and g.table.waiting() == [3]
    lender.take_back()  # a second take back does nothing
    dest.close()


def test_requests_handed_back_unlent_go_through_a_loan_made_meanwhile(guest):
    """The loop hands runs back to Python while the urgent channel is not lent (during
    recovery); if recovery lends the new channel before Python sends them, they must go
    through the loan: the channel's own send would wait for ever on the lock the loan
    holds (this deadlock hung the link-loss test on a busy host)."""
    g = guest()
    dest, source = _channels(True)
    lender = UrgentLender(g.table)
    runs = ffi.new("uint64_t[]", [7, 2, 11, 1])
    fallback = []
    assert lender.send(runs, 2, lambda: fallback.append("python"))  # not lent: Python sends
    assert fallback == ["python"]
    lender.lend(dest)  # recovery lent the channel meanwhile
    done = []
    thread = threading.Thread(target=lambda: done.append(lender.send(runs, 2, lambda: fallback.append("x"))),
                              daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert done == [True] and fallback == ["python"]  # sent by the loan, not by a blocked Python send
    assert source.recv() == wire.PageRequest(first_page=7, npages=2)
    assert source.recv() == wire.PageRequest(first_page=11, npages=1)
    lender.take_back()
    dest.close()
    source.close()
