"""`postcopy demo --hold-at/--park-at`: a guest far too short to outlive the agents'
start-up still migrates mid-run, parked at a step, and is verified against the reference
hash (what scripts/kernel-matrix relies on under software emulation). Without the flag
the same guest finishes before the migration (test_inputs: the demo says so)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import SLOWDOWN, require_netns, require_uffd
from postcopy.kernel.dirtylog import available_backends

# Unlimited rate: this guest runs its steps in well under a second, long before
# `postcopy source` is up, so only parking keeps it mid-run.
SHORT_GUEST = ["--ram", "16M", "--threads", "1", "--workload", "random-write", "--steps", "400000",
               "--rate", "0", "--migrate-after", "0"]


def _demo(tmp_path, *argv: str) -> dict:
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "postcopy", "demo", *SHORT_GUEST, *argv, "--json", str(report)],
                            capture_output=True, text=True, timeout=240 * SLOWDOWN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished before" not in result.stderr
    return json.loads(report.read_text())


def test_demo_hold_at_migrates_the_parked_guest_and_verifies(tmp_path):
    require_netns()
    require_uffd()
    report = _demo(tmp_path, "--mode", "postcopy", "--hold-at", "200000")
    assert report["verified"] is True, (report["final_hash"], report["reference_hash"])
    assert report["guest"]["params"]["steps"] == 400000
    # Half the steps were left to run on the destination, over pages it had to fetch.
    assert report["pages"]["demand"] + report["pages"]["pushed"] > 0


def test_demo_park_at_parks_near_the_end_and_verifies(tmp_path):
    require_netns()
    require_uffd()
    backends = [name for name, reason in available_backends().items() if reason is None]
    if not backends:
        pytest.skip(f"needs a dirty log for a precopy demo: {available_backends()}")
    report = _demo(tmp_path, "--mode", "precopy", "--dirty-log", backends[0], "--park-at", "399000")
    assert report["verified"] is True, (report["final_hash"], report["reference_hash"])
    assert report["dirty_log"] == backends[0]
    assert report["precopy_rounds"], "a precopy migration has at least its first round"


def test_a_failed_source_brings_the_destinations_own_words():
    # "the peer closed the connection" is all a source knows when its destination gave
    # up: the demo adds what the destination said.
    from postcopy.testbed.demo import _last_words

    dest = subprocess.Popen([sys.executable, "-c", "import sys; print('incoming guest did not start', "
                             "file=sys.stderr); sys.exit(3)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert _last_words(dest, "postcopy dest") == "; postcopy dest exited 3: incoming guest did not start"
