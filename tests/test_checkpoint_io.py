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


# -- the standby's C receive against the Python decoder ------------------------------------------
def _epoch_frames() -> list[bytearray]:
    """Page runs of one epoch (inside and at the edge of RAM) and its commit, unsealed."""
    frames = [bytearray(wire.PageRun(f, n, wire.Cause.RESENT, os.urandom(n * PS)).encode())
              for f, n in ((0, 1), (5, 3), (NPAGES - 2, 2), (17, 1))]
    frames.append(bytearray(wire.EpochCommit(info={"epoch": 1, "pages": 7}).encode()))
    return frames


def _sealed(frames: list[bytearray], key: bytes) -> bytes:
    sealer = wire.FrameAuth(key, "main channel, sent")
    out = bytearray()
    for frame in frames:
        out += frame + sealer.seal(memoryview(frame)[:wire.HEADER.size], memoryview(frame)[wire.HEADER.size:])
    return bytes(out)


def _receiver(stream: bytes, key: bytes) -> Channel:
    """A channel that receives ``stream`` (then the end of the connection)."""
    a, b = socket.socketpair()
    b.settimeout(10)
    session = wire.Session(wire.CHECKPOINT, "standby")  # in an epoch, as the standby is
    session.established()
    for kind in ("EPOCH_COMMIT", "EPOCH_BEGIN"):
        session.received(kind, "main")
    channel = Channel(b, "main", wire.Layout(PS, ((0, NPAGES * PS),)), session)
    channel.secure(os.urandom(32), key)
    threading.Thread(target=lambda: (a.sendall(stream), a.close()), daemon=True).start()
    return channel


def _outcome(channel: Channel):
    try:
        message = channel.recv()
    except Exception as exc:  # noqa: BLE001 - the kind and text are what we compare
        return type(exc).__name__, str(exc)
    return type(message).__name__, getattr(message, "first_page", None), getattr(message, "cause", None)


def _by_python(stream: bytes, key: bytes):
    channel, runs = _receiver(stream, key), []
    while True:
        try:
            message = channel.recv()
        except Exception as exc:  # noqa: BLE001
            outcome = (type(exc).__name__, str(exc))
            break
        if not (isinstance(message, wire.PageRun) and message.cause == wire.Cause.RESENT):
            outcome = (type(message).__name__, getattr(message, "first_page", None), getattr(message, "cause", None))
            break
        runs.append((message.first_page, message.npages, bytes(message.data)))
    channel.close()
    return runs, outcome


def _by_c(stream: bytes, key: bytes):
    from postcopy.checkpoint.epochstage import EpochStage

    channel = _receiver(stream, key)
    stage = EpochStage(channel.layout)
    try:
        stage.receive(channel)
        outcome = _outcome(channel)
    except Exception as exc:  # noqa: BLE001
        outcome = (type(exc).__name__, str(exc))
    image = bytearray(NPAGES * PS)
    runs = stage.runs()
    stage.apply(ffi.from_buffer(image))
    for first, n, data in runs:
        assert image[first * PS:(first + n) * PS] == data
    channel.close()
    return runs, outcome


def test_c_receive_takes_an_epoch_as_python_does():
    key = os.urandom(32)
    stream = _sealed(_epoch_frames(), key)
    runs, outcome = _by_c(stream, key)
    assert (runs, outcome) == _by_python(stream, key)
    assert len(runs) == 4 and outcome == ("EpochCommit", None, None)


@pytest.mark.parametrize("reseal", [False, True])
def test_c_receive_accepts_exactly_what_python_accepts_over_mutated_frames(reseal):
    """One byte of one frame changed (the header mostly): with the old tag (a forgery),
    or resealed (a peer that tags a bad frame). C stages exactly the runs the Python
    decoder accepts, and what follows is decoded, or refused, as Python does."""
    import random

    rng = random.Random(12 if reseal else 11)
    key = os.urandom(32)
    kinds = set()
    for _ in range(150):
        frames = _epoch_frames()
        index = rng.randrange(len(frames))
        where = rng.randrange(wire.HEADER.size) if rng.random() < 0.8 else rng.randrange(len(frames[index]))
        flip = rng.randrange(1, 256)
        if reseal:
            frames[index][where] ^= flip
            stream = _sealed(frames, key)
        else:
            stream = bytearray(_sealed(frames, key))
            stream[sum(len(f) + wire.TAG_BYTES for f in frames[:index]) + where] ^= flip
            stream = bytes(stream)
        c = _by_c(stream, key)
        assert c == _by_python(stream, key), (index, where, flip)
        kinds.add(c[1][0])
    # the mutations reached the tag check, the header checks and the range check
    assert {"IntegrityError", "FrameError"} <= kinds if not reseal else {"FrameError", "RangeError"} <= kinds


@pytest.mark.parametrize("byte,value", [(3, int(wire.Cause.PRECOPY)), (2, int(wire.FrameType.ZERO_RANGE)),
                                        (2, int(wire.FrameType.EPOCH_BEGIN)), (3, 0x7F)])
def test_a_frame_the_epoch_does_not_allow_is_left_to_python(byte, value):
    """A tagged frame of another cause or kind in the middle of an epoch: C stops there
    and the session refuses it (or the decoder does) exactly as without C."""
    key = os.urandom(32)
    frames = _epoch_frames()
    frames[1][byte] = value
    stream = _sealed(frames, key)
    c = _by_c(stream, key)
    assert c == _by_python(stream, key)
    assert len(c[0]) == 1 and c[1][0] in ("StateError", "FrameError", "RangeError")
