"""The source and dest commands as a user runs them: refusals happen before any page
moves, and the guest goes on running on the source."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from postcopy.protocol import wire
from postcopy.guest import GuestClient, GuestParams, wait_for_control



def _key_file(path, key: bytes) -> str:
    with open(path, "wb") as f:
        f.write(key)
    os.chmod(path, 0o600)
    return str(path)


def _postcopy(*args: str) -> list[str]:
    return [sys.executable, "-m", "postcopy", *args]


@pytest.mark.loaded
def test_wrong_key_and_strangers_are_refused_and_the_destination_keeps_listening(bed, tmp_path):
    params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=3, steps=10_000_000, rate=20_000)
    control = str(tmp_path / "guest.sock")
    guest = bed.popen(bed.source, params.argv(control=control), stdout=subprocess.PIPE, text=True)
    wait_for_control(control, proc=guest)
    endpoint = f"{bed.dest.address}:7030"
    good_key = _key_file(tmp_path / "a", wire.new_key())
    dest = bed.popen(bed.dest, _postcopy("dest", "--listen", endpoint, "--key-file", good_key),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    source = bed.run(bed.source, _postcopy("source", "--guest", control, "--connect", endpoint, "--key-file",
                                           _key_file(tmp_path / "b", wire.new_key())),
                     capture_output=True, text=True, timeout=60)
    assert source.returncode == 1
    assert "key" in source.stderr and "goes on running on the source" in source.stderr, source.stderr
    # The guest never paused and keeps stepping on the source.
    with GuestClient(control) as client:
        before = client.status()
        time.sleep(0.2)
        after = client.status()
        assert after["state"] == "running"
        assert sum(after["steps"]) > sum(before["steps"])
    # A stranger sending garbage is dropped too; then the real source migrates.
    bed.run(bed.source, [sys.executable, "-c", "import socket, sys; s = socket.create_connection((sys.argv[1], "
                         "7030)); s.sendall(bytes(range(256)) * 4); s.recv(1)", bed.dest.address],
            check=True, timeout=60)
    source = bed.run(bed.source, _postcopy("source", "--guest", control, "--connect", endpoint, "--key-file",
                                           good_key), capture_output=True, text=True, timeout=120)
    assert source.returncode == 0, source.stderr
    guest.wait(timeout=10)  # every page is on the destination: the source's guest quit
    os.killpg(dest.pid, signal.SIGTERM)  # the agent and its guest, which has millions of steps to go
    _, dest_err = dest.communicate(timeout=60)
    assert "authentication failed" in dest_err and "bad frame magic" in dest_err, dest_err


@pytest.mark.parametrize("argv, words", [
    (["guest", "--ram", "12Q", "--steps", "1"], "12Q"),
    (["guest", "--ram", "16M", "--workload", "nonsense", "--steps", "1"], "nonsense"),
    (["guest", "--ram", "1000001", "--steps", "1"], "page"),
    (["demo", "--ram", "12Q"], "12Q"),
    (["source", "--guest", "x", "--connect", "nohostport", "--key-file", "k"], "HOST:PORT"),
    (["dest", "--listen", "127.0.0.1:1", "--key-file", "k", "--fault-poll", "busy"], "busy"),
])
def test_bad_cli_input_is_one_clear_line_and_exit_2(argv, words):
    result = subprocess.run(_postcopy(*argv), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert words in result.stderr, result.stderr


def test_a_second_source_is_refused_as_busy_and_its_guest_runs_on(launch, tmp_path):
    import socket

    from postcopy.protocol.channel import Channel, handshake

    key = wire.new_key()
    key_file = _key_file(tmp_path / "key", key)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = subprocess.Popen(_postcopy("dest", "--listen", f"127.0.0.1:{port}", "--key-file", key_file),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    try:
        assert dest.stdout.readline().startswith("listening on")
        # Another source's main channel has the destination (it waits for its urgent one).
        first = Channel(socket.create_connection(("127.0.0.1", port), timeout=30), "main")
        handshake(first, "client", key, wire.make_hello("source", "main", os.sysconf("SC_PAGE_SIZE"),
                                                        ((0, 1 << 20),)))
        params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=3, steps=None, rate=1000)
        guest, control = launch(params)
        source = subprocess.run(_postcopy("source", "--guest", control, "--connect", f"127.0.0.1:{port}",
                                          "--key-file", key_file), capture_output=True, text=True, timeout=60)
        assert source.returncode == 1
        assert "busy: serving another migration" in source.stderr, source.stderr
        assert "goes on running on the source" in source.stderr, source.stderr
        with GuestClient(control) as client:
            assert client.status()["state"] == "running"
    finally:
        if first is not None:
            first.close()
        dest.kill()
        dest.communicate()
