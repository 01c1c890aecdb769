"""Frame authentication after the handshake: keys per handshake and direction, tags
that refuse altered, replayed, reordered, dropped and misdirected frames (sans-IO), and
end to end a relay between the two agents that flips one byte of one pushed page."""
from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import threading

import pytest

from postcopy.guest import GuestClient, GuestParams
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, handshake
from conftest import pid_gone, require_uffd

PS = 4096
LAYOUT = wire.Layout(PS, ((0, 64 * PS),))
KEY = b"0123456789abcdef0123456789abcdef"


def frames(n: int) -> list[bytes]:
    """n distinct page-run frames."""
    return [wire.PageRun(i, 1, wire.Cause.PUSHED, bytes([i]) * PS).encode() for i in range(n)]


def sealed(auth: wire.FrameAuth, frame: bytes) -> bytes:
    return frame + auth.seal(frame[:wire.HEADER.size], frame[wire.HEADER.size:])


def receiver(key: bytes) -> wire.Decoder:
    decoder = wire.Decoder(LAYOUT)
    decoder.set_auth(wire.FrameAuth(key))
    return decoder


# -- keys ------------------------------------------------------------------------------------
def _handshake_keys(client_hello: wire.Hello, server_hello: wire.Hello, key: bytes = KEY):
    client, server = wire.Handshake("client", key, client_hello), wire.Handshake("server", key, server_hello)
    to_server = client.start()
    while not (client.done and server.done):
        to_client = [r for f in to_server for r in server.receive(wire.decode(f, LAYOUT))]
        to_server = [r for f in to_client for r in client.receive(wire.decode(f, LAYOUT))]
    return client.frame_keys(), server.frame_keys()


def test_each_handshake_gives_two_fresh_directional_keys():
    source = wire.make_hello("source", "main", PS, LAYOUT.regions)
    dest = wire.make_hello("dest", "main", PS)
    (c_send, c_recv), (s_send, s_recv) = _handshake_keys(source, dest)
    assert c_send == s_recv and c_recv == s_send  # each end sends with what the other receives with
    assert c_send != c_recv and len(c_send) == wire.KEY_BYTES
    (again, _), _ = _handshake_keys(source, dest)  # a reconnect: same Hellos but fresh nonces
    urgent, _ = _handshake_keys(wire.make_hello("source", "urgent", PS, LAYOUT.regions),
                                wire.make_hello("dest", "urgent", PS))
    assert len({c_send, again, urgent[0]}) == 3
    transcript = b"t" * 100
    assert wire.derive_frame_keys(KEY, transcript) == wire.derive_frame_keys(KEY, transcript)
    assert wire.derive_frame_keys(KEY, transcript) != wire.derive_frame_keys(KEY + b"x", transcript)


def test_frame_keys_need_a_complete_handshake():
    shake = wire.Handshake("client", KEY, wire.make_hello("source", "main", PS, LAYOUT.regions))
    with pytest.raises(wire.HandshakeError, match="not complete"):
        shake.frame_keys()


# -- tags, sans IO -------------------------------------------------------------------------
def test_authentic_frames_pass_in_order():
    key = os.urandom(32)
    sender, decoder = wire.FrameAuth(key), receiver(key)
    for frame in frames(5):
        decoder.feed(sealed(sender, frame))
    assert [m.first_page for m in decoder] == [0, 1, 2, 3, 4]
    assert sender.seq == 5


@pytest.mark.parametrize("where", ["header", "payload", "tag"])
def test_any_flipped_bit_is_refused_and_nothing_of_the_frame_comes_out(where):
    key = os.urandom(32)
    sender, decoder = wire.FrameAuth(key), receiver(key)
    good, bad = frames(2)
    data = bytearray(sealed(sender, bad))
    offset = {"header": 15, "payload": wire.HEADER.size + 1234, "tag": len(data) - 1}[where]
    data[offset] ^= 0x01  # arg's lowest bit (page 1 -> 0), a page byte, a tag byte
    decoder.feed(sealed(wire.FrameAuth(key), good))  # a fresh sealer: seq 0 again, for the good one
    decoder.feed(bytes(data))
    assert decoder.next_message().first_page == 0
    with pytest.raises(wire.IntegrityError, match="failed authentication"):
        decoder.next_message()
    with pytest.raises(wire.ProtocolError):  # the stream is over
        decoder.next_message()


def test_replayed_frame_is_refused():
    key = os.urandom(32)
    sender, decoder = wire.FrameAuth(key), receiver(key)
    first = sealed(sender, frames(1)[0])
    decoder.feed(first)
    assert decoder.next_message() is not None
    decoder.feed(first)  # the same bytes again, tag and all
    with pytest.raises(wire.IntegrityError, match="frame 1 "):
        decoder.next_message()


def test_reordered_and_dropped_frames_are_refused():
    key = os.urandom(32)
    sender = wire.FrameAuth(key)
    a, b, c = (sealed(sender, f) for f in frames(3))
    swapped = receiver(key)
    swapped.feed(b + a)
    with pytest.raises(wire.IntegrityError):
        swapped.next_message()
    dropped = receiver(key)
    dropped.feed(a + c)
    assert dropped.next_message().first_page == 0
    with pytest.raises(wire.IntegrityError):
        dropped.next_message()


def test_frame_from_the_other_direction_or_another_key_is_refused():
    keys = wire.derive_frame_keys(KEY, b"transcript")
    reflected = receiver(keys[0])  # expects client->server
    reflected.feed(sealed(wire.FrameAuth(keys[1]), frames(1)[0]))  # a server->client frame bounced back
    with pytest.raises(wire.IntegrityError):
        reflected.next_message()
    forged = receiver(keys[0])
    forged.feed(frames(1)[0] + bytes(wire.TAG_BYTES))
    with pytest.raises(wire.IntegrityError):
        forged.next_message()


def test_tag_depends_on_key_sequence_and_every_byte():
    key = os.urandom(32)
    header, payload = b"h" * 16, os.urandom(3 * PS)
    tags = set()
    for auth_key, seq, data in ((key, 0, payload), (key, 1, payload), (os.urandom(32), 0, payload),
                                (key, 0, payload[:-1] + bytes([payload[-1] ^ 0x80]))):
        auth = wire.FrameAuth(auth_key)
        auth.seq = seq
        tags.add(auth.seal(header, data))
    assert len(tags) == 4 and all(len(t) == wire.TAG_BYTES for t in tags)
    with pytest.raises(ValueError, match="32 bytes"):
        wire.FrameAuth(b"short")


def test_channels_authenticate_after_a_real_handshake():
    a, b = socket.socketpair()
    client, server = Channel(a, "main", LAYOUT), Channel(b, "main")
    thread = threading.Thread(target=handshake, args=(server, "server", KEY, wire.make_hello("dest", "main", PS)))
    thread.start()
    handshake(client, "client", KEY, wire.make_hello("source", "main", PS, LAYOUT.regions))
    thread.join(10)
    try:
        assert client.authenticated and server.authenticated
        client.send_page_run(3, 2, wire.Cause.PUSHED, bytes([7]) * 2 * PS)
        message = server.recv()
        assert (message.first_page, bytes(message.data[:1])) == (3, b"\x07")
        server.send(wire.PageRequest(5, 1))
        assert client.recv() == wire.PageRequest(5, 1)
        # A byte flipped on the wire (here: written by hand after a sealed frame's bytes).
        client.send(wire.ZeroRange(1, 1))
        frame = wire.ZeroRange(2, 1).encode()
        a.sendall(frame + bytes(wire.TAG_BYTES))
        assert server.recv() == wire.ZeroRange(1, 1)
        with pytest.raises(wire.IntegrityError):
            server.recv()
    finally:
        client.close()
        server.close()


# -- end to end: a relay that alters one byte of one pushed page --------------------------
class TamperingRelay:
    """A TCP relay between the agents. On the first connection (the main channel) it
    parses the source's frames and flips one byte in the middle of the first pushed
    page run; everything else passes untouched."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flipped = threading.Event()
        self.flipped_page: int | None = None
        self._sockets: list[socket.socket] = [self.listener]
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            self._connections += 1
            tamper = self._connections == 1
            threading.Thread(target=self._pipe, args=(client, server, tamper), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, tamper: bool) -> None:
        buf, count = bytearray(), 0
        try:
            while data := src.recv(1 << 20):
                if not tamper or self.flipped.is_set():
                    dst.sendall(bytes(buf) + data)
                    buf.clear()
                    continue
                buf += data
                while len(buf) >= wire.HEADER.size and not self.flipped.is_set():
                    _, ftype, flags, length, arg = wire.HEADER.unpack_from(buf)
                    tag = wire.TAG_BYTES if count >= 2 else 0  # the client's Hello and AuthProof have none
                    end = wire.HEADER.size + length + tag
                    if len(buf) < end:
                        break
                    if ftype == wire.FrameType.PAGE_RUN and flags == wire.Cause.PUSHED:
                        buf[wire.HEADER.size + length // 2] ^= 0x01
                        self.flipped_page = arg
                        self.flipped.set()
                        break
                    dst.sendall(bytes(buf[:end]))
                    del buf[:end]
                    count += 1
                if self.flipped.is_set():
                    dst.sendall(bytes(buf))
                    buf.clear()
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def _postcopy(*args: str) -> list[str]:
    return [sys.executable, "-m", "postcopy", *args]


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_relay_flipping_one_pushed_byte_fails_loudly_and_the_source_keeps_its_guest(launch, tmp_path):
    require_uffd()
    params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=5, steps=50_000_000, rate=20_000)
    guest, control = launch(params)
    key_file = tmp_path / "key"
    key_file.write_bytes(wire.new_key())
    key_file.chmod(0o600)
    dest_port = _free_port()
    dest = subprocess.Popen(_postcopy("dest", "--listen", f"127.0.0.1:{dest_port}", "--key-file", str(key_file),
                                      "--workdir", str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    relay = None
    try:
        assert dest.stdout.readline().startswith("listening on"), dest.communicate(timeout=30)
        relay = TamperingRelay(("127.0.0.1", dest_port))
        source = subprocess.run(_postcopy("source", "--guest", control, "--connect", f"127.0.0.1:{relay.port}",
                                          "--key-file", str(key_file), "--recovery-timeout", "1"),
                                capture_output=True, text=True, timeout=180)
        _, dest_err = dest.communicate(timeout=60)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.communicate()
        if relay is not None:
            relay.close()
    assert relay.flipped.is_set(), "the relay saw no pushed page run"
    # The destination refuses the frame before decoding it, and stops its guest.
    assert dest.returncode == 1, dest_err
    assert re.search(r"frame \d+ \(PAGE_RUN, \d+ payload bytes\) failed authentication", dest_err), dest_err
    assert "incoming guest was stopped" in dest_err, dest_err
    incoming = int(re.search(r"incoming guest pid (\d+)", dest_err).group(1))
    assert pid_gone(incoming)
    # The source fails loudly and keeps its paused guest, with all its RAM.
    assert source.returncode == 1, source.stderr
    assert "kept paused on the source" in source.stderr, source.stderr
    with GuestClient(control) as client:
        assert client.status()["state"] == "paused"
    assert guest.poll() is None


def test_unsafe_option_is_labelled_as_such():
    for command in ("source", "dest"):
        result = subprocess.run(_postcopy(command, "--help"), capture_output=True, text=True, timeout=60)
        assert "--unsafe-no-frame-auth" in result.stdout and "UNSAFE" in result.stdout


def test_hello_layout_is_what_the_docs_say():
    hello = wire.make_hello("source", "main", PS, LAYOUT.regions, unauthenticated=True)
    payload = hello.encode()[wire.HEADER.size:]
    version, role, channel, flags = struct.unpack_from("!HBBB", payload)
    assert (version, role, channel, flags) == (2, 1, 1, 1)


def _mapping_rss_kib(name: str) -> int:
    """Rss of this process's mappings of the file called ``name`` (a memfd)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(f"/memfd:{name} (deleted)") or line.rstrip().endswith(f"/memfd:{name}")
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_fault_around_span_follows_virtual_addresses():
    """The kernel's fault-around windows are aligned in virtual addresses; a mapping
    starts only page aligned, so the span dropped after a run is widened by address
    (pc_fault_around_span, native/file_ops.h)."""
    from postcopy._native import ffi, lib

    def span(address, offset, length, size=1 << 20):
        start, end = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        lib.pc_fault_around_span(address, size, offset, length, start, end)
        return start[0], end[0]

    window = 64 << 10
    aligned, shifted = 0x7F0000000000, 0x7F0000000000 + 3 * PS  # a mapping 3 pages past a window
    assert lib.PC_FAULT_AROUND == window
    assert span(aligned, 16 * PS, PS) == (window, 2 * window)
    # One page read at offset 16 pages (virtual: 19 pages in) may have mapped offsets
    # 13..28: the window by offset, [16, 32), would leave pages 13-15 mapped.
    assert span(shifted, 16 * PS, PS) == (13 * PS, 29 * PS)
    assert span(shifted, 0, PS) == (0, 13 * PS)  # clipped to the mapping
    assert span(shifted, (1 << 20) - PS, PS) == ((1 << 20) - 3 * PS, 1 << 20)


def test_tagging_memfd_pages_leaves_none_of_them_mapped():
    """After the switchover memfd runs go out with sendfile, their tag computed through
    a mapping: each run's pages (and the kernel's fault-around neighbours) are dropped
    from it again, so the source's RSS does not grow with the guest."""
    from postcopy.migration.guestmem import GuestMemory

    size = 32 << 20
    fd = os.memfd_create("pc-tag-rss")
    os.ftruncate(fd, size)
    os.pwrite(fd, os.urandom(size), 0)
    mem = GuestMemory({"pid": os.getpid(), "ram_address": 0, "ram_size": size, "page_size": PS}, {"memfd": fd})
    a, b = socket.socketpair()
    sender, receiver_channel = Channel(a, "main", mem.layout), Channel(b, "main")
    thread = threading.Thread(target=handshake, args=(receiver_channel, "server", KEY,
                                                      wire.make_hello("dest", "main", PS)))
    thread.start()
    handshake(sender, "client", KEY, wire.make_hello("source", "main", PS, mem.layout.regions))
    thread.join(10)
    firsts = range(3, size // PS - 100, 100)  # runs of 97 pages, not aligned to anything
    got = []
    drain = threading.Thread(target=lambda: got.extend(bytes(receiver_channel.recv().data[:8]) for _ in firsts))
    drain.start()
    try:
        for first in firsts:
            mem.send_run(sender, first, 97, wire.Cause.PUSHED)
        drain.join(60)
        assert len(got) == len(firsts)
        assert got[5] == os.pread(fd, 8, firsts[5] * PS)  # what was tagged is what was sent
        assert _mapping_rss_kib("pc-tag-rss") <= 64  # at most one fault-around window
    finally:
        sender.close()
        receiver_channel.close()
        mem.close()
