"""Continuous checkpointing: the standby keeps only complete epochs, and a guest started
from the last complete epoch finishes with the reference hash."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import require_netns, require_uffd
from postcopy.protocol import wire
from postcopy.checkpoint.primary import CheckpointConfig, Checkpointer, bound_problem, steps_per_epoch
from postcopy.guest import GuestClient, GuestParams, reference_hash, wait_for_control
from postcopy.checkpoint.epochdoorbell import DoorbellRunner
from postcopy.checkpoint.epochrun import EpochRunner
from postcopy.checkpoint.reference import reference_hash_at
from postcopy.checkpoint.standby import Standby, StandbyConfig
from postcopy.protocol.channel import Channel, handshake

PS = os.sysconf("SC_PAGE_SIZE")


def _require_dirty_log() -> None:
    require_uffd()
    from postcopy.kernel.dirtylog import available_backends

    reasons = available_backends()
    if all(reason is not None for reason in reasons.values()):
        pytest.skip("needs a dirty log: " + "; ".join(reasons.values()))


def _postcopy(*args: str) -> list[str]:
    return [sys.executable, "-m", "postcopy", *args]


@pytest.fixture
def tmp_path():
    """A private temporary directory: short (Unix socket paths are limited to 107 bytes)
    and out of reach of the basetemp clean-up of other pytest sessions running at the
    same time."""
    with tempfile.TemporaryDirectory(prefix="pc-ckpt-") as path:
        yield pathlib.Path(path)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


# -- the dirty bound ------------------------------------------------------------------------
def test_step_budget_keeps_the_dirty_bound():
    assert steps_per_epoch(64, 1) == 63  # 63 written pages + the state page
    assert steps_per_epoch(64, 2) == 31
    assert steps_per_epoch(1024, 4) == 255
    with_free = steps_per_epoch(1024, 1, free_fraction=0.25)
    assert with_free + 3 * -(-with_free // 256) <= 1023 < with_free + 1 + 3 * -(-(with_free + 1) // 256)
    assert bound_problem(64, 1) is None
    assert "below what one step" in bound_problem(2, 2)


# -- the standby alone, against a scripted primary --------------------------------------------
class _ScriptedPrimary:
    """A primary speaking the epoch protocol by hand (no guest needed)."""

    def __init__(self, port: int, key: bytes, npages: int):
        self.layout_regions = ((0, npages * PS),)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.channel = Channel(sock, "main", wire.Layout(PS, self.layout_regions),
                               wire.Session(wire.CHECKPOINT, "primary"))
        handshake(self.channel, "client", key, wire.make_hello("primary", "main", PS, self.layout_regions))
        self.channel.session.established()
        self.epoch = 0  # the epoch being sent
        self.open = False

    def pages(self, first: int, fill: int, n: int = 1, cause=wire.Cause.RESENT) -> None:
        if cause == wire.Cause.RESENT and not self.open:
            self.channel.send(wire.EpochBegin(epoch=self.epoch))
            self.open = True
        self.channel.send(wire.PageRun(first, n, cause, bytes([fill]) * (n * PS)))

    def marker(self, epoch: int, pages: int, steps=(0,)) -> None:
        info = {"epoch": epoch, "pages": pages, "steps": list(steps)}
        if epoch == 0:
            info.update(initial=True, guest={"backing": "memfd"})
        elif not self.open:
            self.channel.send(wire.EpochBegin(epoch=epoch))
        self.channel.send(wire.EpochCommit(info=info))
        self.epoch, self.open = epoch + 1, False

    def ack(self) -> int:
        message = self.channel.recv()
        assert isinstance(message, wire.EpochAck), message
        return message.info["epoch"]


@pytest.fixture(params=[True, False], ids=["c-loop", "python-loop"])
def standby(request):
    key = wire.new_key()
    sb = Standby(StandbyConfig(listen=("127.0.0.1", 0), key=key, timeout=10, native_loop=request.param))
    port = sb.bind().getsockname()[1]
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(sb.run()), daemon=True)
    thread.start()
    yield sb, port, key, thread, result
    thread.join(timeout=10)
    sb.close()


def _image(sb: Standby, page: int) -> bytes:
    return bytes(sb._image[page * PS:(page + 1) * PS])


def test_a_half_received_epoch_is_never_applied(standby):
    sb, port, key, thread, result = standby
    primary = _ScriptedPrimary(port, key, npages=16)
    primary.pages(0, 0xA0, n=4, cause=wire.Cause.PRECOPY)  # initial sync: pages 0-3
    primary.marker(0, 4)
    primary.pages(0, 0xB0)
    primary.pages(2, 0xB2)
    primary.marker(1, 2, steps=(10,))
    assert primary.ack() == 1
    primary.pages(0, 0xC0)  # epoch 2: the state page and one more page arrive, then the link dies
    primary.pages(3, 0xC3)
    primary.channel.close()
    thread.join(timeout=10)
    assert result["end_reason"] == "connection-lost" and result["primary_lost"]
    assert result["committed_epoch"] == 1 and result["committed_steps"] == [10]
    assert result["discarded_partial_epoch"] == {"epoch": 2, "pages": 2}
    assert [_image(sb, p)[0] for p in range(4)] == [0xB0, 0xA0, 0xB2, 0xA0]
    assert _image(sb, 5) == bytes(PS)  # never sent: a hole


def test_an_epoch_larger_than_the_receive_buffer_is_applied_whole(standby):
    sb, port, key, thread, result = standby
    npages = 4200  # 16 MiB: several times the largest frame the receive buffer is sized for
    primary = _ScriptedPrimary(port, key, npages=npages)
    primary.marker(0, 0)
    pages = 0
    for first in range(0, npages, 300):  # runs of 100 pages, gaps between them
        primary.pages(first, first // 300 % 251, n=100)
        pages += 100
    primary.marker(1, pages)
    assert primary.ack() == 1
    primary.pages(300, 0xEE, n=100)  # a partial epoch 2 must not touch epoch 1's pages
    primary.channel.close()
    thread.join(timeout=10)
    assert result["committed_epoch"] == 1 and result["epoch_pages"]["max"] == pages
    for first in range(0, npages, 300):
        assert _image(sb, first)[0] == _image(sb, first + 99)[-1] == first // 300 % 251
        assert _image(sb, first + 100) == bytes(PS)
    assert result["discarded_partial_epoch"] == {"epoch": 2, "pages": 100}


def test_an_epoch_whose_page_count_disagrees_is_refused(standby):
    sb, port, key, thread, result = standby
    primary = _ScriptedPrimary(port, key, npages=8)
    primary.marker(0, 0)
    primary.pages(1, 0x11)
    primary.marker(1, 1)
    assert primary.ack() == 1
    primary.pages(1, 0x22)
    primary.marker(2, 3)  # announces pages that never came
    message = primary.channel.recv()
    assert isinstance(message, wire.Error) and "announces 3 pages, 1 arrived" in message.reason
    thread.join(timeout=10)
    assert result["end_reason"] == "protocol-error" and not result["primary_lost"]
    assert result["committed_epoch"] == 1
    assert _image(sb, 1)[0] == 0x11


# -- primary and standby with a real guest ------------------------------------------------------
def _start_guest(params: GuestParams, control: str, start_paused: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen(params.argv(control=control, start_paused=start_paused), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_control(control, proc=proc)
    return proc


@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_failover_after_a_cut_mid_epoch_starts_from_the_previous_epoch(tmp_path, backing):
    _require_dirty_log()
    params = GuestParams(ram=8 << 20, threads=2, workload="random-write", seed=21, steps=300_000, backing=backing)
    # Paused at first (however slow the machine, it cannot finish before the epochs): it
    # runs only in the epochs, so the cut surely comes mid-run.
    control = str(tmp_path / "g.sock")
    guest = _start_guest(params, control, start_paused=True)
    key = wire.new_key()
    sb = Standby(StandbyConfig(listen=("127.0.0.1", 0), key=key, failover=True, timeout=10))
    try:
        port = sb.bind().getsockname()[1]
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(sb.run()), daemon=True)
        thread.start()
        primary = Checkpointer(CheckpointConfig(guest_control=control, endpoint=("127.0.0.1", port),
                                                key=key, max_dirty=128, cut_mid_epoch=20, max_unacked=0))
        figures = primary.run()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert figures["end_reason"] == "standby-lost", figures
        assert "fault injection" in figures["error"]
        assert figures["committed_epoch"] == 20
        # The primary lost its standby: its guest is left as found (paused), undisturbed.
        with GuestClient(control) as client:
            assert client.status()["state"] == "paused"
            client.resume()
        out, _ = guest.communicate(timeout=60)
        reference = reference_hash(params)
        assert f"final_hash {reference}" in out
        # The standby kept epoch 20, dropped the half of epoch 21, and failed over from 20.
        assert result["end_reason"] == "connection-lost"
        assert result["committed_epoch"] == 20
        assert result["discarded_partial_epoch"]["epoch"] == 21
        assert result["discarded_partial_epoch"]["pages"] > 0
        steps = result["committed_steps"]
        assert steps[0] == steps[1] > 0
        assert result["image_hash"] == reference_hash_at(params, steps[0], str(tmp_path))
        failover = result["failover"]
        assert failover["epoch"] == 20 and failover["guest_exit_code"] == 0 and failover["backing"] == backing
        assert failover["final_hash"] == reference
        assert figures["dirty_pages"]["max"] <= 128 and figures["bound_exceeded"] == 0
        assert figures["epoch_driver"] == "doorbell"  # pagemap-scan, no interval: epochs in shared memory
    finally:
        _kill(guest)
        sb.close()


def test_interval_and_overlap_epochs_then_a_clean_stop_does_not_fail_over(tmp_path):
    _require_dirty_log()
    # 2000 steps/s: a 1024-page budget would take half a second; 5 ms intervals end the epochs.
    params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=4, steps=1_000_000, rate=2000)
    control = str(tmp_path / "g.sock")
    guest = _start_guest(params, control)
    key = wire.new_key()
    sb = Standby(StandbyConfig(listen=("127.0.0.1", 0), key=key, failover=True, timeout=10))
    try:
        port = sb.bind().getsockname()[1]
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(sb.run()), daemon=True)
        thread.start()
        figures = Checkpointer(CheckpointConfig(guest_control=control, endpoint=("127.0.0.1", port), key=key,
                                                max_dirty=1024, interval_ms=5, epochs=15, overlap=True)).run()
        thread.join(timeout=30)
        assert figures["ok"] and figures["end_reason"] == "epochs"
        assert figures["epochs"] == figures["committed_epoch"] == 15
        assert figures["interval_pauses"] >= 10
        assert figures["epoch_driver"] == "run"  # an interval pauses from outside: a request per epoch
        assert figures["dirty_pages"]["max"] < 1024
        assert result["end_reason"] == "primary-stopped" and "failover" not in result
        assert sb.failover_proc is not None  # the warm standby guest, stopped by close()
        assert result["image_hash"] == reference_hash_at(params, result["committed_steps"][0], str(tmp_path))
        with GuestClient(control) as client:  # left running, as it was found
            assert client.status()["state"] == "running"
    finally:
        _kill(guest)
        sb.close()
    assert sb.failover_proc.poll() is not None


def test_long_epochs_keep_the_standby_from_failing_over(tmp_path):
    _require_dirty_log()
    # 500 steps/s and 255 steps per epoch: each epoch runs half a second, longer than the
    # standby's patience; the primary's heartbeats keep it waiting.
    params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=8, steps=100_000, rate=500)
    control = str(tmp_path / "g.sock")
    guest = _start_guest(params, control, start_paused=True)
    key = wire.new_key()
    sb = Standby(StandbyConfig(listen=("127.0.0.1", 0), key=key, failover=True, timeout=0.3))
    try:
        port = sb.bind().getsockname()[1]
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(sb.run()), daemon=True)
        thread.start()
        figures = Checkpointer(CheckpointConfig(guest_control=control, endpoint=("127.0.0.1", port), key=key,
                                                max_dirty=256, epochs=3, heartbeat=0.05)).run()
        thread.join(timeout=30)
        assert figures["ok"], figures
        assert result["end_reason"] == "primary-stopped" and result["committed_epoch"] == 3
        assert "failover" not in result
        with GuestClient(control) as client:
            assert client.status()["steps"] == [2 * 255]  # epochs 2 and 3 each ran one budget
    finally:
        _kill(guest)
        sb.close()


@pytest.mark.parametrize("max_unacked,doorbell,native,overlap", [
    (0, True, True, None), (2, True, True, None), (2, True, True, False), (0, True, False, None),
    (2, True, False, None), (2, False, False, None)])
def test_a_lagging_standby_holds_the_guest(tmp_path, monkeypatch, max_unacked, doorbell, native, overlap):
    """At most max_unacked epochs go unacknowledged while the guest runs (0: every epoch
    is committed before the guest runs on), whichever side reads the acknowledgements:
    the Python loop or the C loop (native/ckpt_primary.c; it logs the lag itself), the
    epochs sent while the guest is parked or (the C loop's default) while it runs."""
    _require_dirty_log()
    params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=5, steps=1_000_000)
    control = str(tmp_path / "g.sock")
    guest = _start_guest(params, control, start_paused=True)
    key = wire.new_key()
    sb = Standby(StandbyConfig(listen=("127.0.0.1", 0), key=key, timeout=10))
    try:
        port = sb.bind().getsockname()[1]
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(sb.run()), daemon=True)
        thread.start()
        lag: list[int] = []  # epochs sent but unacknowledged whenever the guest was let run
        primary = Checkpointer(CheckpointConfig(guest_control=control, endpoint=("127.0.0.1", port), key=key,
                                                max_dirty=64, epochs=40, max_unacked=max_unacked,
                                                doorbell=doorbell, native_loop=native, overlap=overlap))
        for runner_class in (EpochRunner, DoorbellRunner):  # whichever lets the guest run
            def watched_start(runner, steps, harvest, start=runner_class.start):
                lag.append(primary.epoch - primary.acked)
                start(runner, steps, harvest)

            monkeypatch.setattr(runner_class, "start", watched_start)
        figures = primary.run()
        thread.join(timeout=30)
        assert figures["ok"] and figures["committed_epoch"] == 40
        assert figures["epoch_loop"] == ("native" if native else "python")
        assert figures["overlap"] == (native and max_unacked > 0 and overlap is None)
        if not native:
            assert len(lag) == 39 and max(lag) <= max_unacked
        else:  # the first epoch goes from Python, the rest from C
            assert len(lag) == 1
        assert figures["unacked_at_resume"]["count"] == 39 and figures["unacked_at_resume"]["max"] <= max_unacked
        assert figures["epoch_driver"] == ("doorbell" if doorbell else "run")
        assert result["committed_epoch"] == 40
    finally:
        _kill(guest)
        sb.close()


# -- the commands, across the two namespaces -----------------------------------------------------
@pytest.fixture
def bed():
    require_netns()
    _require_dirty_log()
    from postcopy.testbed.netns import Testbed

    with Testbed() as testbed:
        yield testbed


@pytest.mark.loaded
def test_failover_from_a_checkpoint_verifies(bed, tmp_path):
    """The primary guest is killed mid-run; the standby starts it from the last
    complete epoch in the other namespace and it ends with the reference hash."""
    params = GuestParams(ram=16 << 20, threads=1, workload="random-write", seed=9, steps=1_000_000)
    control = str(tmp_path / "g.sock")
    key_file = tmp_path / "key"
    key_file.write_bytes(wire.new_key())
    key_file.chmod(0o600)  # agents refuse a key others can read
    endpoint = f"{bed.dest.address}:7031"
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Started paused, the guest runs only in the epochs: it is surely mid-run when killed.
    guest = bed.popen(bed.source, params.argv(control=control, start_paused=True), **pipes)
    wait_for_control(control, proc=guest)
    standby = bed.popen(bed.dest, _postcopy("standby", "--listen", endpoint, "--key-file", str(key_file),
                                            "--failover", "--json", str(tmp_path / "standby.json")), **pipes)
    assert standby.stdout.readline().startswith("listening")
    primary = bed.popen(bed.source, _postcopy("checkpoint", "--guest", control, "--connect", endpoint,
                                              "--key-file", str(key_file), "--max-dirty", "256",
                                              "--json", str(tmp_path / "primary.json")), **pipes)
    line = primary.stdout.readline()
    assert line.startswith("protected: epoch 1 committed"), (line, primary.stderr.read() if not line else "")
    with GuestClient(control) as client:  # let a few more epochs pass
        start = client.status()["steps"][0]
        while client.status()["steps"][0] < start + 20 * 255:
            time.sleep(0.01)
    guest.kill()  # by pid: the primary host's guest dies mid-run
    guest.communicate()
    p_out, p_err = primary.communicate(timeout=60)
    s_out, s_err = standby.communicate(timeout=120)
    assert primary.returncode == 1 and "guest-lost" in p_err
    assert standby.returncode == 0, s_err
    figures = json.loads((tmp_path / "standby.json").read_text())
    assert figures["end_reason"] == "primary-guest-lost"
    epoch, steps = figures["committed_epoch"], figures["committed_steps"][0]
    assert epoch >= 20 and 0 < steps < params.steps
    assert figures["failover"]["epoch"] == epoch
    reference = reference_hash(params)
    assert figures["failover"]["final_hash"] == reference
    assert f"final_hash {reference}" in s_out
    assert figures["image_hash"] == reference_hash_at(params, steps, str(tmp_path))
    primary_figures = json.loads((tmp_path / "primary.json").read_text())
    assert primary_figures["end_reason"] == "guest-lost"
    assert primary_figures["dirty_pages"]["max"] <= 256


# -- user errors ------------------------------------------------------------------------------------
def test_user_errors_are_one_clear_line(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(wire.new_key())
    key_file.chmod(0o600)  # agents refuse a key others can read
    run = lambda *a: subprocess.run(_postcopy(*a), capture_output=True, text=True, timeout=60)  # noqa: E731
    r = run("checkpoint", "--guest", str(tmp_path / "nope.sock"), "--connect", "127.0.0.1:9", "--key-file",
            str(key_file))
    assert r.returncode == 1 and "cannot reach guest control socket" in r.stderr and "Traceback" not in r.stderr
    r = run("standby", "--listen", "127.0.0.1:9", "--key-file", str(tmp_path / "missing"))
    assert r.returncode == 2 and "cannot use key file" in r.stderr and "Traceback" not in r.stderr
    r = run("checkpoint", "--guest", "x", "--connect", "nohostport", "--key-file", str(key_file))
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    r = run("checkpoint", "--guest", "x", "--connect", "127.0.0.1:9", "--key-file", str(key_file),
            "--epochs", "3", "--seconds", "1")
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_strangers_cannot_stop_the_standby_and_a_wrong_key_leaves_the_guest_alone(tmp_path):
    """Garbage from a raw TCP client and a primary with the wrong key are dropped (the
    wrong-key primary fails cleanly, its guest untouched); the standby keeps listening
    and then protects the right primary's guest."""
    _require_dirty_log()
    params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=2, steps=100_000)
    control = str(tmp_path / "g.sock")
    guest = _start_guest(params, control, start_paused=True)
    standby = None
    try:
        for name in "ab":
            (tmp_path / name).write_bytes(wire.new_key())
            (tmp_path / name).chmod(0o600)  # agents refuse a key others can read
        with socket.socket() as probe:  # a free port on loopback
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        standby = subprocess.Popen(_postcopy("standby", "--listen", f"127.0.0.1:{port}", "--key-file",
                                             str(tmp_path / "a")), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        assert standby.stdout.readline().startswith("listening")
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"\xff" * 4096)  # not a frame: dropped, whatever it says
            assert raw.recv(1 << 16) == b""  # the standby closed it
        wrong = subprocess.run(_postcopy("checkpoint", "--guest", control, "--connect", f"127.0.0.1:{port}",
                                         "--key-file", str(tmp_path / "b")), capture_output=True, text=True,
                               timeout=60)
        assert wrong.returncode == 1 and "handshake with the standby failed" in wrong.stderr, wrong.stderr
        assert "Traceback" not in wrong.stderr
        with GuestClient(control) as client:
            status = client.status()
        assert status["state"] == "paused" and not status["dirty_tracking"] and status["steps"] == [0]
        assert standby.poll() is None  # still listening
        right = subprocess.run(_postcopy("checkpoint", "--guest", control, "--connect", f"127.0.0.1:{port}",
                                         "--key-file", str(tmp_path / "a"), "--epochs", "3"),
                               capture_output=True, text=True, timeout=120)
        assert right.returncode == 0, right.stderr
        _, s_err = standby.communicate(timeout=60)
        assert standby.returncode == 0, s_err
        assert s_err.count("dropped connection") == 2 and "authentication failed" in s_err, s_err
        assert "Traceback" not in s_err
    finally:
        if standby is not None and standby.poll() is None:
            standby.kill()
            standby.communicate()
        _kill(guest)


def test_a_checkpointed_guest_is_not_taken_by_a_second_primary_or_a_migration_source(tmp_path):
    """The primary holds the guest's lease: a second primary and a migration source are
    refused with a clear error while it checkpoints, and it goes on untouched."""
    _require_dirty_log()
    params = GuestParams(ram=8 << 20, threads=1, workload="random-write", seed=4, steps=50_000_000, rate=20_000)
    control = str(tmp_path / "g.sock")
    guest = _start_guest(params, control)
    key_file = tmp_path / "key"
    key_file.write_bytes(wire.new_key())
    key_file.chmod(0o600)
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    standby = primary = None
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        standby = subprocess.Popen(_postcopy("standby", "--listen", f"127.0.0.1:{port}", "--key-file",
                                             str(key_file)), **pipes)
        assert standby.stdout.readline().startswith("listening")
        primary = subprocess.Popen(_postcopy("checkpoint", "--guest", control, "--connect", f"127.0.0.1:{port}",
                                             "--key-file", str(key_file)), **pipes)
        line = primary.stdout.readline()
        assert line.startswith("protected: epoch 1 committed"), (line, primary.stderr.read() if not line else "")
        second = subprocess.run(_postcopy("checkpoint", "--guest", control, "--connect", f"127.0.0.1:{port}",
                                          "--key-file", str(key_file)), capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "already being migrated or checkpointed" in second.stderr, second.stderr
        assert str(primary.pid) in second.stderr, second.stderr
        source = subprocess.run(_postcopy("source", "--guest", control, "--connect", "127.0.0.1:9",
                                          "--key-file", str(key_file)), capture_output=True, text=True, timeout=60)
        assert source.returncode == 1 and "already being migrated or checkpointed" in source.stderr, source.stderr
        assert "Traceback" not in second.stderr + source.stderr
        primary.send_signal(signal.SIGINT)  # a clean end after the current epoch
        p_out, p_err = primary.communicate(timeout=60)
        assert primary.returncode == 0, p_err
        _, s_err = standby.communicate(timeout=60)
        assert standby.returncode == 0, s_err
        with GuestClient(control) as client:
            assert client.status()["state"] == "running"  # left as it was found
    finally:
        for proc in (primary, standby):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
        _kill(guest)
