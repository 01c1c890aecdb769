"""The native receiver of page frames (native/dp_recv.c) against the Python wire layer:
the parser accepts exactly the PAGE_RUN and ZERO_RANGE frames the decoder accepts
(fuzzed, tagged and not); the receive loop takes them from a socket into a sink and
hands every other frame, a forged or malformed one, a cause the session does not let
through, a changed phase, the stop flag and the end of the stream back to the channel,
whose decoder and session then do what they always did."""
from __future__ import annotations

import os
import random
import secrets
import socket
import struct
import threading

import pytest

from postcopy._native import ffi, lib
from postcopy.migration import dp_recv
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, ChannelClosed
from postcopy.protocol.state import MIGRATION, SENDS, TRANSITIONS, Phase
from test_wire import LAYOUT, PS, mutate, sample_messages

SEND_KEY, RECV_KEY = bytes(range(32)), bytes(range(32, 64))
RAM_PAGES = 192  # LAYOUT's regions end at page 192


def _rules(layout: wire.Layout = LAYOUT):
    """A receiver's rules taking every data frame (the parser ignores the session)."""
    receiver = dp_recv.PageReceiver(layout, dp_recv.memory_sink(bytearray(PS), PS))
    rules = receiver._rules
    rules.taken_causes, rules.take_zero_ranges = rules.known_causes, 1
    return receiver, rules


def parse(data: bytes, verifier, rules) -> tuple:
    frame = ffi.new("struct pc_dp_frame *")
    verdict = lib.pc_dp_recv_parse(data, len(data), verifier._ctx if verifier else ffi.NULL,
                                   verifier.seq if verifier else 0, rules, frame)
    if verdict == lib.PC_DP_RECV_OK:
        return ("ok", frame.type, frame.cause, frame.first, frame.npages, frame.bytes)
    return ("more",) if verdict == lib.PC_DP_RECV_MORE else ("other",)


# -- the parser, fuzzed against the Python decoder -------------------------------------------
FUZZ_CASES = 12_000


def _data_corpus() -> list[bytes]:
    rng = random.Random(2)
    frames = [m.encode() for m in sample_messages()]
    for cause in wire.Cause:
        for first, npages in ((0, 1), (62, 2), (128, 3), (191, 1), (60, 8)):
            frames.append(wire.PageRun(first, npages, cause, rng.randbytes(npages * PS)).encode())
    for first, npages in ((0, 64), (130, 5), (191, 1), (63, 2), (2**64 - 1, 1)):
        if first + npages <= 2**64 - 1:
            frames.append(wire.ZeroRange(first, npages).encode())
    return frames


def test_fuzz_c_parser_accepts_exactly_the_data_frames_the_decoder_accepts():
    seed = int(os.environ.get("POSTCOPY_FUZZ_SEED", secrets.randbits(32)))
    print(f"data frame parser fuzz seed {seed} (set POSTCOPY_FUZZ_SEED={seed} to replay)")
    rng = random.Random(seed)
    key = bytes(range(32))
    plain = _data_corpus()
    tagged = [f + wire.FrameAuth(key).seal(f[:16], f[16:]) for f in plain]
    _, rules = _rules()
    outcomes = {"ok": 0, "more": 0, "other": 0}
    for case in range(FUZZ_CASES):
        authenticated = rng.random() < 0.5
        corpus = tagged if authenticated else plain
        data = mutate(rng, rng.choice(corpus), corpus) if rng.random() < 0.9 else rng.choice(corpus)
        decoder = wire.Decoder(LAYOUT)
        if authenticated:
            decoder.set_auth(wire.FrameAuth(key))
        decoder.feed(data)
        try:
            python = decoder.next_message()
        except wire.ProtocolError:
            python = "refused"
        c = parse(data, wire.FrameAuth(key) if authenticated else None, rules)
        outcomes[c[0]] += 1
        context = f"seed {seed}, case {case}, input {data[:48].hex()} ({len(data)} bytes), python {python!r}, c {c}"
        tag = 16 if authenticated else 0
        if isinstance(python, wire.PageRun):
            assert c == ("ok", wire.FrameType.PAGE_RUN, python.cause, python.first_page, python.npages,
                         16 + python.npages * PS + tag), context
        elif isinstance(python, wire.ZeroRange):
            assert c == ("ok", wire.FrameType.ZERO_RANGE, 0, python.first_page, python.npages, 24 + tag), context
        else:
            assert c[0] != "ok", context
            if c[0] == "more":
                assert python is None, context
    print(f"data frame parser fuzz: {outcomes}")
    assert outcomes["ok"] > FUZZ_CASES // 10 and outcomes["other"] > FUZZ_CASES // 4, outcomes


# -- the receive loop over a socket -----------------------------------------------------------
class Link:
    """A channel pair over a socketpair (tagged or not), the receiving channel's session
    in ``phase``, and a receiver into plain memory."""

    def __init__(self, authenticated: bool, phase: Phase = Phase.POSTCOPY) -> None:
        a, b = socket.socketpair()
        self.sender = Channel(a, "main", layout=LAYOUT)
        self.session = wire.Session(MIGRATION, "dest")
        self.session.phase = phase
        self.channel = Channel(b, "main", layout=LAYOUT, session=self.session)
        if authenticated:
            self.sender.secure(SEND_KEY, RECV_KEY)
            self.channel.secure(RECV_KEY, SEND_KEY)
        self.memory = bytearray(RAM_PAGES * PS)
        self.receiver = dp_recv.PageReceiver(LAYOUT, dp_recv.memory_sink(self.memory, PS))
        self._sending: threading.Thread | None = None

    def send(self, *messages, close: bool = False) -> None:
        """Send from a thread (a socketpair holds less than some runs), then optionally
        end the stream; joined before the next send."""
        if self._sending is not None:
            self._sending.join()

        def run():
            for message in messages:
                self.sender.send(message) if not isinstance(message, bytes) else self.sender.sock.sendall(message)
            if close:
                self.sender.sock.shutdown(socket.SHUT_WR)
        self._sending = threading.Thread(target=run, daemon=True)
        self._sending.start()

    @staticmethod
    def run(first: int, npages: int, cause: wire.Cause) -> wire.PageRun:
        return wire.PageRun(first, npages, cause, bytes([first % 255 + 1]) * (npages * PS))

    def pages(self, first: int, npages: int) -> bytes:
        return bytes(self.memory[first * PS:(first + npages) * PS])

    def close(self) -> None:
        if self._sending is not None:
            self._sending.join()
        self.sender.close()
        self.channel.close()


@pytest.fixture
def link():
    made: list[Link] = []

    def make(authenticated: bool = True, phase: Phase = Phase.POSTCOPY) -> Link:
        made.append(Link(authenticated, phase))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.mark.parametrize("authenticated", [True, False], ids=["tagged", "plain"])
def test_runs_and_zero_ranges_land_and_the_next_frame_is_pythons(link, authenticated):
    lk = link(authenticated)
    lk.memory[130 * PS:135 * PS] = b"\x07" * (5 * PS)
    runs = [lk.run(0, 3, wire.Cause.PUSHED), lk.run(60, 4, wire.Cause.DEMAND), lk.run(128, 64, wire.Cause.PUSHED)]
    # after Python's frame, a run for the next call
    lk.send(*runs, wire.ZeroRange(130, 5), wire.PushDone(pages=7), lk.run(5, 1, wire.Cause.PUSHED), close=True)
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    for run in runs[:2]:
        assert lk.pages(run.first_page, run.npages) == run.data
    assert lk.pages(128, 64) == runs[2].data[:2 * PS] + bytes(5 * PS) + runs[2].data[7 * PS:]
    counts = lk.receiver.counts
    assert counts.frames == 4 and counts.zero_pages == 5
    assert counts.pages == {wire.Cause.PUSHED: 67, wire.Cause.DEMAND: 4}
    assert set(counts.first_ns) == {wire.Cause.PUSHED, wire.Cause.DEMAND}
    assert lk.channel.recv() == wire.PushDone(pages=7)  # the sequence numbers went on in step
    assert lk.receiver.receive(lk.channel) == dp_recv.CLOSED
    assert lk.pages(5, 1) == bytes([6]) * PS and lk.receiver.counts.pages[wire.Cause.PUSHED] == 68
    assert lk.channel.bytes_received == lk.sender.bytes_sent


def test_a_run_of_a_cause_the_phase_refuses_goes_to_the_session(link):
    lk = link()
    lk.send(lk.run(3, 1, wire.Cause.PRECOPY))  # precopy data after the switchover
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    assert lk.receiver.counts.frames == 0 and lk.pages(3, 1) == bytes(PS)
    with pytest.raises(wire.StateError, match="PAGE_RUN/PRECOPY"):
        lk.channel.recv()


def test_a_run_that_changes_the_phase_is_decoded_by_python(link):
    lk = link(phase=Phase.PRECOPY)
    lk.send(lk.run(1, 1, wire.Cause.PRECOPY), lk.run(2, 1, wire.Cause.STATE))  # STATE: to SWITCHOVER
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    assert lk.receiver.counts.pages == {wire.Cause.PRECOPY: 1}
    assert lk.channel.recv().cause == wire.Cause.STATE and lk.session.phase == Phase.SWITCHOVER


def test_nothing_is_taken_in_a_phase_without_data_frames(link):
    lk = link(phase=Phase.SWITCHOVER)
    lk.send(lk.run(1, 1, wire.Cause.PUSHED))
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    with pytest.raises(wire.StateError):
        lk.channel.recv()


def test_a_phase_changed_by_another_thread_hands_back_before_the_next_frame(link, monkeypatch):
    lk = link()
    lk.send(lk.run(1, 1, wire.Cause.PUSHED))
    loops = lk.session.loops

    def stale(kinds):  # the phase moves right after the call read it
        taken, word = loops(kinds)
        lk.session.fail()
        return taken, word
    monkeypatch.setattr(lk.session, "loops", stale)
    assert lk.receiver.receive(lk.channel) == dp_recv.PHASE
    assert lk.receiver.counts.frames == 0 and lk.pages(1, 1) == bytes(PS)
    with pytest.raises(wire.StateError, match="phase error"):
        lk.channel.recv()


def test_the_stop_flag_hands_back_without_taking(link):
    lk = link()
    stop = ffi.new("int *", 1)
    lk.receiver._rules.stop = stop
    lk.send(lk.run(1, 1, wire.Cause.PUSHED))
    assert lk.receiver.receive(lk.channel) == dp_recv.STOPPED
    assert lk.receiver.counts.frames == 0
    stop[0] = 0
    assert lk.channel.recv().first_page == 1


@pytest.mark.parametrize("authenticated,damage,error", [
    (True, lambda f: f[:-1] + bytes([f[-1] ^ 1]), wire.IntegrityError),  # its tag
    (True, lambda f: f[:30] + bytes([f[30] ^ 1]) + f[31:], wire.IntegrityError),  # a page byte
    (False, lambda f: f[:4] + struct.pack("!I", 3) + f[8:], wire.RangeError),  # not whole pages
    (False, lambda f: f[:8] + struct.pack("!Q", 100) + f[16:], wire.RangeError),  # between the regions
    (False, lambda f: b"\x00" + f[1:], wire.FrameError),  # magic
], ids=["tag", "payload", "length", "range", "magic"])
def test_a_frame_the_decoder_refuses_is_refused_by_the_decoder(link, authenticated, damage, error):
    lk = link(authenticated)
    frame = lk.run(1, 1, wire.Cause.PUSHED).encode()
    if authenticated:
        frame += wire.FrameAuth(SEND_KEY).seal(frame[:16], frame[16:])  # the sender's first frame
    lk.send(damage(frame), close=True)
    assert lk.receiver.receive(lk.channel) == dp_recv.FRAME
    assert lk.receiver.counts.frames == 0 and lk.pages(1, 1) == bytes(PS)
    with pytest.raises(error):
        lk.channel.recv()


def test_the_end_of_the_stream_comes_back_as_channel_closed(link):
    lk = link(authenticated=False)
    run = lk.run(4, 2, wire.Cause.PUSHED)
    lk.send(run, wire.encode_page_run_header(9, 1, wire.Cause.PUSHED, PS) + b"\x01" * 100, close=True)
    assert lk.receiver.receive(lk.channel) == dp_recv.CLOSED
    assert lk.pages(4, 2) == run.data
    with pytest.raises(ChannelClosed):
        lk.channel.recv()


def test_data_frames_taken_in_c_are_exactly_the_self_loops_of_each_phase():
    session = wire.Session(MIGRATION, "dest")
    for phase, roles in SENDS[MIGRATION].items():
        session.phase = phase
        taken, word = session.loops(dp_recv.DATA_KINDS)
        expected = {k for k in dp_recv.DATA_KINDS if k in roles["source"]
                    and (MIGRATION, phase, k) not in TRANSITIONS}
        assert taken == expected and word == session.phase_word[0], phase
    session.phase = Phase.POSTCOPY
    assert session.loops(dp_recv.DATA_KINDS)[0] == {"PAGE_RUN/DEMAND", "PAGE_RUN/PUSHED", "ZERO_RANGE"}


def test_every_phase_change_moves_the_phase_word():
    session = wire.Session(MIGRATION, "dest")
    words = [session.phase_word[0]]
    session.established()
    words.append(session.phase_word[0])
    session.received("PAGE_RUN/PRECOPY")  # a self-loop: no change
    assert session.phase_word[0] == words[-1]
    session.received("PAGE_RUN/STATE")
    session.received("SWITCHOVER")
    session.link_lost()
    session.fail()
    words.append(session.phase_word[0])
    assert words == [0, 1, 5]
