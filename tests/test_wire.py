"""Tests of the sans-IO wire protocol: frames, validation, handshake, fuzzing. No sockets."""
from __future__ import annotations

import os
import random
import secrets
import struct
import tracemalloc

import pytest

from postcopy.protocol import wire
from postcopy.protocol.wire import (HEADER, AuthError, AuthOk, AuthProof, Cause, Complete, Decoder, Discard, Error,
                           ErrorCode, FrameError, FrameType, Handshake, HandshakeError, Hello, Layout, PageRequest,
                           PageRun, PeerError, Ping, Pong, ProtocolError, PushDone, RangeError, Switchover,
                           VersionError, ZeroRange)

PS = 4096
KEY = b"0123456789abcdef0123456789abcdef"
# Two regions with a gap: pages [0, 64) and [128, 192).
LAYOUT = Layout(PS, ((0, 64 * PS), (128 * PS, 64 * PS)))


def hello(role: str = "source", channel: str = "main", **changes) -> Hello:
    fields = dict(version=wire.PROTOCOL_VERSION, role=role, channel=channel, session=bytes(range(16)),
                  nonce=bytes(32), page_size=PS, regions=LAYOUT.regions if role == "source" else ())
    fields.update(changes)
    return Hello(**fields)


def sample_messages() -> list:
    pages = bytes(random.Random(1).randbytes(2 * PS))
    return [
        hello(),
        hello("dest", "urgent", nonce=bytes(range(32))),
        AuthProof(bytes(range(32))),
        AuthOk(),
        PageRun(first_page=3, npages=2, cause=Cause.DEMAND, data=pages),
        PageRun(first_page=191, npages=1, cause=Cause.STATE, data=b"\xff" * PS),
        ZeroRange(first_page=0, npages=64),
        PageRequest(first_page=130, npages=5),
        Discard(ranges=((1, 2), (128, 64))),
        Discard(ranges=()),
        Switchover(info={"paused_ns": 123, "guest": {"threads": 2, "workload": "random"}, "x": [1.5, None]}),
        PushDone(pages=42),
        Complete(info={"verified": True, "fault_latency_us": {"p50": 10.5}}),
        Error(code=ErrorCode.AUTH, reason="nope: clé refusée"),
        Ping(token=0),
        Pong(token=2**64 - 1),
        wire.ReadyCheck(),
        wire.Ready(),
        wire.RecoveryEnd(),
        wire.RecoveryAck(),
        wire.EpochBegin(epoch=7),
        wire.EpochCommit(info={"epoch": 7, "pages": 3, "steps": [1, 2]}),
        wire.EpochAck(info={"epoch": 7, "steps": [1, 2]}),
        wire.CheckpointEnd(epoch=7),
        hello("primary", unauthenticated=True),
    ]


def decode_all(data: bytes, layout: Layout | None = LAYOUT) -> list:
    decoder = Decoder(layout)
    decoder.feed(data)
    messages = list(decoder)
    assert decoder.buffered == 0
    return messages


def frame(ftype: int, flags: int = 0, length: int | None = None, arg: int = 0, payload: bytes = b"",
          magic: int = wire.MAGIC) -> bytes:
    return HEADER.pack(magic, ftype, flags, len(payload) if length is None else length, arg) + payload


# -- encoding and decoding -----------------------------------------------------------------

@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(message):
    encoded = message.encode()
    assert encoded[:2] == b"PC"
    (decoded,) = decode_all(encoded)
    assert decoded == message
    assert type(decoded) is type(message)
    assert decoded.encode() == encoded  # canonical: the handshake MACs depend on it
    assert wire.decode(encoded, LAYOUT) == message


def test_every_frame_type_is_covered():
    assert {m.TYPE for m in sample_messages()} == set(FrameType)


def test_byte_by_byte_feeding():
    messages = sample_messages()
    stream = b"".join(m.encode() for m in messages)
    boundaries = set()
    pos = 0
    for m in messages:
        pos += len(m.encode())
        boundaries.add(pos)
    decoder = Decoder(LAYOUT)
    out = []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        got = decoder.next_message()
        if got is None:
            assert i + 1 not in boundaries, f"message complete at byte {i + 1} not returned"
        else:
            assert i + 1 in boundaries, f"message returned early at byte {i + 1}"
            out.append(got)
            assert decoder.next_message() is None
    assert out == messages


def test_several_frames_in_one_feed():
    messages = sample_messages()
    decoder = Decoder(LAYOUT)
    decoder.feed(b"".join(m.encode() for m in messages) + messages[0].encode()[:7])
    assert list(decoder) == messages
    assert decoder.buffered == 7
    decoder.feed(messages[0].encode()[7:])
    assert decoder.next_message() == messages[0]
    assert decoder.next_message() is None


def test_receiving_into_the_decoder_like_a_channel():
    """The channel's path: recv_into(decoder.space()), commit, next_message, with
    zero-copy page runs; a large frame's rest is read exactly, so none of its bytes is
    ever moved (its data view stays where it was received)."""
    rng = random.Random(5)
    big = [PageRun(i * 16, 16, Cause.PUSHED, bytes([i]) * 16 * PS) for i in range(4)]
    messages = sample_messages() + big + sample_messages()
    stream = memoryview(b"".join(m.encode() for m in messages))
    decoder, pos, got = Decoder(LAYOUT, capacity=4096, zero_copy=True), 0, []
    while len(got) < len(messages):
        message = decoder.next_message()
        if message is None:
            room = decoder.space()
            assert len(room) <= max(Decoder.GREEDY_READ, 16 * PS + HEADER.size)
            n = min(len(room), len(stream) - pos, rng.randrange(1, 3 * PS))
            room[:n] = stream[pos:pos + n]
            decoder.commit(n)
            pos += n
            continue
        if isinstance(message, PageRun):
            assert isinstance(message.data, memoryview)
            message = PageRun(message.first_page, message.npages, message.cause, bytes(message.data))
        got.append(message)
    assert got == messages and decoder.buffered == 0


def test_zero_copy_page_run():
    data = bytes(random.Random(2).randbytes(3 * PS))
    header = wire.encode_page_run_header(10, 3, Cause.PUSHED, PS)
    assert header + data == PageRun(10, 3, Cause.PUSHED, data).encode()
    buf = bytearray(HEADER.size + 8 * PS)  # the agent's preallocated receive buffer
    buf[:HEADER.size] = header
    h = wire.decode_header(memoryview(buf)[:HEADER.size])
    assert h == wire.FrameHeader(FrameType.PAGE_RUN, Cause.PUSHED, 3 * PS, 10)
    payload = memoryview(buf)[HEADER.size:HEADER.size + h.length]
    payload[:] = data
    message = wire.decode_payload(h, payload, LAYOUT)
    assert isinstance(message, PageRun)
    assert (message.first_page, message.npages, message.cause) == (10, 3, Cause.PUSHED)
    assert message.data is payload
    buf[HEADER.size] ^= 0xFF  # same memory: no copy was made
    assert message.data[0] == data[0] ^ 0xFF


def test_page_run_header_rejects_what_a_frame_cannot_carry():
    with pytest.raises(ValueError):
        wire.encode_page_run_header(0, 0, Cause.PUSHED, PS)
    with pytest.raises(ValueError):
        wire.encode_page_run_header(-1, 1, Cause.PUSHED, PS)
    with pytest.raises(ValueError):
        wire.encode_page_run_header(0, 1 << 20, Cause.PUSHED, PS)  # 4 GiB: beyond the u32 length
    with pytest.raises(ValueError):
        PageRun(0, 3, Cause.PUSHED, bytes(PS)).encode()  # not three equal pages


def test_message_constructors_validate():
    with pytest.raises(ValueError, match="role"):
        hello(role="sink")
    with pytest.raises(ValueError, match="channel"):
        hello(channel="bulk")
    with pytest.raises(ValueError, match="session"):
        hello(session=b"short")
    with pytest.raises(ValueError, match="aligned"):
        hello(regions=((0, PS + 1),))
    with pytest.raises(ValueError, match="overlaps"):
        Layout(PS, ((0, 2 * PS), (PS, PS)))
    with pytest.raises(ValueError, match="power of two"):
        Layout(3000, ())
    with pytest.raises(ValueError):
        ZeroRange(0, 0)
    with pytest.raises(ValueError):
        Discard(((1 << 64, 1),))
    with pytest.raises(ValueError):
        Switchover(info=[1, 2])
    with pytest.raises(ValueError):
        Switchover(info={"x": float("nan")}).encode()
    assert PageRun(0, 1, 3, b"").cause is Cause.PUSHED  # plain ints become Cause


def test_error_reason_is_cut_at_a_character_boundary():
    message = Error(ErrorCode.INTERNAL, "é" * wire.MAX_REASON)
    assert len(message.reason.encode()) <= wire.MAX_REASON
    assert decode_all(message.encode()) == [message]
    assert Error(1, "bad \udc80 byte").reason == "bad ? byte"


def test_layout():
    assert LAYOUT.total_pages == 128
    assert LAYOUT.total_bytes == 128 * PS
    assert LAYOUT.contains(0, 64) and LAYOUT.contains(128, 64) and LAYOUT.contains(191, 1)
    assert not LAYOUT.contains(63, 2)  # runs into the gap
    assert not LAYOUT.contains(64, 1)
    assert not LAYOUT.contains(192, 1)
    assert not LAYOUT.contains(0, 0)
    assert not LAYOUT.contains(2**64 - 1, 2**64 - 1)
    assert Layout.of(hello()) == LAYOUT
    assert Layout(PS, [[0, PS]]).regions == ((0, PS),)
    assert Layout(PS, ()).total_pages == 0


# -- validation of received frames ---------------------------------------------------------

def expect_refused(data: bytes, match: str, layout: Layout | None = LAYOUT, exc=ProtocolError):
    decoder = Decoder(layout)
    decoder.feed(data)
    with pytest.raises(exc, match=match):
        decoder.next_message()
    # The stream has lost its framing: the decoder does not carry on.
    with pytest.raises(ProtocolError, match="earlier protocol error"):
        decoder.next_message()


@pytest.mark.parametrize("payload", [
    b'{"a": 1}',                       # spacing
    b'{"a":1,"a":2}',                  # duplicate key
    b'{"k":"\x7f"}',                   # DEL unescaped (the encoder writes \u007f)
    b'{"k":"\\u0041"}',                # an escape the encoder would not write
    b'{"n":1e2}',                      # number spelled another way
])
def test_json_frames_have_one_encoding(payload):
    """A JSON control frame is accepted only in the encoder's own spelling."""
    for ftype in (FrameType.SWITCHOVER, FrameType.COMPLETE, FrameType.EPOCH_COMMIT, FrameType.EPOCH_ACK):
        expect_refused(frame(ftype, payload=payload), "canonical")


def test_page_run_out_of_range():
    expect_refused(PageRun(64, 1, Cause.PUSHED, bytes(PS)).encode(), "outside the guest RAM", exc=RangeError)
    expect_refused(PageRun(63, 2, Cause.PUSHED, bytes(2 * PS)).encode(), "outside", exc=RangeError)
    expect_refused(frame(FrameType.PAGE_RUN, Cause.PUSHED, arg=2**64 - 1, payload=bytes(PS)), "outside")
    expect_refused(ZeroRange(192, 1).encode(), "outside")
    expect_refused(PageRequest(100, 1).encode(), "outside")
    expect_refused(Discard(((0, 1), (190, 3))).encode(), "outside")


def test_overflowing_page_index_refused():
    # first_page + npages wraps around in 64 bits; a C-minded check would accept it.
    expect_refused(frame(FrameType.ZERO_RANGE, arg=2**64 - 1, payload=struct.pack("!Q", 2)), "outside")
    expect_refused(frame(FrameType.PAGE_REQUEST, arg=1, payload=struct.pack("!Q", 2**64 - 1)), "outside")
    expect_refused(frame(FrameType.DISCARD, arg=1, payload=struct.pack("!QQ", 2**63, 2**63)), "outside")


def test_page_run_wrong_length_or_page_size():
    expect_refused(frame(FrameType.PAGE_RUN, Cause.PUSHED, arg=0, payload=bytes(PS + 1)), "whole number")
    expect_refused(frame(FrameType.PAGE_RUN, Cause.PUSHED, arg=0, payload=b""), "without pages")
    # A sender with 4 KiB pages talking to a receiver with 16 KiB pages.
    big = Layout(4 * PS, ((0, 64 * PS),))
    expect_refused(PageRun(0, 1, Cause.PUSHED, bytes(PS)).encode(), "whole number", layout=big)
    # Zero-copy path: the payload must be exactly the header's length.
    h = wire.decode_header(PageRun(0, 1, Cause.PUSHED, bytes(PS)).encode())
    with pytest.raises(FrameError, match="header says"):
        wire.decode_payload(h, memoryview(bytes(PS - 1)), LAYOUT)


def test_page_data_before_hello_refused():
    for message in (PageRun(0, 1, Cause.PRECOPY, bytes(PS)), ZeroRange(0, 1), PageRequest(0, 1), Discard(())):
        expect_refused(message.encode(), "page data before hello", layout=None, exc=RangeError)
    # Everything else decodes without a layout.
    decode_all(b"".join(m.encode() for m in sample_messages() if not isinstance(m, wire.PAGE_BEARING)), None)


def test_malformed_headers_refused():
    expect_refused(frame(FrameType.PING, magic=0x4854), "magic")  # "HT": an HTTP client, say
    expect_refused(frame(0), "unknown frame type 0")
    expect_refused(frame(200), "unknown frame type 200")
    expect_refused(frame(FrameType.PING, flags=1), "flags")
    expect_refused(frame(FrameType.PAGE_RUN, flags=99, payload=bytes(PS)), "cause")
    expect_refused(frame(FrameType.AUTH_PROOF, payload=bytes(31)), "must be 32")
    expect_refused(frame(FrameType.PING, payload=b"x"), "must be 0")
    expect_refused(frame(FrameType.ZERO_RANGE, arg=0, payload=bytes(9)), "must be 8")
    expect_refused(frame(FrameType.DISCARD, arg=2, payload=bytes(16)), "ranges")
    expect_refused(frame(FrameType.AUTH_OK, arg=5), "argument")
    expect_refused(frame(FrameType.ERROR, payload=b"\xff\xfe"), "UTF-8")
    expect_refused(frame(FrameType.SWITCHOVER, payload=b"[1, 2]"), "not an object")
    expect_refused(frame(FrameType.COMPLETE, payload=b'{"a": NaN}'), "NaN")
    expect_refused(frame(FrameType.COMPLETE, payload=b"[" * 100_000), "JSON")
    expect_refused(frame(FrameType.COMPLETE, payload=b'{"a": ' + b"9" * 5000 + b"}"), "JSON")
    with pytest.raises(FrameError, match="needs 16 bytes"):
        wire.decode_header(b"PC\x01")


def test_malformed_hello_refused():
    good = hello().encode()
    payload = bytearray(good[HEADER.size:])
    payload[2] = 9  # role
    expect_refused(frame(FrameType.HELLO, payload=bytes(payload)), "unknown role")
    payload = bytearray(good[HEADER.size:])
    payload[56:60] = struct.pack("!I", 3)  # claims 3 regions, holds 2
    expect_refused(frame(FrameType.HELLO, payload=bytes(payload)), "regions")
    payload = bytearray(good[HEADER.size:])
    payload[52:56] = struct.pack("!I", 1000)  # page size
    expect_refused(frame(FrameType.HELLO, payload=bytes(payload)), "power of two", exc=FrameError)
    # A Hello of another version that this version cannot parse: say so, not "malformed".
    other = struct.pack("!H", wire.PROTOCOL_VERSION + 1) + b"future layout"
    decoder = Decoder()
    decoder.feed(frame(FrameType.HELLO, payload=other))
    with pytest.raises(VersionError, match=f"version {wire.PROTOCOL_VERSION}.*version {wire.PROTOCOL_VERSION + 1}") as info:
        decoder.next_message()
    assert isinstance(wire.decode(info.value.reply[0]), Error)


def test_oversized_length_refused_without_allocating():
    header = frame(FrameType.PAGE_RUN, Cause.PUSHED, length=2**32 - 1, arg=0)
    with pytest.raises(FrameError, match="exceeds the limit"):
        wire.decode_header(header)
    tracemalloc.start()
    try:
        decoder = Decoder(LAYOUT)
        decoder.feed(header)  # only the header: the refusal must not wait for 4 GiB
        with pytest.raises(FrameError, match="exceeds the limit"):
            decoder.next_message()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"refusing a huge frame allocated {peak} bytes"
    # A smaller configured limit applies to every frame type.
    small = Decoder(LAYOUT, max_payload=PS)
    small.feed(PageRun(0, 2, Cause.PUSHED, bytes(2 * PS)).encode())
    with pytest.raises(FrameError, match=f"limit of {PS} bytes"):
        small.next_message()
    expect_refused(frame(FrameType.COMPLETE, length=wire.MAX_JSON + 1), "exceeds")


# -- handshake -----------------------------------------------------------------------------

def run_handshake(client: Handshake, server: Handshake, tamper=None) -> list[bytes]:
    """Drive both sides in memory through Decoders, as the transport would. ``tamper``
    may rewrite each frame in flight. Returns every frame exchanged."""
    decoders = {client: Decoder(), server: Decoder()}
    peer_of = {client: server, server: client}
    log = []
    queue = [(server, f) for f in client.start()] + [(client, f) for f in server.start()]
    while queue:
        side, data = queue.pop(0)
        if tamper:
            data = tamper(data)
        log.append(data)
        decoders[side].feed(data)
        for message in decoders[side]:
            queue += [(peer_of[side], f) for f in side.receive(message)]
    return log


def test_handshake_in_memory():
    client = Handshake("client", KEY, hello("source", "urgent"))
    server = Handshake("server", KEY, hello("dest", "urgent"))
    log = run_handshake(client, server)
    assert client.done and server.done
    types = [wire.decode(f).TYPE for f in log]
    assert types == [FrameType.HELLO, FrameType.HELLO, FrameType.AUTH_PROOF, FrameType.AUTH_PROOF, FrameType.AUTH_OK]
    assert server.peer == client.hello and client.peer == server.hello
    assert client.hello.nonce != bytes(32) and client.hello.nonce != server.hello.nonce  # fresh nonces
    # The destination announced no regions and adopts the source's.
    assert client.layout == server.layout == LAYOUT
    with pytest.raises(HandshakeError, match="complete"):
        client.receive(AuthOk())


def test_wrong_key_refused_by_the_client():
    client = Handshake("client", KEY, hello())
    server = Handshake("server", b"another key entirely", hello("dest"))
    to_server = client.start()
    to_client = server.receive(wire.decode(to_server[0]))
    client.receive(wire.decode(to_client[0]))
    with pytest.raises(AuthError, match="does not prove knowledge of the shared key") as info:
        client.receive(wire.decode(to_client[1]))
    assert not client.done
    # The server learns why the client hung up, and accepts no page data.
    (reply,) = info.value.reply
    with pytest.raises(PeerError, match="not use the same key") as peer:
        server.receive(wire.decode(reply))
    assert peer.value.peer_code == ErrorCode.AUTH
    assert not server.done
    with pytest.raises(ProtocolError):
        server.receive(PageRun(0, 1, Cause.PUSHED, bytes(PS)))


def test_wrong_key_refused_by_the_server():
    # A client that skips checking the server's proof and just answers: it cannot
    # produce a valid proof without the key, whatever it sends.
    server = Handshake("server", KEY, hello("dest"))
    intruder = hello("source", nonce=secrets.token_bytes(32))
    server.start()
    server_hello, server_proof = server.receive(intruder)
    with pytest.raises(HandshakeError, match="page data before the handshake completed"):
        Handshake("server", KEY, hello("dest")).receive(PageRun(0, 1, Cause.PUSHED, bytes(PS)))
    with pytest.raises(AuthError, match="authentication failed") as info:
        server.receive(wire.decode(server_proof))  # echoing the server's own proof back
    assert not server.done
    reply = wire.decode(info.value.reply[0])
    assert isinstance(reply, Error) and reply.code == ErrorCode.AUTH
    assert "authentication failed" in reply.reason
    # A refused handshake stays refused.
    with pytest.raises(HandshakeError, match="already failed"):
        server.receive(AuthProof(bytes(32)))


def test_recorded_proof_cannot_be_replayed():
    client = Handshake("client", KEY, hello())
    log = run_handshake(client, Handshake("server", KEY, hello("dest")))
    client_hello, client_proof = log[0], log[3]
    server = Handshake("server", KEY, hello("dest"))
    server.receive(wire.decode(client_hello))
    with pytest.raises(AuthError):
        server.receive(wire.decode(client_proof))


@pytest.mark.parametrize("offset, bit", [(HEADER.size + 5, 0x10), (HEADER.size + 31, 0x80), (HEADER.size + 74, 0x01)],
                         ids=["session", "nonce", "region"])
def test_altered_hello_is_detected(offset, bit):
    # A man in the middle flips a bit of the client's Hello (session, nonce, region
    # length): both sides then MAC different transcripts.
    def tamper(data: bytes) -> bytes:
        msg = wire.decode(data)
        if isinstance(msg, Hello) and msg.role == "source":
            altered = bytearray(data)
            altered[offset] ^= bit
            try:
                wire.decode(bytes(altered))
            except ProtocolError:
                pytest.fail("alteration must stay a valid Hello for this test")
            return bytes(altered)
        return data
    with pytest.raises(AuthError):
        run_handshake(Handshake("client", KEY, hello(regions=((0, 64 * PS),))),
                      Handshake("server", KEY, hello("dest")), tamper)


def test_wrong_version_refused_with_a_clear_reason():
    client = Handshake("client", KEY, hello(version=wire.PROTOCOL_VERSION + 1))
    server = Handshake("server", KEY, hello("dest"))
    (client_hello,) = client.start()
    with pytest.raises(VersionError) as info:
        server.receive(wire.decode(client_hello))
    text = str(info.value)
    assert f"version {wire.PROTOCOL_VERSION}" in text and f"version {wire.PROTOCOL_VERSION + 1}" in text
    (reply,) = info.value.reply
    with pytest.raises(PeerError, match=f"version {wire.PROTOCOL_VERSION + 1}") as peer:
        client.receive(wire.decode(reply))
    assert peer.value.peer_code == ErrorCode.VERSION
    assert not client.done and not server.done


def test_page_size_mismatch_refused():
    client = Handshake("client", KEY, hello(regions=()))
    server = Handshake("server", KEY, hello("dest", page_size=4 * PS))
    with pytest.raises(VersionError, match="page size mismatch.*16384.*4096") as info:
        server.receive(wire.decode(client.start()[0]))
    assert wire.decode(info.value.reply[0]).code == ErrorCode.VERSION


@pytest.mark.parametrize("server_hello, match", [
    (hello("dest", "urgent"), "channel mismatch"),
    (hello("source", regions=()), "a source cannot talk to a source"),
    (hello("standby"), "a standby cannot talk to a source"),
    (hello("dest", unauthenticated=True), "frame authentication mismatch"),
    (hello("dest", regions=((0, 64 * PS),)), "RAM layout mismatch"),
])
def test_incompatible_peers_refused(server_hello, match):
    client = Handshake("client", KEY, hello())
    server = Handshake("server", KEY, server_hello)
    with pytest.raises(HandshakeError, match=match) as info:
        server.receive(wire.decode(client.start()[0]))
    assert isinstance(wire.decode(info.value.reply[0]), Error)


@pytest.mark.parametrize("message", [m for m in sample_messages() if not isinstance(m, (Hello, Error))],
                         ids=lambda m: type(m).__name__)
def test_handshake_refuses_messages_out_of_order(message):
    server = Handshake("server", KEY, hello("dest"))
    with pytest.raises(HandshakeError) as info:
        server.receive(message)
    assert not server.done
    assert isinstance(wire.decode(info.value.reply[0]), Error)
    client = Handshake("client", KEY, hello())
    with pytest.raises(HandshakeError, match="start"):
        client.receive(message)
    client = Handshake("client", KEY, hello())
    client.start()
    with pytest.raises(HandshakeError):
        client.receive(message)


def test_handshake_argument_checks():
    with pytest.raises(ValueError):
        Handshake("peer", KEY, hello())
    with pytest.raises(ValueError):
        Handshake("client", b"", hello())
    shake = Handshake("client", KEY, hello())
    shake.start()
    with pytest.raises(HandshakeError, match="already started"):
        shake.start()


# -- keys ----------------------------------------------------------------------------------

def test_keys(tmp_path):
    key = wire.new_key()
    assert len(key) == 64 and bytes.fromhex(key.decode())
    assert key != wire.new_key()
    path = tmp_path / "key"
    path.write_bytes(b"  " + key + b"\n")
    assert wire.load_key(path) == key
    path.write_bytes(b" \n\t")
    with pytest.raises(wire.KeyFileError, match="empty"):
        wire.load_key(str(path))
    with pytest.raises(FileNotFoundError):
        wire.load_key(tmp_path / "missing")


# -- fuzzing -------------------------------------------------------------------------------

FUZZ_CASES = 12_000


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(9)
        if kind == 0 and buf:  # truncation
            del buf[rng.randrange(len(buf)):]
        elif kind == 1 and buf:  # bit flips, mostly in headers and small payloads
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(min(len(buf), 96) if rng.random() < 0.8 else len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif kind == 2 and len(buf) >= HEADER.size:  # huge or random length
            length = rng.choice([2**32 - 1, 2**31, wire.MAX_PAYLOAD + 1, rng.randrange(2**32),
                                 rng.randrange(64), max(0, len(buf) - HEADER.size + rng.randint(-9, 9))])
            buf[4:8] = struct.pack("!I", length)
        elif kind == 3 and len(buf) >= HEADER.size:  # random page index / argument
            arg = rng.choice([2**64 - 1, 2**63, rng.randrange(2**64), rng.randrange(256), 64, 127, 191, 192])
            buf[8:16] = struct.pack("!Q", arg)
        elif kind == 4 and len(buf) >= HEADER.size:  # random type and flags
            buf[2] = rng.choice([rng.randrange(256), rng.randrange(1, 14)])
            if rng.random() < 0.3:
                buf[3] = rng.randrange(256)
        elif kind == 5:  # random bytes inserted
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 24))
        elif kind == 6 and buf:  # bytes deleted
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 24)]
        elif kind == 7:  # another frame appended (frame boundaries move after mutations)
            buf += rng.choice(corpus)
        elif kind == 8 and len(buf) > HEADER.size:  # payload field overwritten with extremes
            i = rng.randrange(HEADER.size, len(buf))
            buf[i:i + 8] = rng.choice([b"\xff" * 8, b"\x00" * 8, struct.pack("!Q", rng.randrange(2**64))])
    return bytes(buf)


def test_fuzz_decoder_raises_only_protocol_errors():
    seed = int(os.environ.get("POSTCOPY_FUZZ_SEED", secrets.randbits(32)))
    print(f"wire fuzz seed {seed} (set POSTCOPY_FUZZ_SEED={seed} to replay)")
    rng = random.Random(seed)
    corpus = [m.encode() for m in sample_messages()]
    corpus += [PageRun(0, 1, Cause.PRECOPY, bytes(PS)).encode(), ZeroRange(128, 64).encode(),
               Discard(((0, 64), (128, 1), (191, 1))).encode(), Hello(
                   **{**hello().__dict__, "regions": ((0, PS), (2 * PS, PS), (10 * PS, 6 * PS))}).encode()]
    outcomes = {"messages": 0, "protocol_errors": 0, "incomplete": 0}
    cases = 0
    for _ in range(FUZZ_CASES):
        data = mutate(rng, rng.choice(corpus), corpus)
        cases += 1
        context = f"seed {seed}, case {cases}, input {data[:64].hex()}... ({len(data)} bytes)"
        # Stream decoder, fed in random chunks.
        decoder = Decoder(LAYOUT if rng.random() < 0.9 else None)
        pos = offset = 0
        try:
            while pos < len(data):
                step = rng.choice([1, 7, 16, 100, len(data)])
                decoder.feed(data[pos:pos + step])
                pos += step
                for message in decoder:
                    outcomes["messages"] += 1
                    length = HEADER.unpack_from(data, offset)[3]
                    consumed = data[offset:offset + HEADER.size + length]
                    offset += len(consumed)
                    assert message.encode() == consumed, f"accepted a non-canonical frame: {context}"
            if decoder.buffered:
                outcomes["incomplete"] += 1
        except ProtocolError:
            outcomes["protocol_errors"] += 1
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{type(exc).__name__} leaked from Decoder: {exc}; {context}")
        # Zero-copy path on the same bytes.
        try:
            header = wire.decode_header(data)
            if len(data) >= HEADER.size + header.length:
                wire.decode_payload(header, memoryview(data)[HEADER.size:HEADER.size + header.length], LAYOUT)
        except ProtocolError:
            pass
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{type(exc).__name__} leaked from decode_header/decode_payload: {exc}; {context}")
    print(f"wire fuzz: {cases} cases, {outcomes}")
    assert cases == FUZZ_CASES >= 10_000
    # The mutations reach both outcomes (else the fuzzer tests nothing).
    assert outcomes["protocol_errors"] > FUZZ_CASES // 4, outcomes
    assert outcomes["messages"] > FUZZ_CASES // 10, outcomes


def test_fuzz_handshake_raises_only_protocol_errors():
    seed = int(os.environ.get("POSTCOPY_FUZZ_SEED", secrets.randbits(32)))
    print(f"handshake fuzz seed {seed}")
    rng = random.Random(seed)
    messages = sample_messages()
    for case in range(500):
        side = Handshake(rng.choice(["client", "server"]), KEY, hello(rng.choice(["source", "dest"])))
        side.start()
        try:
            for _ in range(rng.randint(1, 4)):
                side.receive(rng.choice(messages))
        except ProtocolError:
            assert not side.done
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{type(exc).__name__} leaked from Handshake: {exc}; seed {seed}, case {case}")
