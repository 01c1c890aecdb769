"""Safety invariants (DESIGN.md): a guest runs in exactly one place, no page is ever
wrong, nothing outlives its owner. Faults are injected by killing processes by pid;
every wait is for an observable state."""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest

from conftest import require_netns, require_uffd
from test_failures import Migration, _pid_gone
from postcopy.guest import GuestClient, GuestParams, reference_hash

# Every page written before the move (sequential), parked a few thousand steps before
# its end, so it finishes on the destination long before the pusher is done.
LATE = GuestParams(ram=256 << 20, threads=1, workload="sequential", seed=3, steps=70_000)
LATE_PAUSE = LATE.steps - 5_000


@pytest.fixture
def needs_migration():
    require_netns()
    require_uffd()


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
