"""Safety invariants (DESIGN.md): a guest runs in exactly one place, no page is ever
wrong, nothing outlives its owner. Faults are injected by killing processes by pid;
every wait is for an observable state."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import pid_gone
from test_failures import PARAMS, Migration
from postcopy.guest import GuestClient, GuestError, GuestParams, reference_hash, wait_for_control
from postcopy.kernel.dirtylog import available_backends
from postcopy.kernel.process import die_with_parent as _die_with

# Every page written before the move (sequential), parked a few thousand steps before
# its end, so it finishes on the destination long before the pusher is done.
LATE = GuestParams(ram=256 << 20, threads=1, workload="sequential", seed=3, steps=70_000)
LATE_PAUSE = LATE.steps - 5_000
# The other tests park their guest half-way before the agents start (however slow the
# machine, it cannot finish first) and let it run on from there wherever it moves.
HALF = PARAMS.steps // 2


def _parked(bed, tmp_path, params: GuestParams = PARAMS) -> Migration:
    m = Migration(bed, tmp_path, params, pause_at=HALF)
    m.wait_state("paused", timeout=60)
    return m


def _wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_guest_finishing_during_postcopy_waits_for_every_page(bed, tmp_path):
    m = Migration(bed, tmp_path, LATE, pause_at=LATE_PAUSE)
    m.wait_state("paused", timeout=60)
    dest = m.dest()
    # The pusher holds back: the guest's last steps fault in only what they touch, and
    # it reaches its end while most of its pages are still on the source.
    source = m.source("--push-delay", "3")
    s_out, s_err = source.communicate(timeout=120)
    d_out, d_err = dest.communicate(timeout=120)
    assert source.returncode == 0, s_err
    assert dest.returncode == 0, d_err
    final = d_out.strip().splitlines()[-1]
    assert f'"final_hash": "{reference_hash(LATE)}"' in final, (final, d_err)


def test_a_second_source_is_refused_while_one_holds_the_lease(bed, tmp_path):
    m = _parked(bed, tmp_path)
    # Nobody listens yet: the first source keeps trying to connect, holding the lease.
    first = m.source()
    _wait_for(lambda: m.status()["lease_pid"] == first.pid, "the first source's lease")
    second = m.source()
    _, err = second.communicate(timeout=60)
    assert second.returncode == 1, err
    assert "already being migrated" in err and str(first.pid) in err, err
    # The first source dies: its lease goes with its control connection.
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    _wait_for(lambda: m.status()["lease_pid"] is None, "the lease to end with its source")
    assert m.status()["state"] == "paused"
    # Now a migration goes through, and verifies.
    dest = m.dest()
    third = m.source()
    _, err = third.communicate(timeout=120)
    assert third.returncode == 0, err
    out, err = dest.communicate(timeout=120)
    assert dest.returncode == 0, err
    assert f'"final_hash": "{reference_hash(PARAMS)}"' in out.strip().splitlines()[-1], out


def test_source_killed_after_switchover_no_second_copy_until_dest_stopped(bed, tmp_path):
    m = _parked(bed, tmp_path)
    dest = m.dest("--recovery-timeout", "2")
    # The pusher waits: the migration stays in postcopy, the destination guest runs.
    source = m.source("--push-delay", "60", "--recovery-timeout", "2")
    dest_guest = m.wait_dest_guest(dest)
    _wait_for(lambda: m.status()["fence_remaining_s"] > 0, "the switchover fence")
    os.kill(source.pid, signal.SIGKILL)
    source.communicate()
    # At once: the paused source guest can be neither migrated again nor resumed.
    retry = m.source()
    _, err = retry.communicate(timeout=60)
    assert retry.returncode == 1, err
    assert re.search(r"for another \d+(\.\d+)? s", err) and "Retry after" in err, err
    with GuestClient(m.control) as client:
        with pytest.raises(GuestError, match="resume refused"):
            client.resume()
    # The fence ends only after the old destination has stopped its guest.
    m.wait_unfenced()
    assert pid_gone(dest_guest), "the old destination's guest outlived the fence"
    _, dest_err = dest.communicate(timeout=60)
    assert dest.returncode == 1 and "incoming guest was stopped" in dest_err, dest_err
    # Then, and only then, the guest moves again, and verifies.
    dest2 = m.dest()
    source2 = m.source()
    _, err = source2.communicate(timeout=120)
    assert source2.returncode == 0, err
    out, err = dest2.communicate(timeout=120)
    assert dest2.returncode == 0, err
    assert f'"final_hash": "{reference_hash(PARAMS)}"' in out.strip().splitlines()[-1], out


def test_dest_killed_leaves_no_guest_and_no_work_folder(bed, tmp_path):
    m = _parked(bed, tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    dest = m.dest("--workdir", str(workdir))
    source = m.source("--push-delay", "60")
    dest_guest = m.wait_dest_guest(dest)
    _wait_for(lambda: m.status()["fence_remaining_s"] > 0, "the switchover")
    assert [p.name for p in workdir.iterdir()] == [p.name for p in workdir.glob(f"postcopy-dest-{dest.pid}-*")]
    os.kill(dest.pid, signal.SIGKILL)
    dest.communicate()
    _wait_for(lambda: pid_gone(dest_guest), "the incoming guest to die with its agent")
    source.kill()
    source.communicate()
    # The next destination agent removes the dead one's work folder before it listens.
    dest2 = m.dest("--workdir", str(workdir))
    assert dest2.stdout.readline().startswith("listening on"), dest2.poll()
    assert not list(workdir.glob(f"postcopy-dest-{dest.pid}-*")), list(workdir.iterdir())
    dest2.kill()
    dest2.communicate()


def test_attached_incoming_guest_stops_when_its_agent_dies(bed, tmp_path):
    m = _parked(bed, tmp_path)
    incoming = str(tmp_path / "incoming.sock")
    guest = bed.popen(bed.dest, GuestParams(ram=PARAMS.ram, threads=1, workload="idle", seed=0, steps=None)
                      .argv(control=incoming, incoming=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
    wait_for_control(incoming, proc=guest)
    dest = m.dest("--attach", incoming)
    source = m.source("--push-delay", "60")
    _wait_for(lambda: m.status()["fence_remaining_s"] > 0, "the switchover")
    os.kill(dest.pid, signal.SIGKILL)
    dest.communicate()
    _, err = guest.communicate(timeout=60)
    assert guest.returncode == 1 and "destination agent went away" in err, err
    source.kill()
    source.communicate()


def test_source_killed_mid_precopy_ends_dirty_tracking(bed, tmp_path):
    reason = available_backends().get("pagemap-scan", "unknown")
    if reason is not None:
        pytest.skip(f"needs the pagemap-scan dirty log: {reason}")
    m = Migration(bed, tmp_path, dataclasses.replace(PARAMS, steps=None))  # runs until stopped
    m.dest()
    # Rounds never converge: the source stays in precopy until it is killed.
    source = m.source("--mode", "precopy", "--dirty-log", "pagemap-scan", "--downtime-limit", "0",
                      "--max-rounds", "100000", "--stall-rounds", "0")
    _wait_for(lambda: m.status()["dirty_tracking"], "dirty tracking to start")
    os.kill(source.pid, signal.SIGKILL)
    source.communicate()
    _wait_for(lambda: not m.status()["dirty_tracking"], "dirty tracking to end with its source")
    m.assert_running_on_source()


def test_child_dies_with_the_agent_that_started_it(tmp_path):
    """PR_SET_PDEATHSIG in the child: a kill -9 of its parent takes it along; a
    parent that died before the prctl is caught by the getppid() check."""
    agent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        "from postcopy.kernel.process import die_with_parent as _die_with\n"
        "child = subprocess.Popen(['sleep', '600'], preexec_fn=_die_with(os.getpid()))\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    child = int(agent.stdout.readline())
    os.kill(agent.pid, signal.SIGKILL)
    agent.communicate()
    _wait_for(lambda: pid_gone(child), "the child to die with its parent")
    # A parent that is not the child's parent any more (it died before the prctl).
    orphan = subprocess.run(["true"], preexec_fn=_die_with(os.getppid()))
    assert orphan.returncode == 1



def test_stopped_destination_agent_its_guest_stops_before_the_fence_ends(bed, tmp_path):
    """A destination agent that is stopped (not dead) cannot stop its guest: the guest's
    own watchdog, renewed by the agent only while it runs and hears the source, does."""
    m = _parked(bed, tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    dest = m.dest("--recovery-timeout", "2", "--workdir", str(workdir))
    source = m.source("--push-delay", "60", "--recovery-timeout", "2")
    dest_guest = m.wait_dest_guest(dest)
    incoming = str(_wait_for(lambda: next(workdir.glob("postcopy-dest-*/incoming.sock"), None),
                             "the destination guest's control socket"))

    def resumed() -> bool:  # the destination took the switchover: its guest runs
        with GuestClient(incoming) as client:
            return client.status()["state"] != "incoming"

    _wait_for(resumed, "the destination guest to resume")
    os.kill(dest.pid, signal.SIGSTOP)
    try:
        os.kill(source.pid, signal.SIGKILL)
        source.communicate()
        m.wait_unfenced()
        assert pid_gone(dest_guest), "the stopped destination's guest outlived the fence"
    finally:
        os.kill(dest.pid, signal.SIGCONT)
        dest.kill()
        dest.communicate()
