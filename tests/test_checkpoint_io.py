"""The checkpoint's native per-page work (native/ckpt_io.c): an epoch sent by C is byte
for byte what the Python channel sends, and a staged epoch is applied exactly."""
from __future__ import annotations

import errno
import os
import socket
import threading
from array import array

import pytest

from postcopy._native import ffi, lib
from postcopy.checkpoint.epochpages import flat_runs, with_state_page
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel

PS = os.sysconf("SC_PAGE_SIZE")
NPAGES = 64


def _channel_pair(send_key: bytes, session: bool = False) -> tuple[Channel, socket.socket]:
    a, b = socket.socketpair()
    layout = wire.Layout(PS, ((0, NPAGES * PS),))
    sess = wire.Session(wire.CHECKPOINT, "primary") if session else None
    channel = Channel(a, "main", layout, sess)
    channel.secure(send_key, os.urandom(32))
    if sess is not None:
        sess.established()
        sess.sent("EPOCH_COMMIT", "main")  # past the initial sync: idle
    return channel, b


class _Drain:
    """Reads a socket to its end in a thread (a socketpair holds less than an epoch)."""

    def __init__(self, sock: socket.socket):
        self.data = bytearray()
        self.sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while chunk := self.sock.recv(1 << 20):
            self.data += chunk

    def result(self, channel: Channel) -> bytes:
        channel.sock.shutdown(socket.SHUT_WR)
        self._thread.join(timeout=30)
        return bytes(self.data)


def _ram() -> bytearray:
    return bytearray(os.urandom(NPAGES * PS))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("max_run_pages", [1, 3, 1024])
def test_an_epoch_sent_by_c_is_what_python_sends(packed, max_run_pages):
    key = os.urandom(32)
    ram = _ram()
    runs = [(0, 1), (3, 5), (9, 1), (20, 7), (63, 1)]
    begin, commit = wire.EpochBegin(epoch=7).encode(), wire.EpochCommit(info={"epoch": 7, "pages": 15}).encode()
    # Python: each frame through the channel, runs split at max_run_pages.
    py, py_peer = _channel_pair(key)
    py_drain = _Drain(py_peer)
    py.send_bytes(begin)
    for first, n in runs:
        for f in range(first, first + n, max_run_pages):
            k = min(max_run_pages, first + n - f)
            py.send_page_run(f, k, wire.Cause.RESENT, memoryview(ram)[f * PS:(f + k) * PS])
    py.send_bytes(commit)
    # C: one call.
    c, c_peer = _channel_pair(key, session=True)
    c_drain = _Drain(c_peer)
    flat = flat_runs(runs)
    src = bytearray().join(ram[f * PS:(f + n) * PS] for f, n in runs) if packed else ram
    with c.native_send("EPOCH_BEGIN", "PAGE_RUN/RESENT", "EPOCH_COMMIT") as link:
        rc = lib.pc_ckpt_send_epoch(link, begin, len(begin), ffi.from_buffer(src), packed, PS,
                                    ffi.from_buffer("uint64_t[]", flat), len(runs), max_run_pages,
                                    int(wire.Cause.RESENT), commit, len(commit))
    assert rc == 0
    assert c.bytes_sent == py.bytes_sent
    # The sealer goes on where C stopped: the next Python frame is tagged alike.
    c.send(wire.Ping(token=1))
    py.send(wire.Ping(token=1))
    assert c_drain.result(c) == py_drain.result(py)
    for s in (py, c, py_peer, c_peer):
        s.close()


def test_a_failed_epoch_send_says_why():
    c, peer = _channel_pair(os.urandom(32), session=True)
    peer.close()
    ram = _ram()
    flat = flat_runs([(0, 4)])
    with c.native_send("EPOCH_BEGIN", "PAGE_RUN/RESENT") as link:
        rc = lib.pc_ckpt_send_epoch(link, b"", 0, ffi.from_buffer(ram), False, PS,
                                    ffi.from_buffer("uint64_t[]", flat), 1, 1024, int(wire.Cause.RESENT), b"", 0)
    assert rc < 0 and -rc in (errno.EPIPE, errno.ECONNRESET)
    c.close()


def test_the_state_page_is_always_in_the_epoch():
    assert list(with_state_page(array("Q"))) == [0, 1]
    assert list(with_state_page(array("Q", [5, 2]))) == [0, 1, 5, 2]
    assert list(with_state_page(array("Q", [1, 2, 7, 1]))) == [0, 3, 7, 1]
    assert list(with_state_page(array("Q", [0, 4]))) == [0, 4]


def test_gather_and_apply_copy_exactly_the_runs():
    ram = _ram()
    runs = [(2, 3), (10, 1), (40, 5)]
    flat = flat_runs(runs)
    staged = bytearray(9 * PS)
    lib.pc_ckpt_gather(ffi.from_buffer(staged), ffi.from_buffer(ram), PS, ffi.from_buffer("uint64_t[]", flat), 3)
    assert bytes(staged) == b"".join(ram[f * PS:(f + n) * PS] for f, n in runs)
    image = bytearray(NPAGES * PS)
    triples = array("Q", [2, 3, 0, 10, 1, 3 * PS, 40, 5, 4 * PS])
    lib.pc_ckpt_apply(ffi.from_buffer(image), ffi.from_buffer(staged), PS, ffi.from_buffer("uint64_t[]", triples), 3)
    expected = bytearray(NPAGES * PS)
    for f, n in runs:
        expected[f * PS:(f + n) * PS] = ram[f * PS:(f + n) * PS]
    assert image == expected
