"""Bad input is refused up front with one clear line: demo arguments, key files,
endpoints (IPv6 included)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from postcopy.protocol import wire
from postcopy.protocol.endpoint import format_endpoint, parse_endpoint
from postcopy.protocol.keyfile import load_key

KEY = b"0123456789abcdef0123456789abcdef"


def _postcopy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "postcopy", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv, words", [
    (["--threads", "0"], "--threads"),
    (["--threads", "100000"], "--threads must be"),
    (["--steps", "-5"], "--steps"),
    (["--port", "70000"], "--port"),
    (["--seed", "-1"], "--seed"),
    (["--migrate-after", "-1"], "--migrate-after"),
    (["--rate-limit", "0"], "--rate-limit"),
    (["--working-set", "0"], "--working-set"),
    (["--ram", "1T"], "more than this host's memory"),
    (["--park-at", "0"], "--park-at"),
    (["--steps", "1000", "--park-at", "1000"], "--park-at 1000 must be below --steps 1000"),
    (["--steps", "1000", "--hold-at", "5000"], "--hold-at 5000 must be below --steps 1000"),
    (["--park-at", "10", "--hold-at", "10"], "not allowed with argument"),
])
def test_demo_refuses_bad_arguments_before_making_anything(argv, words):
    result = _postcopy("demo", *argv)
    assert result.returncode == 2, result
    assert "usage: postcopy demo" in result.stderr, result.stderr
    assert words in result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_guest_refuses_ram_this_host_cannot_hold():
    result = _postcopy("guest", "--ram", "1T", "--steps", "1")
    assert result.returncode == 2, result
    assert "more than this host's memory" in result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr


def _write(path, data: bytes, mode: int = 0o600) -> str:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return str(path)


def test_key_readable_by_others_is_refused(tmp_path):
    path = _write(tmp_path / "key", KEY, 0o644)
    with pytest.raises(wire.KeyFileError, match="chmod 600"):
        load_key(path)


def test_short_key_is_refused(tmp_path):
    with pytest.raises(wire.KeyFileError, match="at least 16"):
        load_key(_write(tmp_path / "key", b"secret\n"))


def test_good_key_file_and_pipe_are_read(tmp_path):
    assert load_key(_write(tmp_path / "key", KEY + b"\n")) == KEY
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo, 0o600)
    writer = threading.Thread(target=lambda: _write(fifo, KEY, 0o600))
    writer.start()
    assert load_key(fifo) == KEY
    writer.join()


def test_fifo_without_writer_does_not_hang(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo, 0o600)
    with pytest.raises(wire.KeyFileError, match="nobody wrote a key"):
        load_key(fifo, pipe_wait=0.2)


def test_agent_refuses_a_world_readable_key_in_one_line(tmp_path):
    path = _write(tmp_path / "key", KEY, 0o644)
    result = _postcopy("dest", "--listen", "127.0.0.1:7998", "--key-file", path)
    assert result.returncode != 0
    assert "chmod 600" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("text, endpoint", [
    ("127.0.0.1:7000", ("127.0.0.1", 7000)),
    ("[::1]:7000", ("::1", 7000)),
    ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ("host.example:1", ("host.example", 1)),
])
def test_endpoints_parse_and_format_back(text, endpoint):
    assert parse_endpoint(text) == endpoint
    assert format_endpoint(endpoint) == text


@pytest.mark.parametrize("text, words", [
    ("::1:7000", "in brackets"),
    ("[::1:7000", "brackets"),
    ("[]:7000", "no host"),
    ("host:0", "HOST:PORT"),
    ("host", "HOST:PORT"),
])
def test_bad_endpoints_are_refused(text, words):
    with pytest.raises(ValueError, match=words):
        parse_endpoint(text)


def _key_file(tmp_path) -> str:
    return _write(tmp_path / "key", KEY)


def test_control_socket_answering_non_json_is_a_clear_error(tmp_path):
    import socket

    path = str(tmp_path / "not-a-guest.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.0 400 Bad Request\n")
        conn.close()

    answering = threading.Thread(target=answer)
    answering.start()
    result = _postcopy("source", "--guest", path, "--connect", "127.0.0.1:9", "--key-file", _key_file(tmp_path))
    answering.join()
    server.close()
    assert result.returncode == 1, result
    assert "not a postcopy guest's control socket" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_source_never_takes_an_incoming_guests_userfaultfd(launch, tmp_path):
    from conftest import require_uffd
    from postcopy.guest import GuestClient, GuestParams

    require_uffd()
    proc, control = launch(GuestParams(ram=16 << 20, threads=1, workload="idle", seed=1, steps=1), incoming=True)
    result = _postcopy("source", "--guest", control, "--connect", "127.0.0.1:9", "--key-file", _key_file(tmp_path))
    assert result.returncode == 1, result
    assert "incoming guest" in result.stderr and "Traceback" not in result.stderr, result.stderr
    with GuestClient(control) as client:  # untouched: still waiting for its destination
        assert client.status()["state"] == "incoming"
        info, fds = client.take_fds(incoming=True)
        assert "uffd" in fds
        for fd in fds.values():
            os.close(fd)
    assert proc.poll() is None


def test_dest_listens_on_an_ipv6_endpoint(tmp_path):
    import socket

    if not socket.has_ipv6:
        pytest.skip("needs IPv6 (CONFIG_IPV6)")
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"needs an IPv6 loopback address: {exc}")
        port = probe.getsockname()[1]
    dest = subprocess.Popen([sys.executable, "-m", "postcopy", "dest", "--listen", f"[::1]:{port}", "--key-file",
                             _key_file(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert dest.stdout.readline().strip() == f"listening on [::1]:{port}"
        with socket.create_connection(("::1", port), timeout=30) as stranger:
            stranger.sendall(b"not a postcopy peer")
            assert stranger.recv(1) == b""  # dropped, and the destination listens on
        assert dest.poll() is None
    finally:
        dest.kill()
        dest.communicate()


def test_demo_says_when_the_guest_finished_before_the_migration():
    from conftest import require_netns, require_uffd

    require_netns()
    require_uffd()
    result = _postcopy("demo", "--ram", "16M", "--threads", "1", "--steps", "100", "--rate", "1000",
                       "--migrate-after", "2")
    assert result.returncode == 1, result
    assert "the guest ran its 100 steps in" in result.stderr, result.stderr
    assert "raise --steps or lower --rate" in result.stderr and "Traceback" not in result.stderr


def test_dest_refuses_a_guest_larger_than_this_host_up_front(tmp_path):
    import socket

    from postcopy.protocol.channel import Channel, handshake

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = subprocess.Popen([sys.executable, "-m", "postcopy", "dest", "--listen", f"127.0.0.1:{port}",
                             "--key-file", _key_file(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    channels = []
    try:
        assert dest.stdout.readline().startswith("listening on")
        session = os.urandom(wire.SESSION_BYTES)
        for name in ("main", "urgent"):  # a source announcing 1 TiB of RAM
            channel = Channel(socket.create_connection(("127.0.0.1", port), timeout=30), name)
            handshake(channel, "client", KEY, wire.make_hello("source", name, os.sysconf("SC_PAGE_SIZE"),
                                                              ((0, 1 << 40),), session))
            channels.append(channel)
        _, err = dest.communicate(timeout=60)
    finally:
        for channel in channels:
            channel.close()
        dest.kill()
    assert dest.returncode == 1
    assert "cannot run here" in err and "more than this host's memory" in err and "Traceback" not in err, err
