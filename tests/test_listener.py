"""The destination before authentication, probed with raw TCP clients: strangers are
dropped and logged while it keeps listening, a second source is refused as busy, two
racing sources do not both fail."""
from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from postcopy.migration.listener import BUSY, AcceptTimeout, Listener
from postcopy.protocol.endpoint import listen_socket
from postcopy.protocol import wire
from postcopy.protocol.channel import Channel, handshake

KEY = wire.new_key()
PAGE = os.sysconf("SC_PAGE_SIZE")
LAYOUT = ((0, 16 * PAGE),)


@pytest.fixture
def listener():
    lst = Listener(listen_socket(("127.0.0.1", 0)), KEY, handshake_timeout=1.0)
    yield lst
    lst.close()


def _address(lst: Listener) -> tuple[str, int]:
    return lst.sock.getsockname()[:2]


def _source(lst: Listener, name: str, session: bytes, key: bytes = KEY) -> Channel:
    """A source's channel: connect and run the client handshake (raises on refusal)."""
    sock = socket.create_connection(_address(lst), timeout=30)
    channel = Channel(sock, name)
    handshake(channel, "client", key, wire.make_hello("source", name, PAGE, LAYOUT, session))
    return channel


def _dropped(sock: socket.socket) -> bool:
    """Blocks until the listener closes this connection (True) or sends bytes (False)."""
    sock.settimeout(30)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _serves_a_source(lst: Listener) -> None:
    session = os.urandom(wire.SESSION_BYTES)
    main = _source(lst, "main", session)
    got, peer = lst.accept("main", None, timeout=30)
    assert peer.hello.session == session and peer.layout.regions == LAYOUT
    main.send(wire.Ping(token=7))
    assert got.recv() == wire.Ping(token=7)
    main.close()
    got.close()


@pytest.mark.parametrize("garbage", [
    struct.pack("!HBBIQ", wire.MAGIC, int(wire.FrameType.HELLO), 0, 0xFFFFFFFF, 0),  # a huge length
    struct.pack("!HBBIQ", 0xDEAD, 1, 0, 8, 0) + bytes(8),  # bad magic
    os.urandom(4096),  # random bytes
    wire.Ping(token=1).encode(),  # a valid frame, but not a Hello
], ids=["huge-length", "bad-magic", "random-bytes", "not-hello"])
def test_bad_first_frame_is_dropped_and_listening_goes_on(listener, garbage, capfd):
    stranger = socket.create_connection(_address(listener))
    stranger.sendall(garbage)
    assert _dropped(stranger)
    stranger.close()
    assert listener.dropped == 1
    assert "dropped connection from 127.0.0.1" in capfd.readouterr().err
    _serves_a_source(listener)


def test_idle_and_trickling_clients_hit_the_handshake_deadline(listener, capfd):
    idle = socket.create_connection(_address(listener))
    slow = socket.create_connection(_address(listener))
    hello = wire.make_hello("source", "main", PAGE, LAYOUT).encode()
    slow.sendall(hello[:5])  # a few bytes, then nothing: the deadline covers the whole handshake
    # A real source is served meanwhile, without waiting behind them.
    _serves_a_source(listener)
    assert _dropped(idle) and _dropped(slow)
    assert "no handshake within 1 s" in capfd.readouterr().err
    idle.close()
    slow.close()


def test_wrong_key_is_dropped_and_listening_goes_on(listener):
    with pytest.raises(wire.HandshakeError, match="authentication failed"):
        _source(listener, "main", os.urandom(wire.SESSION_BYTES), key=wire.new_key())
    _serves_a_source(listener)


def test_two_hundred_connections_do_not_shut_out_a_source(listener):
    crowd = [socket.create_connection(_address(listener)) for _ in range(200)]
    try:
        _serves_a_source(listener)
    finally:
        for sock in crowd:
            sock.close()


def test_second_source_is_refused_as_busy_at_once(listener):
    first = os.urandom(wire.SESSION_BYTES)
    main = _source(listener, "main", first)
    with pytest.raises(wire.PeerError, match=BUSY):
        _source(listener, "main", os.urandom(wire.SESSION_BYTES))
    assert listener.refused_busy == 1
    urgent = _source(listener, "urgent", first)  # the first source's own channels still pass
    got_main, _ = listener.accept("main", None, timeout=30)
    got_urgent, _ = listener.accept("urgent", first, timeout=30)
    for channel in (main, urgent, got_main, got_urgent):
        channel.close()


def test_racing_sources_one_wins_the_other_is_busy(listener):
    sessions = [os.urandom(wire.SESSION_BYTES) for _ in range(2)]
    outcomes: dict[int, object] = {}
    go = threading.Barrier(2)

    def race(i: int) -> None:
        go.wait()
        try:
            outcomes[i] = (_source(listener, "main", sessions[i]), _source(listener, "urgent", sessions[i]))
        except wire.PeerError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, o in outcomes.items() if isinstance(o, tuple)]
    losers = [o for o in outcomes.values() if isinstance(o, wire.PeerError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert BUSY in losers[0].reason
    main, peer = listener.accept("main", None, timeout=30)
    urgent, _ = listener.accept("urgent", peer.hello.session, timeout=30)
    assert peer.hello.session == sessions[winners[0]]
    for channel in (main, urgent, *outcomes[winners[0]]):
        channel.close()


def test_reconnect_of_the_same_session_passes_strangers_do_not(listener):
    """Postcopy recovery: while the agent waits for its source to come back, a stranger
    is dropped (it cannot make the destination give up) and the source gets through."""
    session = os.urandom(wire.SESSION_BYTES)
    _source(listener, "main", session).close()
    listener.accept("main", None, timeout=30)[0].close()
    stranger = socket.create_connection(_address(listener))
    stranger.sendall(os.urandom(64))
    assert _dropped(stranger)
    with pytest.raises(wire.PeerError, match=BUSY):
        _source(listener, "main", os.urandom(wire.SESSION_BYTES))
    again = _source(listener, "main", session)
    got, peer = listener.accept("main", session, timeout=30)
    assert peer.hello.session == session
    again.close()
    got.close()


def test_accept_times_out_with_a_clear_message(listener):
    with pytest.raises(AcceptTimeout, match="no source connected"):
        listener.accept("main", None, timeout=0.1)


def test_listens_on_ipv6():
    if not socket.has_ipv6:
        pytest.skip("needs IPv6 (CONFIG_IPV6)")
    try:
        sock = listen_socket(("::1", 0))
    except OSError as exc:
        pytest.skip(f"needs an IPv6 loopback address: {exc}")
    lst = Listener(sock, KEY)
    try:
        assert sock.family == socket.AF_INET6
        _serves_a_source(lst)
    finally:
        lst.close()
