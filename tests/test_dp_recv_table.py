"""The destination's page table as the C receiver's sink (native/dp_recv_table.c): page
runs received in C are installed by the copy path's gated UFFDIO_COPY loop (removed pages
never filled, pages counted by cause exactly as the Python path counts them), zero
ranges are marked and their waiters zero-filled, and a failed install raises what the
Python path raises. In-process, on the anonymous mapping of test_dest_native_io."""
from __future__ import annotations

import socket
import threading

import pytest

from postcopy._native import lib
from postcopy.migration import dp_recv
from postcopy.migration.pagetable import PRESENT, REMOVED, ZERO
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel
from postcopy.protocol.layout import Layout
from postcopy.protocol.state import MIGRATION, Phase
from test_dest_native_io import NPAGES, PS, Reader, _pattern, _until, guest  # noqa: F401 (fixture)

LAYOUT = Layout(PS, ((0, NPAGES * PS),))


class Link:
    """A channel pair (tagged) whose receiving side is in ``phase``, and a C receiver
    into the guest's table."""

    def __init__(self, g, phase: Phase = Phase.POSTCOPY, layout: Layout = LAYOUT) -> None:
        a, b = socket.socketpair()
        self.sender = Channel(a, "main", layout=layout)
        session = wire.Session(MIGRATION, "dest")
        session.phase = phase
        self.channel = Channel(b, "main", layout=layout, session=session)
        self.sender.secure(bytes(32), bytes(range(32)))
        self.channel.secure(bytes(range(32)), bytes(32))
        stop = lib.pc_dp_table_stop_flag(g.table.native)
        self.receiver = dp_recv.PageReceiver(layout, dp_recv.table_sink(g.table), stop)

    def send(self, *messages) -> threading.Thread:
        thread = threading.Thread(target=lambda: [self.sender.send(m) for m in messages], daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.sender.close()
        self.channel.close()


@pytest.fixture
def link():
    made: list[Link] = []

    def make(g, **kw) -> Link:
        made.append(Link(g, **kw))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_runs_are_installed_removed_pages_skipped_and_counted_by_cause(guest, link):
    g = guest()
    g.table.removed(3, 5, by_guest=True)
    g.path.install(12, 1, _pattern(12, 1, salt=5), wire.Cause.DEMAND)  # there first: EEXIST, kept
    lk = link(g)
    lk.send(wire.PageRun(0, 8, wire.Cause.PUSHED, _pattern(0, 8)),
            wire.PageRun(10, 4, wire.Cause.DEMAND, _pattern(10, 4)),
            wire.ZeroRange(20, 4), wire.PushDone(pages=8)).join()
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    assert [g.table[p] for p in range(8)] == [PRESENT] * 3 + [REMOVED] * 2 + [PRESENT] * 3
    assert all(g.page(p) == _pattern(p, 1) for p in (0, 1, 2, 5, 6, 7, 10, 11, 13))
    assert g.page(12) == _pattern(12, 1, salt=5)
    assert [g.table[p] for p in range(20, 24)] == [ZERO] * 4
    assert g.table.pages == {"precopy": 0, "resent": 0, "demand": 4, "pushed": 6, "zero": 4}
    assert lk.channel.recv() == wire.PushDone(pages=8)


def test_a_precopy_resend_overwrites_in_place(guest, link):
    g = guest()
    g.path.install(4, 2, _pattern(4, 2, salt=1), wire.Cause.PRECOPY)
    lk = link(g, phase=Phase.PRECOPY)
    lk.send(wire.PageRun(4, 2, wire.Cause.RESENT, _pattern(4, 2, salt=2)), wire.ReadyCheck()).join()
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    assert g.page(4) == _pattern(4, 1, salt=2) and g.page(5) == _pattern(5, 1, salt=2)
    assert g.table.pages["resent"] == 2


def test_a_thread_waiting_in_a_zero_range_is_zero_filled(guest, link):
    g = guest()
    reader = Reader(g, 30)
    reader.start()
    _until(reader.blocked_on_fault)
    [event] = g.uffd.read_events(1, timeout=None)  # no fault loop runs: read by hand
    g.table.fault((event.address - g.base) // PS, 5)
    lk = link(g)
    lk.send(wire.ZeroRange(28, 4), wire.PushDone(pages=0)).join()
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    reader.join()
    assert reader.sum == 0 and g.table.faults[0][0] == 5
    assert [g.table[p] for p in range(28, 32)] == [ZERO] * 4 and g.table.pages["zero"] == 4


def test_a_failed_install_raises_what_the_python_path_raises(guest, link):
    g = guest()
    lk = link(g, layout=Layout(PS, ((0, 2 * NPAGES * PS),)))  # RAM the table does not have
    lk.send(wire.PageRun(NPAGES + 1, 1, wire.Cause.PUSHED, _pattern(0, 1))).join()
    with pytest.raises(OSError) as in_c:
        lk.receiver.receive(lk.channel)
    with pytest.raises(OSError) as in_python:
        g.path.install(NPAGES + 1, 1, _pattern(0, 1), wire.Cause.PUSHED)
    assert (type(in_c.value), str(in_c.value)) == (type(in_python.value), str(in_python.value))
    assert "beyond the guest's 64 pages" in str(in_c.value)


def test_the_stop_flag_of_the_table_ends_a_waiting_receive(guest, link):
    g = guest()
    lk = link(g)
    done = threading.Event()
    thread = threading.Thread(target=lambda: done.set() if lk.receiver.receive(lk.channel) == dp_recv.STOPPED
                              else None, daemon=True)
    thread.start()
    g.stop.set()  # also raises the table's flag, which the call polls while it waits
    thread.join()
    assert done.is_set() and g.table.count_in == 0
