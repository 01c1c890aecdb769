"""The checkpoint's native epoch loops (native/ckpt_frames.c, ckpt_primary.c,
ckpt_standby.c): the control frames C builds are byte for byte the Python wire layer's,
C takes a control frame only in that spelling, and the standby's C loop ends every
stream, mutated or not, exactly as the Python loop does."""
from __future__ import annotations

import os
import random
import socket
import threading
from contextlib import contextmanager

import pytest

from postcopy._native import ffi, lib
from postcopy.checkpoint.standby import Standby, StandbyConfig
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, handshake

PS = os.sysconf("SC_PAGE_SIZE")
U64_MAX = (1 << 64) - 1


def _c_frame(build, *args) -> bytes:
    out = ffi.new("uint8_t[]", lib.PC_CKPT_FRAME_MAX)
    return ffi.buffer(out, build(out, *args))[:]


def _commit_info(epoch: int, pages: int, runs: int, steps: list[int], paused_ns: int) -> dict:
    """An EpochCommit's info as the primary writes it (that key order)."""
    return {"epoch": epoch, "pages": pages, "runs": runs, "steps": steps, "paused_ns": paused_ns}


VALUES = [(1, 1, 1, [0], 0), (7, 64, 12, [63, 64], 123456789), (U64_MAX, U64_MAX, U64_MAX, [U64_MAX] * 56, U64_MAX),
          (10, 3, 2, [], 5), (99, 1024, 1000, list(range(1, 9)), 1 << 40)]


@pytest.mark.parametrize("epoch,pages,runs,steps,paused_ns", VALUES)
def test_c_builds_the_epoch_frames_python_builds(epoch, pages, runs, steps, paused_ns):
    n = len(steps)
    assert _c_frame(lib.pc_ckpt_begin_frame, epoch) == wire.EpochBegin(epoch=epoch).encode()
    commit = _c_frame(lib.pc_ckpt_commit_frame, epoch, pages, runs, steps or [0], n, paused_ns)
    assert commit == wire.EpochCommit(info=_commit_info(epoch, pages, runs, steps, paused_ns)).encode()
    ack = _c_frame(lib.pc_ckpt_ack_frame, epoch, steps or [0], n)
    assert ack == wire.EpochAck(info={"epoch": epoch, "steps": steps}).encode()


def _parse_commit(payload: bytes):
    out = ffi.new("struct pc_ckpt_commit *")
    if lib.pc_ckpt_parse_commit(payload, len(payload), out):
        return None
    return out.epoch, out.pages, out.runs, [out.steps[i] for i in range(out.nsteps)], out.paused_ns


@pytest.mark.parametrize("epoch,pages,runs,steps,paused_ns", VALUES)
def test_c_reads_a_commit_python_wrote(epoch, pages, runs, steps, paused_ns):
    payload = wire.EpochCommit(info=_commit_info(epoch, pages, runs, steps, paused_ns)).encode()[wire.HEADER.size:]
    assert _parse_commit(payload) == (epoch, pages, runs, steps, paused_ns)


@pytest.mark.parametrize("payload", [
    b'{"epoch":01,"pages":1,"runs":1,"steps":[0],"paused_ns":0}',  # leading zero: not canonical
    b'{"epoch":1, "pages":1,"runs":1,"steps":[0],"paused_ns":0}',  # a space
    b'{"pages":1,"epoch":1,"runs":1,"steps":[0],"paused_ns":0}',  # another key order
    b'{"epoch":1,"pages":1,"runs":1,"steps":[0],"paused_ns":0,"x":1}',  # another key
    b'{"epoch":1,"pages":1,"runs":1,"steps":[0]}',  # a key missing
    b'{"epoch":-1,"pages":1,"runs":1,"steps":[0],"paused_ns":0}',
    b'{"epoch":1.0,"pages":1,"runs":1,"steps":[0],"paused_ns":0}',
    b'{"epoch":18446744073709551616,"pages":1,"runs":1,"steps":[0],"paused_ns":0}',  # 2^64
    b'{"epoch":1,"pages":1,"runs":1,"steps":[0,],"paused_ns":0}',
    b'{"epoch":1,"pages":1,"runs":1,"steps":[' + b",".join([b"1"] * 57) + b'],"paused_ns":0}',  # > 56 vCPUs
    b'{"epoch":1,"pages":1,"runs":1,"steps":[0],"paused_ns":null}',
    b'{"epoch":1,"pages":1,"runs":1,"steps":[0],"paused_ns":0}}',
])
def test_c_leaves_any_other_spelling_of_a_commit_to_python(payload):
    assert _parse_commit(payload) is None


def _match(buf: bytes, frame: bytes, verify=ffi.NULL, seq: int = 0):
    used = ffi.new("size_t *")
    return lib.pc_ckpt_match(buf, len(buf), frame, len(frame), verify, seq, used), used[0]


def test_c_takes_an_acknowledgement_only_whole_authentic_and_as_expected():
    key = os.urandom(32)
    frame = wire.EpochAck(info={"epoch": 5, "steps": [7, 8]}).encode()
    header, payload = frame[:wire.HEADER.size], frame[wire.HEADER.size:]
    tag = wire.FrameAuth(key, "test").seal(header, payload)
    verify = lib.pc_frame_auth_new(key)
    try:
        sealed = frame + bytes(tag)
        assert _match(sealed, frame, verify) == (1, len(sealed))
        assert _match(sealed[:10], frame, verify)[0] == 0  # more bytes needed
        assert _match(sealed[:-1], frame, verify) == (0, len(sealed))
        assert _match(sealed, frame, verify, seq=1)[0] == -1  # replayed: another sequence number
        for where in range(len(sealed)):
            mutated = bytearray(sealed)
            mutated[where] ^= 0x01
            assert _match(bytes(mutated), frame, verify)[0] == -1, where
        other = wire.EpochAck(info={"epoch": 5, "steps": [7, 9]}).encode()
        assert _match(sealed, other, verify)[0] == -1  # not the steps that epoch was sent with
    finally:
        lib.pc_frame_auth_free(verify)


# -- the standby's loop against the Python loop, over the same streams ------------------------
NPAGES = 16


def _epoch_stream() -> list[tuple[bytes, bytes]]:
    """(header, payload) of each frame of an initial sync and two epochs."""
    frames = [wire.PageRun(0, 4, wire.Cause.PRECOPY, bytes([0xA0]) * (4 * PS)),
              wire.EpochCommit(info={"epoch": 0, "initial": True, "pages": 4, "guest": {"backing": "memfd"}})]
    for epoch, runs in ((1, ((0, 1), (2, 2), (9, 1))), (2, ((0, 1), (5, 3)))):
        frames.append(wire.EpochBegin(epoch=epoch))
        frames += [wire.PageRun(first, n, wire.Cause.RESENT, bytes([epoch * 16 + first]) * (n * PS))
                   for first, n in runs]
        frames.append(wire.EpochCommit(info=_commit_info(epoch, sum(n for _, n in runs), len(runs),
                                                         [epoch * 10], 1000 + epoch)))
    encoded = [f.encode() for f in frames]
    return [(e[:wire.HEADER.size], e[wire.HEADER.size:]) for e in encoded]


@contextmanager
def _standby_and_primary(native: bool, timeout: float = 10.0):
    """A standby (native loop or not) running in a thread and a channel to it, its
    handshake done; yields (channel, the standby's thread, its figures once it ends)."""
    key = wire.new_key()
    sb = Standby(StandbyConfig(listen=("127.0.0.1", 0), key=key, timeout=timeout, native_loop=native))
    try:
        port = sb.bind().getsockname()[1]
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(sb.run()), daemon=True)
        thread.start()
        regions = ((0, NPAGES * PS),)
        channel = Channel(socket.create_connection(("127.0.0.1", port), timeout=10), "main",
                          wire.Layout(PS, regions), None)
        handshake(channel, "client", key, wire.make_hello("primary", "main", PS, regions))
        yield channel, thread, result
    finally:
        sb.close()


def _run_standby(native: bool, mutate) -> dict:
    """A standby (native loop or not) fed the epoch stream, one byte of one frame
    changed by ``mutate`` (before or after tagging), then the end of the stream."""
    with _standby_and_primary(native) as (channel, thread, result):
        sealer = channel._sealer
        stream = bytearray()
        for index, (header, payload) in enumerate(_epoch_stream()):
            frame = bytearray(header + payload)
            before, after = mutate(index, len(frame))
            if before is not None:
                frame[before[0]] ^= before[1]
            tag = sealer.seal(bytes(frame[:wire.HEADER.size]), bytes(frame[wire.HEADER.size:]))
            frame += bytes(tag)
            if after is not None:
                frame[after[0]] ^= after[1]
            stream += frame
        try:
            channel.sock.sendall(bytes(stream))
            channel.sock.shutdown(socket.SHUT_WR)
            while channel.sock.recv(65536):  # the acknowledgements, to the standby's end
                pass
        except OSError:
            pass
        thread.join(timeout=20)
        channel.close()
        keep = ("end_reason", "end_detail", "committed_epoch", "committed_steps", "committed_paused_ns",
                "epochs_applied", "discarded_partial_epoch", "image_hash")
        return {k: result.get(k) for k in keep}


def test_the_standby_loop_ends_a_clean_stream_as_python_does():
    never = lambda index, length: (None, None)  # noqa: E731
    c, python = _run_standby(True, never), _run_standby(False, never)
    assert c == python and c["committed_epoch"] == 2 and c["committed_steps"] == [20]


@pytest.mark.parametrize("reseal", [False, True])
def test_the_standby_loop_ends_mutated_streams_as_python_does(reseal):
    """One byte of one frame of epochs 1-2 changed: resealed (a peer tagging a bad
    frame: the header checks, the JSON spelling, the epoch and page checks) or after
    the tag (a forgery). The C loop applies, acknowledges and refuses exactly what the
    Python loop does, and ends with the same image."""
    rng = random.Random(21 if reseal else 22)
    for _ in range(25):
        target = rng.randrange(2, 11)  # a frame of epoch 1 or 2
        where, flip = None, rng.randrange(1, 256)

        def mutate(index, length):
            nonlocal where
            if index != target:
                return None, None
            if where is None:
                where = rng.randrange(wire.HEADER.size) if rng.random() < 0.5 else rng.randrange(length)
            return ((where, flip), None) if reseal else (None, (where, flip))

        c = _run_standby(True, mutate)
        python = _run_standby(False, lambda index, length: mutate(index, length))
        assert c == python, (target, where, flip)


@pytest.mark.parametrize("native,sent", [(True, 7), (False, 7), (True, 9)])
def test_a_silent_primary_is_lost_after_the_timeout(native, sent):
    """The connection stays open but nothing comes: after ``timeout`` seconds of silence
    the standby counts the primary as lost and keeps the last complete epoch. Between
    epochs in either loop; inside one (2 frames of epoch 2 sent) in the C loop, where
    the Python loop leaves a dead link to TCP's keepalive."""
    with _standby_and_primary(native, timeout=0.3) as (channel, thread, result):
        frames = _epoch_stream()
        channel.send_frames(frames[:sent])  # epoch 0 and epoch 1 (and the start of epoch 2)
        thread.join(timeout=20)  # silence from here on, the connection open
        channel.close()
        assert result["end_reason"] == "primary-silent" and result["primary_lost"]
        assert result["committed_epoch"] == 1
        assert result["discarded_partial_epoch"] == ({"epoch": 2, "pages": 1} if sent > 7 else None)
