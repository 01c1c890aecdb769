"""The source's native data plane (native/dp_send.c) against the Python wire layer: the
same header bytes and tags, the same accepted page requests (fuzzed), the push loop's
claims, hint and stop flag, and the demand server's hand-back of frames it does not take."""
from __future__ import annotations

import ctypes
import mmap
import os
import random
import secrets
import socket
import threading

import pytest

from postcopy.migration import dp_send
from postcopy.migration.guestmem import GuestMemory
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel
from postcopy.protocol.state import MIGRATION, SENDS, TRANSITIONS, allowed
from test_wire import LAYOUT, mutate, sample_messages

PS = 4096
NPAGES = 96
POPULATED = [0, 1, 2, 5, 6, 7, 8, 30, 31, 64, 65, 66, 95]  # runs and holes, across run boundaries
SEND_KEY, RECV_KEY = bytes(range(32)), bytes(range(32, 64))


# -- header bytes --------------------------------------------------------------------------
def test_c_headers_equal_the_python_encoders():
    rng = random.Random(secrets.randbits(32))
    for _ in range(5000):
        page_size = 1 << rng.randrange(12, 23)  # up to the largest run
        npages = rng.randrange(1, wire.MAX_RUN_BYTES // page_size + 1)
        first = rng.choice([rng.randrange(2**64 - npages), rng.randrange(1 << 20), 2**64 - npages - 1])
        cause = rng.choice(list(wire.Cause))
        python = wire.encode_page_run_header(first, npages, cause, page_size)
        assert dp_send.header(wire.FrameType.PAGE_RUN, cause, npages * page_size, first) == python
        zero = wire.ZeroRange(first, npages).encode()
        assert dp_send.header(wire.FrameType.ZERO_RANGE, 0, 8, first) == zero[:wire.HEADER.size]
        request = wire.PageRequest(first, npages).encode()
        assert dp_send.header(wire.FrameType.PAGE_REQUEST, 0, 8, first) == request[:wire.HEADER.size]


# -- guest RAM of both backings, reached the way a source reaches a guest's ----------------
def _page(p: int) -> bytes:
    return bytes([p % 251 + 1]) * PS


@pytest.fixture(params=["memfd", "anon"])
def mem(request):
    info = {"pid": os.getpid(), "ram_size": NPAGES * PS, "page_size": PS}
    if request.param == "memfd":
        fd = os.memfd_create("dp-send-test")
        os.ftruncate(fd, NPAGES * PS)
        for p in POPULATED:
            os.pwrite(fd, _page(p), p * PS)
        memory = GuestMemory({**info, "ram_address": 0}, {"memfd": fd})
        yield memory
        memory.close()
        return
    ram = mmap.mmap(-1, NPAGES * PS, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for p in POPULATED:
        ram[p * PS:(p + 1) * PS] = _page(p)
    address = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    memory = GuestMemory({**info, "ram_address": address}, {})
    yield memory
    memory.close()
    del address
    ram.close()


def _channel_pair(authenticated: bool) -> tuple[Channel, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(server.getsockname())
    sock, _ = server.accept()
    server.close()
    channel = Channel(sock, "main", wire.Layout(PS, ((0, NPAGES * PS),)))
    if authenticated:
        channel.secure(SEND_KEY, RECV_KEY)
    return channel, peer


def _received(peer: socket.socket, authenticated: bool, raw: bytes) -> list:
    """Decode what C sent with the Python decoder (tags checked), and check each frame
    re-encodes and re-seals to exactly the bytes C sent."""
    decoder = wire.Decoder(wire.Layout(PS, ((0, NPAGES * PS),)))
    sealer = wire.FrameAuth(SEND_KEY) if authenticated else None
    if authenticated:
        decoder.set_auth(wire.FrameAuth(SEND_KEY))
    decoder.feed(raw)
    messages, offset = [], 0
    for message in decoder:
        encoded = message.encode()
        if sealer is not None:
            encoded += sealer.seal(encoded[:wire.HEADER.size], encoded[wire.HEADER.size:])
        assert raw[offset:offset + len(encoded)] == encoded, f"frame {len(messages)} differs"
        offset += len(encoded)
        if isinstance(message, wire.PageRun):
            message = wire.PageRun(message.first_page, message.npages, message.cause, bytes(message.data))
        messages.append(message)
    assert offset == len(raw) and decoder.buffered == 0
    return messages


def _drain(peer: socket.socket, out: bytearray) -> threading.Thread:
    def run():
        while chunk := peer.recv(1 << 16):
            out.extend(chunk)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _pages_of(messages, cause) -> tuple[dict[int, bytes], set[int]]:
    data, zero = {}, set()
    for m in messages:
        if isinstance(m, wire.PageRun):
            assert m.cause == cause
            for i in range(m.npages):
                data[m.first_page + i] = m.data[i * PS:(i + 1) * PS]
        elif isinstance(m, wire.ZeroRange):
            zero.update(range(m.first_page, m.first_page + m.npages))
    return data, zero


@pytest.mark.parametrize("authenticated", [True, False])
def test_push_sends_every_unsent_page_once_in_python_frames(mem, authenticated):
    sent = bytearray(NPAGES)
    sent[6] = sent[40] = 1  # already sent: skipped
    plane = dp_send.SendPlane(mem, sent)
    plane.set_extents(mem.populated_extents())
    channel, peer = _channel_pair(authenticated)
    raw = bytearray()
    reader = _drain(peer, raw)
    status, counts = plane.push(channel, [(60, NPAGES), (0, 60)], run_pages=4)
    channel.close()
    reader.join()
    assert status == dp_send.DONE
    messages = _received(peer, authenticated, bytes(raw))
    assert messages[0].first_page == 60  # in the order asked
    assert all(m.npages <= 4 for m in messages)
    data, zero = _pages_of(messages, wire.Cause.PUSHED)
    expected = set(POPULATED) - {6}
    assert data == {p: _page(p) for p in expected}
    assert zero == set(range(NPAGES)) - set(POPULATED) - {40}
    assert (counts.pages_sent, counts.pages_zero) == (len(data), len(zero))
    assert sent == b"\x01" * NPAGES
    assert channel.bytes_sent == len(raw)
    peer.close()


def test_tags_equal_python_for_random_sequence_numbers_and_runs(mem):
    """Each frame C sends, re-encoded and re-sealed by Python at the same sequence
    number, is byte for byte what C sent; the sequence comes back to the channel."""
    rng = random.Random(secrets.randbits(32))
    for _ in range(20):
        sent = bytearray(NPAGES)
        for p in rng.sample(range(NPAGES), rng.randrange(NPAGES // 2)):
            sent[p] = 1
        plane = dp_send.SendPlane(mem, sent)
        if rng.random() < 0.5:
            plane.set_extents(mem.populated_extents())
        channel, peer = _channel_pair(True)
        start = rng.choice([0, rng.randrange(2**32), rng.randrange(2**63)])
        channel._sealer.seq = start
        raw = bytearray()
        reader = _drain(peer, raw)
        first = rng.randrange(NPAGES)
        ranges = [(first, rng.randrange(first, NPAGES + 1)), (0, rng.randrange(NPAGES + 1))]
        expected, before = bytearray(sent), sent.count(1)
        for a, b in ranges:
            expected[a:b] = b"\x01" * (b - a)
        status, counts = plane.push(channel, ranges, run_pages=rng.choice([1, 3, 4, 256]))
        channel.close()
        reader.join()
        decoder = wire.Decoder(wire.Layout(PS, ((0, NPAGES * PS),)))
        verifier, sealer = wire.FrameAuth(SEND_KEY), wire.FrameAuth(SEND_KEY)
        verifier.seq = sealer.seq = start
        decoder.set_auth(verifier)
        decoder.feed(raw)
        offset = 0
        for message in decoder:
            encoded = message.encode()
            encoded += sealer.seal(encoded[:wire.HEADER.size], encoded[wire.HEADER.size:])
            assert raw[offset:offset + len(encoded)] == encoded
            offset += len(encoded)
        assert status == dp_send.DONE and offset == len(raw) and sent == expected
        assert counts.pages_sent + counts.pages_zero == expected.count(1) - before
        assert channel._sealer.seq == sealer.seq  # Python frames after the call stay in sequence
        peer.close()


def _pages_in_order(messages) -> list[int]:
    return [p for m in messages if isinstance(m, (wire.PageRun, wire.ZeroRange))
            for p in range(m.first_page, m.first_page + m.npages)]


def test_push_returns_at_once_when_stopped_and_sends_each_demand_window_first(mem):
    sent = bytearray(NPAGES)
    plane = dp_send.SendPlane(mem, sent)
    plane.set_extents(mem.populated_extents())
    channel, peer = _channel_pair(True)
    raw = bytearray()
    reader = _drain(peer, raw)
    plane.stop(True)
    assert plane.push(channel, [(0, NPAGES)], run_pages=4, prepage=(8, 8))[0] == dp_send.STOPPED
    assert sent == bytes(NPAGES)  # nothing claimed
    plane.stop(False)
    _serve_requests(mem, plane, [(30, 2)])  # a demand request leaves its hint: page 32
    status, counts = plane.push(channel, [(0, 16)], run_pages=4, prepage=(8, 8))
    assert status == dp_send.DONE and plane.take_hint() is None  # taken by the push
    _serve_requests(mem, plane, [(NPAGES - 4, 2)])  # near the end: the window stops at the last page
    assert plane.push(channel, [(16, NPAGES)], run_pages=4, prepage=(8, 8))[0] == dp_send.DONE
    channel.close()
    reader.join()
    messages = _received(peer, True, bytes(raw))
    # The window behind the fault went before the batch, then the batch; each page once.
    assert _pages_in_order(messages) == [*range(32, 40), *range(16), NPAGES - 2, NPAGES - 1, *range(16, 30),
                                         *range(40, NPAGES - 4)]
    data, zero = _pages_of(messages, wire.Cause.PUSHED)
    assert set(data) | zero == set(range(NPAGES)) - {30, 31, NPAGES - 4, NPAGES - 3}  # demand pages: not again
    assert {p: data[p] for p in data} == {p: _page(p) for p in data}
    peer.close()


def test_the_window_doubles_while_one_stream_keeps_faulting_past_it(mem):
    """Readahead's rule: a fault within a window past the stream's last window doubles it
    (up to the maximum); a fault elsewhere starts a stream at the minimum."""
    plane = dp_send.SendPlane(mem, bytearray(NPAGES))
    plane.set_extents(mem.populated_extents())
    channel, peer = _channel_pair(True)
    raw = bytearray()
    reader = _drain(peer, raw)
    for request, batch in (((10, 2), (0, 2)),     # hint 12: a new stream, 4 pages
                           ((16, 1), (2, 4)),     # hint 17, past its window [12, 16): 8 pages
                           ((26, 1), (4, 6)),     # hint 27, past [17, 25): 16 pages, capped at 12
                           ((70, 1), (6, 8))):    # elsewhere: a new stream, 4 pages
        _serve_requests(mem, plane, [request])
        assert plane.push(channel, [batch], run_pages=4, prepage=(4, 12))[0] == dp_send.DONE
    channel.close()
    reader.join()
    assert _pages_in_order(_received(peer, True, bytes(raw))) == [
        *range(12, 16), 0, 1, *range(17, 25), 2, 3, *range(27, 39), 4, 5, *range(71, 75), 6, 7]
    peer.close()


def test_push_without_a_window_leaves_the_hint(mem):
    plane = dp_send.SendPlane(mem, bytearray(NPAGES))
    plane.set_extents(mem.populated_extents())
    channel, peer = _channel_pair(True)
    reader = _drain(peer, bytearray())
    _serve_requests(mem, plane, [(30, 2)])
    assert plane.push(channel, [(0, 8)], run_pages=4)[0] == dp_send.DONE
    assert plane.take_hint() == 32
    channel.close()
    reader.join()
    peer.close()


# -- the demand server ---------------------------------------------------------------------
def _serve_requests(mem, plane, requests, tail: wire.Message | None = None, dribble: bool = False):
    """Run the demand server on a channel while a peer sends ``requests`` (then ``tail``,
    or closes); returns (status, counts, replies, the channel's next message)."""
    urgent, peer = _channel_pair(True)
    sealer = wire.FrameAuth(RECV_KEY)
    stream = b""
    for first, npages in requests:
        frame = wire.PageRequest(first, npages).encode()
        stream += frame + sealer.seal(frame[:wire.HEADER.size], frame[wire.HEADER.size:])
    if tail is not None:
        frame = tail.encode()
        stream += frame + sealer.seal(frame[:wire.HEADER.size], frame[wire.HEADER.size:])
    raw = bytearray()
    reader = _drain(peer, raw)

    def write():
        for i in range(0, len(stream), 7 if dribble else len(stream) or 1):
            peer.sendall(stream[i:i + (7 if dribble else len(stream))])
        if tail is None:
            peer.shutdown(socket.SHUT_WR)
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    status, counts = plane.serve(urgent, run_pages=4)
    writer.join()
    following = urgent.recv() if status == dp_send.FRAME else None
    urgent.close()
    reader.join()
    replies = _received(peer, True, bytes(raw))
    peer.close()
    return status, counts, replies, following


@pytest.mark.parametrize("extents", [True, False])
def test_demand_server_answers_requests_and_hands_other_frames_back(mem, extents):
    sent = bytearray(NPAGES)
    plane = dp_send.SendPlane(mem, sent)
    if extents:
        plane.set_extents(mem.populated_extents())
    requests = [(5, 4), (40, 1), (60, 8)]
    status, counts, replies, following = _serve_requests(mem, plane, requests, tail=wire.Pong(7), dribble=True)
    assert status == dp_send.FRAME and following == wire.Pong(7)
    data, zero = _pages_of(replies, wire.Cause.DEMAND)
    asked = {p for first, n in requests for p in range(first, first + n)}
    assert data == {p: _page(p) for p in asked & set(POPULATED)} and zero == asked - set(POPULATED)
    assert (counts.requests, counts.pages_sent, counts.pages_zero) == (3, len(data), len(zero))
    assert {p for p in range(NPAGES) if sent[p]} == asked
    assert plane.take_hint() == 68
    assert plane.served() == 3  # what the pusher's first start waits for (the hint is taken, this stays)


def test_demand_server_of_memfd_ram_the_guest_maps_answers_mapped_unmapped_and_holes_alike():
    """The guest's mapping of its memfd tells which pages are data without the memfd's
    lseek (which waits while a sweep holds the inode lock); a page in the memfd but not
    mapped (written with pwrite here, or swapped out) and a hole are still asked."""
    fd = os.memfd_create("dp-send-mapped")
    os.ftruncate(fd, NPAGES * PS)
    ram = mmap.mmap(fd, NPAGES * PS, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mapped = POPULATED[::2]
    for p in POPULATED:
        if p in mapped:
            ram[p * PS:(p + 1) * PS] = _page(p)  # through the mapping: present in pagemap
        else:
            os.pwrite(fd, _page(p), p * PS)  # in the memfd only
    address = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    mem = GuestMemory({"pid": os.getpid(), "ram_size": NPAGES * PS, "page_size": PS, "ram_address": address},
                      {"memfd": fd})
    try:
        assert mem.native_handles()[2] >= 0  # the guest's mapping is consulted
        plane = dp_send.SendPlane(mem, bytearray(NPAGES))
        requests = [(0, 12), (28, 8), (60, 8), (90, 6)]
        _, counts, replies, _ = _serve_requests(mem, plane, requests)
        data, zero = _pages_of(replies, wire.Cause.DEMAND)
        asked = {p for first, n in requests for p in range(first, first + n)}
        assert data == {p: _page(p) for p in asked & set(POPULATED)} and zero == asked - set(POPULATED)
    finally:
        mem.close()
        del address
        ram.close()


def test_demand_server_leaves_a_request_outside_ram_to_the_decoder(mem):
    plane = dp_send.SendPlane(mem, bytearray(NPAGES))
    urgent, peer = _channel_pair(True)
    sealer = wire.FrameAuth(RECV_KEY)
    frame = wire.PageRequest(NPAGES - 1, 2).encode()
    peer.sendall(frame + sealer.seal(frame[:16], frame[16:]))
    status, counts = plane.serve(urgent, run_pages=4)
    assert status == dp_send.FRAME and counts.requests == 0
    with pytest.raises(wire.RangeError):
        urgent.recv()
    urgent.close()
    peer.close()


def test_demand_server_hands_requests_back_once_the_session_takes_none(mem):
    """After the destination's Complete the session decides about a late request, not C."""
    plane = dp_send.SendPlane(mem, bytearray(NPAGES))
    plane.refuse_requests()
    status, counts, replies, following = _serve_requests(mem, plane, [(3, 1)], tail=wire.Pong(1))
    assert status == dp_send.FRAME and following == wire.PageRequest(3, 1)
    assert counts.requests == 0 and replies == []


def test_demand_server_returns_when_the_peer_closes(mem):
    status, counts, replies, _ = _serve_requests(mem, dp_send.SendPlane(mem, bytearray(NPAGES)), [(0, 1)])
    assert status == dp_send.CLOSED and counts.requests == 1 and len(replies) == 1


def test_the_native_frames_are_self_loops_of_the_session_table():
    """The native loops check the session once per call: that is exact only because
    every frame they send or take leaves the phase as it is, wherever it is legal."""
    for phase, roles in SENDS[MIGRATION].items():
        for frame in ("PAGE_RUN/DEMAND", "PAGE_RUN/PUSHED", "ZERO_RANGE"):
            if frame in roles["source"]:
                assert (MIGRATION, phase, frame) not in TRANSITIONS
        if "PAGE_REQUEST" in allowed(MIGRATION, phase, "source", "receive"):
            assert (MIGRATION, phase, "PAGE_REQUEST") not in TRANSITIONS


# -- the request parser, fuzzed against the Python decoder ---------------------------------
FUZZ_CASES = 12_000


def test_fuzz_c_request_parser_accepts_exactly_what_the_decoder_accepts():
    seed = int(os.environ.get("POSTCOPY_FUZZ_SEED", secrets.randbits(32)))
    print(f"request parser fuzz seed {seed} (set POSTCOPY_FUZZ_SEED={seed} to replay)")
    rng = random.Random(seed)
    key = bytes(range(32))
    plain = [m.encode() for m in sample_messages()]
    plain += [wire.PageRequest(f, n).encode() for f, n in ((0, 1), (63, 1), (128, 64), (130, 5), (0, 64))] * 3
    outcomes = {"ok": 0, "more": 0, "other": 0}
    for case in range(FUZZ_CASES):
        authenticated = rng.random() < 0.5
        corpus = plain
        if authenticated:
            corpus = [f + wire.FrameAuth(key).seal(f[:16], f[16:]) for f in plain]
        data = mutate(rng, rng.choice(corpus), corpus)
        decoder = wire.Decoder(LAYOUT)
        if authenticated:
            decoder.set_auth(wire.FrameAuth(key))
        decoder.feed(data)
        try:
            python = decoder.next_message()
        except wire.ProtocolError:
            python = "refused"
        c = dp_send.parse_request(data, wire.FrameAuth(key) if authenticated else None, LAYOUT)
        outcomes[c[0]] += 1
        context = f"seed {seed}, case {case}, input {data[:48].hex()} ({len(data)} bytes), python {python!r}, c {c}"
        if isinstance(python, wire.PageRequest):
            assert c == ("ok", python.first_page, python.npages, 24 + (16 if authenticated else 0)), context
        else:
            assert c[0] != "ok", context
            if c[0] == "more":
                assert python is None, context
    print(f"request parser fuzz: {outcomes}")
    assert outcomes["ok"] > FUZZ_CASES // 50 and outcomes["other"] > FUZZ_CASES // 2, outcomes


def test_an_authenticated_push_leaves_none_of_the_pages_mapped():
    """Bulk memfd runs are tagged through the plane's own mapping and dropped from it
    again (native/dp_send.c, unmap_pages): after a push of the whole RAM the source's
    mappings of it hold at most one fault-around window, whatever the mapping's
    alignment (runs of 97 pages, aligned to nothing)."""
    from test_frame_auth import _mapping_rss_kib

    npages = 2048
    fd = os.memfd_create("dp-send-rss")
    os.ftruncate(fd, npages * PS)
    os.pwrite(fd, os.urandom(npages * PS), 0)
    memory = GuestMemory({"pid": os.getpid(), "ram_size": npages * PS, "page_size": PS, "ram_address": 0},
                         {"memfd": fd})
    try:
        sent = bytearray(npages)
        plane = dp_send.SendPlane(memory, sent)
        plane.set_extents(memory.populated_extents())
        server = socket.create_server(("127.0.0.1", 0))
        peer = socket.create_connection(server.getsockname())
        sock, _ = server.accept()
        server.close()
        channel = Channel(sock, "main", wire.Layout(PS, ((0, npages * PS),)))
        channel.secure(SEND_KEY, RECV_KEY)
        raw = bytearray()
        reader = _drain(peer, raw)
        status, counts = plane.push(channel, [(0, npages)], run_pages=97)
        channel.close()
        reader.join()
        peer.close()
        assert status == dp_send.DONE and counts.pages_sent == npages
        assert _mapping_rss_kib("dp-send-rss") <= 64
    finally:
        memory.close()
