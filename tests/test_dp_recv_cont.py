"""The continue path's one-copy receive (native/dp_recv_cont.c): page runs received in C
straight into the memfd's page cache and mapped with UFFDIO_CONTINUE give the same page
table and the same guest bytes as the Python continue path; a forged or cut frame never
makes a page present and leaves none of its bytes in the page cache (a correct copy
lands after it); a REMOVE during a run wins; fuzzed frames and streams cut at random
points land exactly as the Python decoder and the table's rules say. In-process, on a
memfd mapping registered for missing and minor faults."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import random
import secrets
import socket
import struct
import termios
import threading

import pytest

from conftest import require_uffd
from postcopy import report
from postcopy._native import lib
from postcopy.kernel.uffd import Feature, Mode, Userfaultfd, address_of, supported_features
from postcopy.migration import dp_recv
from postcopy.migration.faults import FaultServer
from postcopy.migration.install import ContinuePath, InstallTarget
from postcopy.migration.pagetable import MISSING, PRESENT, REMOVED, REQUESTED, ZERO, PageTable, StopEvent
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel
from postcopy.protocol.layout import Layout
from postcopy.protocol.state import MIGRATION, Phase
from test_dest_native_io import PS, Reader, Server, _pattern, _until
from test_wire import mutate

NPAGES = 64
LAYOUT = Layout(PS, ((0, NPAGES * PS),))
SEND_KEY, RECV_KEY = bytes(range(32)), bytes(range(32, 64))


class MemfdGuest:
    """A memfd mapped shared and registered for missing and minor faults (as an incoming
    guest started with --uffd-minor), its table and the Python continue path."""

    def __init__(self, features: Feature = Feature(0)) -> None:
        self.memfd = os.memfd_create("dp-recv-cont-test", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, NPAGES * PS)
        self.map = mmap.mmap(self.memfd, NPAGES * PS, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.map.madvise(mmap.MADV_NOHUGEPAGE)
        self.base = address_of(self.map)
        self.uffd = Userfaultfd(features | Feature.MINOR_SHMEM)
        self.uffd.register(self.base, NPAGES * PS, Mode.MISSING | Mode.MINOR)
        self.table = PageTable(NPAGES, report.PAGE_CAUSES)
        self.stop = StopEvent()
        self.stop.attach(self.table)
        self.target = InstallTarget(table=self.table, uffd=self.uffd, gate=self.table.gate, base=self.base,
                                    page_size=PS, ram_fd=self.memfd, ram_fd_base=0, memfd=self.memfd, stop=self.stop)
        self.path = ContinuePath(self.target)
        self.readers: list[threading.Thread] = []

    def page(self, page: int) -> bytes:
        """The bytes of an installed page, read through the guest's mapping (no fault)."""
        assert self.table[page] == PRESENT
        return ctypes.string_at(self.base + page * PS, PS)

    def cached(self, page: int) -> bool:
        """The memfd's page cache holds the page (bytes were written there)."""
        try:
            return os.lseek(self.memfd, page * PS, os.SEEK_DATA) == page * PS
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return False

    def states(self) -> list:
        return [self.table[p] for p in range(NPAGES)]

    def close(self) -> None:
        self.stop.set()
        self.uffd.close()
        for reader in self.readers:
            reader.join()
        os.close(self.memfd)


@pytest.fixture
def memfd_guest():
    require_uffd()
    if not supported_features() & Feature.MINOR_SHMEM:
        pytest.skip("kernel does not offer UFFD_FEATURE_MINOR_SHMEM (the continue path)")
    made: list[MemfdGuest] = []

    def make(features: Feature = Feature(0)) -> MemfdGuest:
        made.append(MemfdGuest(features))
        return made[-1]

    yield make
    for g in made:
        g.close()


class Link:
    """A channel pair (tagged or not), the receiver's session in ``phase``, and a C
    receiver into the guest through the continue sink (claim slot ``slot``; staged, or
    ``in_place``)."""

    def __init__(self, g: MemfdGuest, authenticated: bool = True, phase: Phase = Phase.POSTCOPY,
                 slot: int = 0, in_place: bool = False) -> None:
        a, b = socket.socketpair()
        self.sender = Channel(a, "main", layout=LAYOUT)
        session = wire.Session(MIGRATION, "dest")
        session.phase = phase
        self.channel = Channel(b, "main", layout=LAYOUT, session=session)
        if authenticated:
            self.sender.secure(SEND_KEY, RECV_KEY)
            self.channel.secure(RECV_KEY, SEND_KEY)
        self.authenticated = authenticated
        stop = lib.pc_dp_table_stop_flag(g.table.native)
        sink = dp_recv.continue_sink(g.table, g.memfd, slot, PS, in_place=in_place)
        self.receiver = dp_recv.PageReceiver(LAYOUT, sink, stop)
        self._sending: threading.Thread | None = None

    def frame(self, message) -> bytes:
        """message's bytes as the sender would write them next (tag included), counted
        as sent (the sender's sequence number moves on)."""
        data = message.encode()
        return data + (self.sender._sealer.seal(data[:16], data[16:]) if self.authenticated else b"")

    def send(self, *messages, close: bool = False) -> threading.Thread:
        """Send from a thread (a socketpair holds less than some runs): messages, or raw bytes."""
        if self._sending is not None:
            self._sending.join()

        def run():
            try:
                for m in messages:
                    self.sender.sock.sendall(m) if isinstance(m, bytes) else self.sender.send(m)
                if close:
                    self.sender.sock.shutdown(socket.SHUT_WR)
            except OSError:  # the receiver stopped reading and closed (a refused frame)
                pass
        self._sending = threading.Thread(target=run, daemon=True)
        self._sending.start()
        return self._sending

    def unread(self) -> int:
        """Bytes waiting in the receiving socket."""
        return struct.unpack("i", fcntl.ioctl(self.channel.sock, termios.FIONREAD, b"\0" * 4))[0]

    def close(self) -> None:
        self.channel.close()  # first: a sender blocked on a full socket gets an error
        if self._sending is not None:
            self._sending.join()
        self.sender.close()


@pytest.fixture
def link():
    made: list[Link] = []

    def make(g, **kw) -> Link:
        made.append(Link(g, **kw))
        return made[-1]

    yield make
    for each in made:
        each.close()


def _apply_in_python(g: MemfdGuest, messages) -> None:
    server = FaultServer(g.target, g.path)
    for m in messages:
        if isinstance(m, wire.PageRun):
            g.path.install(m.first_page, m.npages, m.data, m.cause)
        elif isinstance(m, wire.ZeroRange):
            server.mark_zero(m.first_page, m.npages)


MODES = pytest.mark.parametrize("in_place", [False, True], ids=["staged", "in-place"])
PIECE = 16  # pages per gated piece (PC_DP_GATED_PAGES): staged, a piece is written once it is all in


@MODES
@pytest.mark.parametrize("authenticated", [True, False], ids=["tagged", "plain"])
def test_c_and_python_continue_paths_give_the_same_table_and_bytes(memfd_guest, link, authenticated, in_place):
    in_c, in_python = memfd_guest(), memfd_guest()
    messages = [wire.PageRun(0, 8, wire.Cause.PUSHED, _pattern(0, 8)),
                wire.PageRun(10, 4, wire.Cause.DEMAND, _pattern(10, 4)),
                wire.ZeroRange(20, 4),
                wire.PageRun(18, 4, wire.Cause.PUSHED, _pattern(18, 4)),  # 20, 21: zero already
                wire.PageRun(30, 34, wire.Cause.PUSHED, _pattern(30, 34))]  # three gated pieces
    for g in (in_c, in_python):
        g.table.removed(3, 5, by_guest=True)
        g.path.install(12, 1, _pattern(12, 1, salt=5), wire.Cause.DEMAND)  # there first: kept
        g.path.install(40, 2, _pattern(40, 2, salt=6), wire.Cause.DEMAND)
    lk = link(in_c, authenticated=authenticated, in_place=in_place)
    lk.send(*messages, wire.PushDone(pages=8))
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    assert lk.channel.recv() == wire.PushDone(pages=8)  # sequence numbers in step
    _apply_in_python(in_python, messages)
    assert in_c.states() == in_python.states()
    assert in_c.table.pages == in_python.table.pages == {"precopy": 0, "resent": 0, "demand": 6, "pushed": 40,
                                                         "zero": 4}
    present = [p for p in range(NPAGES) if in_c.table[p] == PRESENT]
    assert [in_c.page(p) for p in present] == [in_python.page(p) for p in present]
    assert in_c.page(12) == _pattern(12, 1, salt=5) and in_c.page(63) == _pattern(63, 1)
    assert [in_c.cached(p) for p in range(NPAGES)] == [in_python.cached(p) for p in range(NPAGES)]
    assert lk.receiver.counts.frames == len(messages)


@MODES
def test_a_precopy_resend_overwrites_in_place(memfd_guest, link, in_place):
    g = memfd_guest()
    lk = link(g, phase=Phase.PRECOPY, in_place=in_place)
    lk.send(wire.PageRun(4, 2, wire.Cause.PRECOPY, _pattern(4, 2, salt=1)), wire.ZeroRange(6, 1),
            wire.PageRun(4, 3, wire.Cause.RESENT, _pattern(4, 3, salt=2)), wire.ReadyCheck())
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    assert [g.page(p) for p in (4, 5, 6)] == [_pattern(p, 1, salt=2) for p in (4, 5, 6)]
    assert g.table.pages["precopy"] == 2 and g.table.pages["resent"] == 3


def _blocked_waiter(g: MemfdGuest, page: int) -> Reader:
    """A thread blocked on a missing fault at page, its fault read by hand."""
    reader = Reader(g, page)
    reader.start()
    _until(reader.blocked_on_fault)
    [event] = g.uffd.read_events(1, timeout=None)
    g.table.fault((event.address - g.base) // PS, 5)
    return reader


@MODES
@pytest.mark.parametrize("damage", ["tag", "last payload byte", "cut"])
def test_a_forged_or_cut_run_is_never_mapped_nor_left_in_the_page_cache(memfd_guest, link, damage, in_place):
    g = memfd_guest()  # no fault loop: the fault is read by hand
    reader = _blocked_waiter(g, 9)
    lk = link(g, in_place=in_place)
    run = wire.PageRun(8, 4, wire.Cause.DEMAND, _pattern(8, 4))
    frame = bytearray(lk.frame(run))
    if damage == "cut":
        lk.send(bytes(frame[:-PS]), close=True)
        assert lk.receiver.receive(lk.channel) == dp_recv.CLOSED
    else:
        frame[-1 if damage == "tag" else -17] ^= 1
        lk.send(bytes(frame))
        with pytest.raises(wire.IntegrityError, match="none of its pages was mapped"):
            lk.receiver.receive(lk.channel)
    assert [g.table[p] for p in range(8, 12)] == [MISSING, REQUESTED, MISSING, MISSING]
    assert not any(g.cached(p) for p in range(8, 12))  # punched: a minor fault never finds them
    assert reader.blocked_on_fault() and g.table.pages["demand"] == 0
    again = link(g)  # the link comes back: a correct copy lands
    again.send(run)
    again.send(wire.PushDone(pages=0))
    assert again.receiver.receive(again.channel) == dp_recv.FRAME
    reader.join()
    assert reader.sum == _pattern(9, 1)[0] and [g.page(p) for p in range(8, 12)] == [_pattern(p, 1) for p in range(8, 12)]


@MODES
def test_the_other_channel_does_not_write_pages_claimed_by_a_run_in_flight(memfd_guest, link, in_place):
    g = memfd_guest()
    main, urgent = link(g, slot=0, in_place=in_place), link(g, slot=1)
    run = main.frame(wire.PageRun(16, 2 * PIECE, wire.Cause.PUSHED, _pattern(16, 2 * PIECE)))
    main.send(run[:16 + (PIECE + 2) * PS])  # the first piece and two pages of the next, the rest on its way
    receiving = threading.Thread(target=main.receiver.receive, args=(main.channel,), daemon=True)
    receiving.start()
    _until(lambda: g.cached(16 + PIECE - 1) and main.unread() == 0)
    # Demand runs arrive on the other channel meanwhile, with other bytes: pages of the
    # first piece are claimed (in the page cache, not authenticated), 60 is not.
    urgent.send(wire.PageRun(17, 2, wire.Cause.DEMAND, _pattern(17, 2, salt=3)),
                wire.PageRun(60, 1, wire.Cause.DEMAND, _pattern(60, 1, salt=3)), wire.PushDone(pages=0))
    assert urgent.receiver.receive(urgent.channel) == dp_recv.FRAME
    assert (g.table[17], g.table[18], g.table[60]) == (MISSING, MISSING, PRESENT)
    main.send(run[16 + (PIECE + 2) * PS:], wire.PushDone(pages=8))
    receiving.join()
    assert [g.page(p) for p in range(16, 16 + 2 * PIECE)] == [_pattern(p, 1) for p in range(16, 16 + 2 * PIECE)]
    assert g.page(60) == _pattern(60, 1, salt=3)
    assert g.table.pages == {"precopy": 0, "resent": 0, "demand": 1, "pushed": 2 * PIECE, "zero": 0}


@MODES
def test_a_remove_during_a_run_wins(memfd_guest, link, in_place):
    if not supported_features() & Feature.EVENT_REMOVE:
        pytest.skip("kernel does not offer UFFD_FEATURE_EVENT_REMOVE")
    g = memfd_guest(Feature.EVENT_REMOVE)
    g.table.switched()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lk = link(g, in_place=in_place)
    first = 32
    run = lk.frame(wire.PageRun(first, 2 * PIECE, wire.Cause.PUSHED, _pattern(first, 2 * PIECE)))
    with Server(g) as server:
        lk.send(run[:16 + (PIECE + 1) * PS])  # the first piece in the page cache, not yet authenticated
        done: list[int] = []
        receiving = threading.Thread(target=lambda: done.append(lk.receiver.receive(lk.channel)), daemon=True)
        receiving.start()
        _until(lambda: g.cached(first + PIECE - 1) and lk.unread() == 0)
        # A shared mapping's DONTNEED keeps the page cache; madvise returns once the
        # loop read the REMOVE event (and punched the claimed pages).
        assert libc.madvise(g.base + (first + 4) * PS, 4 * PS, mmap.MADV_DONTNEED) == 0
        assert not any(g.cached(p) for p in range(first + 4, first + 8))
        lk.send(run[16 + (PIECE + 1) * PS:], wire.PushDone(pages=8))
        receiving.join()
        reader = Reader(g, first, 2 * PIECE)
        reader.start()
        reader.join()
    assert done == [dp_recv.FRAME] and server.requests == []
    states = [g.table[p] for p in range(first, first + 2 * PIECE)]
    assert states == [PRESENT] * 4 + [REMOVED] * 4 + [PRESENT] * (2 * PIECE - 8)
    kept = [p for p in range(first, first + 2 * PIECE) if not first + 4 <= p < first + 8]
    assert reader.sum == sum(_pattern(p, 1)[0] for p in kept)  # the removed pages read zeros
    assert g.table.pages["pushed"] == 2 * PIECE - 4


# -- fuzz -----------------------------------------------------------------------------------

def _model(messages) -> tuple[list, dict]:
    """States and page bytes the table's rules give a fresh guest for these data frames:
    a run fills its fresh pages (the first copy wins), a zero range marks fresh pages ZERO."""
    states, data = [MISSING] * NPAGES, {}
    for m in messages:
        for i in range(m.npages):
            p = m.first_page + i
            if states[p] != MISSING:
                continue
            if isinstance(m, wire.PageRun):
                states[p], data[p] = PRESENT, m.data[i * PS:(i + 1) * PS]
            else:
                states[p] = ZERO
    return states, data


def _python_decodes(stream: bytes, authenticated: bool) -> list:
    """The data frames the Python decoder accepts from the start of stream, up to the
    first frame that is not one (refused, incomplete or another kind)."""
    decoder = wire.Decoder(LAYOUT)
    if authenticated:
        decoder.set_auth(wire.FrameAuth(SEND_KEY))
    decoder.feed(stream)
    taken = []
    while True:
        try:
            m = decoder.next_message()
        except wire.ProtocolError:
            return taken
        if not isinstance(m, (wire.PageRun, wire.ZeroRange)) or (
                isinstance(m, wire.PageRun) and m.cause not in (wire.Cause.PUSHED, wire.Cause.DEMAND)):
            return taken
        taken.append(m)


def _check_guest(g: MemfdGuest, messages, context: str) -> None:
    states, data = _model(messages)
    assert g.states() == states, context
    for p in range(NPAGES):
        if states[p] == PRESENT:
            assert g.page(p) == data[p], f"{context}, page {p}"
        elif states[p] == MISSING:
            assert not g.cached(p), f"{context}, page {p} holds unauthenticated bytes"


def _receive_all(lk: Link) -> None:
    try:
        lk.receiver.receive(lk.channel)
    except (wire.IntegrityError, OSError):
        pass


FUZZ_CASES = 250


def test_fuzz_mutated_frames_land_exactly_as_the_decoder_accepts_them(memfd_guest):
    memfd_guest()  # skips without the continue path
    seed = int(os.environ.get("POSTCOPY_FUZZ_SEED", secrets.randbits(32)))
    print(f"continue sink fuzz seed {seed} (set POSTCOPY_FUZZ_SEED={seed} to replay)")
    rng = random.Random(seed)
    corpus = []
    for first, npages in ((0, 1), (5, 3), (30, 20), (63, 1), (0, 64)):
        corpus.append(wire.PageRun(first, npages, rng.choice([wire.Cause.PUSHED, wire.Cause.DEMAND]),
                                   rng.randbytes(npages * PS)).encode())
        corpus.append(wire.ZeroRange(first, npages).encode())
    corpus.append(wire.PushDone(pages=1).encode())
    for case in range(FUZZ_CASES):
        g = MemfdGuest()
        authenticated = rng.random() < 0.7
        lk = Link(g, authenticated=authenticated, in_place=rng.random() < 0.5)
        try:
            # Tagged at the sender's sequence numbers, then mutated.
            frames = [rng.choice(corpus) for _ in range(rng.randint(1, 3))]
            stream = b"".join(lk.frame(_decoded(f)) for f in frames) if authenticated else b"".join(frames)
            if rng.random() < 0.9:
                stream = mutate(rng, stream, corpus)
            lk.send(stream, close=True)
            _receive_all(lk)
            _check_guest(g, _python_decodes(stream, authenticated), f"seed {seed}, case {case}, {stream[:40].hex()}")
        finally:
            lk.close()
            g.close()


def _decoded(frame: bytes):
    decoder = wire.Decoder(LAYOUT)
    decoder.feed(frame)
    return decoder.next_message()


@MODES
@pytest.mark.parametrize("authenticated", [True, False], ids=["tagged", "plain"])
def test_a_stream_cut_at_random_points_lands_as_the_rules_say(memfd_guest, link, authenticated, in_place):
    """Overlapping runs of every size (gated pieces, the small buffer's refills, runs
    arriving a few bytes at a time) and zero ranges, written in pieces of random sizes."""
    seed = secrets.randbits(32)
    rng = random.Random(seed)
    g = memfd_guest()
    lk = link(g, authenticated=authenticated, in_place=in_place)
    messages = []
    for _ in range(60):
        first = rng.randrange(NPAGES)
        npages = rng.randint(1, NPAGES - first)
        if rng.random() < 0.2:
            messages.append(wire.ZeroRange(first, npages))
        else:
            messages.append(wire.PageRun(first, npages, rng.choice([wire.Cause.PUSHED, wire.Cause.DEMAND]),
                                         rng.randbytes(npages * PS)))
    stream = b"".join(lk.frame(m) for m in [*messages, wire.PushDone(pages=0)])
    cuts = sorted(rng.sample(range(1, len(stream)), 300))
    lk.send(*(stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])))
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME, f"seed {seed}"
    assert lk.channel.recv() == wire.PushDone(pages=0)
    _check_guest(g, messages, f"seed {seed}")
