"""Failures lose nothing: a dead destination, a dead source, a cancelled agent. Faults
are injected by killing processes by pid."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref

import pytest

from conftest import SLOWDOWN, pid_gone, require_netns, require_uffd
from postcopy.protocol import wire
from postcopy.kernel.dirtylog import available_backends
from postcopy.guest import GuestClient, GuestParams, reference_hash, wait_for_control
from postcopy.testbed.inject import PhaseWatch
from postcopy.testbed.netns import Testbed

PARAMS = GuestParams(ram=16 << 20, threads=2, workload="random-write", seed=9, steps=600_000 * SLOWDOWN,
                     rate=100_000)
HOLD_AT = 1_000



class Migration:
    """A guest on the source host and helpers to run the two agents against it."""

    def __init__(self, bed: Testbed, tmp_path, params: GuestParams = PARAMS, hold: bool = False, **argv_options):
        """With ``hold`` the guest parks at step HOLD_AT until it is migrated, so it is
        mid-run at the switchover however busy the host; ``argv_options`` go to the
        guest's command line."""
        self.bed, self.tmp = bed, tmp_path
        self.params = params
        self.key = str(tmp_path / "key")
        with open(self.key, "wb") as f:
            f.write(wire.new_key())
        os.chmod(self.key, 0o600)
        self.control = str(tmp_path / "guest.sock")
        if hold:
            argv_options["pause_at"] = HOLD_AT
        self.guest = bed.popen(bed.source, params.argv(control=self.control, **argv_options),
                               stdout=subprocess.PIPE, text=True)
        wait_for_control(self.control, timeout=30 * SLOWDOWN, proc=self.guest)  # Python starts slowly under emulation
        if hold:
            self.wait_state("paused", timeout=120)
        self.port = 7040
        # Short: the incoming guest's control socket path must fit AF_UNIX's limit.
        self.workdir = tempfile.mkdtemp(prefix="pc-", dir="/tmp")
        weakref.finalize(self, shutil.rmtree, self.workdir, True)
        self._dest: subprocess.Popen | None = None

    def dest(self, *extra: str) -> subprocess.Popen:
        self.port += 1
        self._dest = self.bed.popen(self.bed.dest, [sys.executable, "-m", "postcopy", "dest", "--listen",
                                                    f"{self.bed.dest.address}:{self.port}", "--key-file", self.key,
                                                    "--workdir", self.workdir, *extra],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self._dest

    def wait_phase(self, phase: str, source: subprocess.Popen) -> None:
        """Block until the migration is observably in ``phase`` (see testbed.inject)."""
        watch = PhaseWatch(self.control, self._dest, self.port, self.workdir)
        watch.wait(phase, timeout=120 * SLOWDOWN, alive=[source, self._dest])

    def source(self, *extra: str) -> subprocess.Popen:
        return self.bed.popen(self.bed.source, [sys.executable, "-m", "postcopy", "source", "--guest", self.control,
                                                "--connect", f"{self.bed.dest.address}:{self.port}",
                                                "--key-file", self.key, *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def wait_dest_guest(dest: subprocess.Popen) -> int:
        """Read the destination's stderr up to its incoming guest's pid (both channels
        are up then); returns that pid."""
        while True:
            line = dest.stderr.readline()
            if not line:
                raise AssertionError(f"the destination exited before starting its guest: {dest.communicate()}")
            match = re.search(r"incoming guest pid (\d+)", line)
            if match:
                return int(match.group(1))

    def status(self) -> dict:
        with GuestClient(self.control) as client:
            return client.status()

    def wait_state(self, state: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status["state"] == state:
                return status
            time.sleep(0.02)
        raise AssertionError(f"guest never reached {state}: {status}")

    def wait_unfenced(self, timeout: float = 120.0) -> dict:
        """Wait until no destination may run the guest any more (its fence ended)."""
        deadline = time.monotonic() + timeout
        while (status := self.status())["fence_remaining_s"] > 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"the fence never ended: {status}")
            time.sleep(0.1)
        return status

    def assert_running_on_source(self) -> None:
        before = self.status()
        time.sleep(0.2)
        after = self.status()
        assert after["state"] == "running", after
        assert sum(after["steps"]) > sum(before["steps"])


@pytest.mark.precopy
def test_dest_killed_during_precopy_guest_keeps_running(bed, tmp_path):
    if not any(reason is None for reason in available_backends().values()):
        pytest.skip(f"needs a dirty log: {available_backends()}")
    m = Migration(bed, tmp_path)
    dest = m.dest()
    # Rounds never converge: the migration stays in precopy until the destination dies.
    source = m.source("--mode", "precopy", "--downtime-limit", "0", "--max-rounds", "100000", "--stall-rounds", "0")
    m.wait_phase("precopy", source)  # connected, the guest still running here: the rounds are on
    os.kill(dest.pid, signal.SIGKILL)
    _, err = source.communicate(timeout=30 * SLOWDOWN)
    assert source.returncode == 1
    assert "goes on running on the source" in err, err
    m.assert_running_on_source()
    assert m.status().get("dirty_tracking") in (False, None)  # the dirty log was stopped


def test_dest_killed_during_postcopy_source_keeps_guest_and_retry_verifies(bed, tmp_path):
    m = Migration(bed, tmp_path, hold=True)
    dest = m.dest()
    # The pusher waits, so the migration stays in postcopy long enough to kill it there.
    source = m.source("--push-delay", "30")
    m.wait_phase("postcopy", source)
    os.kill(dest.pid, signal.SIGKILL)
    _, err = source.communicate(timeout=60)
    assert source.returncode == 1
    assert "kept paused on the source" in err and "new destination" in err, err
    assert m.status()["state"] == "paused"
    # The source cannot know the destination is dead: the retry waits out its fence.
    m.wait_unfenced()
    # Retry to a fresh destination: the paused guest moves and finishes verified.
    dest2 = m.dest()
    source2 = m.source()
    out, err = source2.communicate(timeout=120)
    assert source2.returncode == 0, err
    out, err = dest2.communicate(timeout=120)
    assert dest2.returncode == 0, err
    final = out.strip().splitlines()[-1]
    assert f'"final_hash": "{reference_hash(PARAMS)}"' in final, final
    m.guest.wait(timeout=10)


@pytest.mark.loaded
def test_source_killed_during_postcopy_dest_guest_never_runs_on(bed, tmp_path):
    m = Migration(bed, tmp_path, hold=True)
    dest = m.dest()
    source = m.source("--push-delay", "30")
    m.wait_phase("postcopy", source)
    os.kill(source.pid, signal.SIGKILL)
    _, err = dest.communicate(timeout=60)
    assert dest.returncode == 1
    assert "incoming guest was stopped" in err, err
    pid = int(re.search(r"incoming guest pid (\d+)", err).group(1))
    assert pid_gone(pid)
    # The source still holds the paused guest and all its RAM.
    assert m.status()["state"] == "paused"


def test_sigterm_to_source_before_switchover_leaves_guest_running(bed, tmp_path):
    m = Migration(bed, tmp_path)
    # No destination listens: the source is still connecting when it is stopped.
    source = m.source()
    time.sleep(0.5)
    source.send_signal(signal.SIGTERM)
    source.communicate(timeout=30)
    assert source.returncode != 0
    m.assert_running_on_source()


def test_sigterm_to_demo_leaves_nothing_behind(tmp_path):
    require_netns()
    require_uffd()
    demo = subprocess.Popen([sys.executable, "-m", "postcopy", "demo", "--ram", "16M", "--steps", "100000000",
                             "--migrate-after", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    ours, children = set(), []
    while not (ours and children) and time.monotonic() < deadline and demo.poll() is None:
        time.sleep(0.05)  # until the namespaces and the guest are there
        ours = {n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else []) if f"-{demo.pid}-" in n}
        children = _children(demo.pid)
    assert ours, "the demo made no namespaces"
    assert children, "the demo started no guest"
    demo.send_signal(signal.SIGTERM)
    demo.communicate(timeout=30)
    assert demo.returncode != 0
    left = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not (left & ours), left & ours
    # No process the demo started is left.
    assert all(pid_gone(pid) for pid in children), children


def _children(ppid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == ppid:
                found.append(int(entry))
    return found


@pytest.mark.loaded
def test_link_loss_during_postcopy_recovers_and_verifies(bed, tmp_path):
    m = Migration(bed, tmp_path, hold=True)
    dest = m.dest()
    source = m.source("--push-delay", "1")
    m.wait_phase("postcopy", source)  # the incoming guest runs and faults on the urgent channel
    bed.link_down()
    # A stranger on the destination's side sends garbage meanwhile: it is dropped, and
    # the destination goes on waiting for its own source.
    bed.run(bed.dest, [sys.executable, "-c", "import socket, sys; s = socket.create_connection((sys.argv[1], "
                       "int(sys.argv[2]))); s.sendall(b'GET / HTTP/1.0' * 64); s.recv(1)",
                       bed.dest.address, str(m.port)], check=True, timeout=60)
    time.sleep(3.0)  # the outage itself
    bed.link_up()
    _, source_err = source.communicate(timeout=120)
    assert source.returncode == 0, source_err
    assert "link recovered after" in source_err, source_err
    out, dest_err = dest.communicate(timeout=120)
    assert dest.returncode == 0, dest_err
    assert "link recovered after" in dest_err and "dropped connection" in dest_err, dest_err
    assert f'"final_hash": "{reference_hash(PARAMS)}"' in out.strip().splitlines()[-1], out
    m.guest.wait(timeout=10)
    recovered = re.search(r"link recovered after (\d+) ms", dest_err).group(1)
    print(f"recovery after a 3 s outage: destination resumed {recovered} ms after noticing the break")


def test_link_down_past_recovery_timeout_fails_and_source_keeps_guest(bed, tmp_path):
    m = Migration(bed, tmp_path, hold=True)
    dest = m.dest("--recovery-timeout", "2")
    source = m.source("--push-delay", "1", "--recovery-timeout", "2")
    m.wait_phase("postcopy", source)
    bed.link_down()
    try:
        _, source_err = source.communicate(timeout=60)
        _, dest_err = dest.communicate(timeout=60)
    finally:
        bed.link_up()
    assert source.returncode == 1
    assert "recovery timeout" in source_err and "kept paused on the source" in source_err, source_err
    assert dest.returncode == 1
    assert "recovery timeout" in dest_err and "incoming guest was stopped" in dest_err, dest_err
    assert m.status()["state"] == "paused"
