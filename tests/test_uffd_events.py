"""userfaultfd events during postcopy: a range the guest drops reads zeros afterwards,
never stale pushed data; many vCPUs faulting on the same pages lose no wake-up."""
from __future__ import annotations

import glob
import shutil
import tempfile
from pathlib import Path
import mmap
import os
import subprocess
import sys
import time

import pytest

from conftest import require_netns, require_uffd
from postcopy.protocol import wire
from postcopy.testbed.demo import DemoOptions, run_demo
from postcopy.guest import GuestClient, GuestParams, wait_for_control

PAGE = 4096
# The shared read-only slice starts at page 1 (page 0 is the state page): filled at
# boot from the seed, never written again, so its content on the source is known.
SHARED_FIRST, SHARED_PAGES = 1, 256



def _state(control: str) -> str:
    with GuestClient(control) as client:
        return client.status()["state"]


def _read_memfd(control: str, first: int, pages: int) -> bytes:
    with GuestClient(control) as client:
        _, fds = client.take_fds()
    try:
        with mmap.mmap(fds["memfd"], (first + pages) * PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as ram:
            return ram[first * PAGE:(first + pages) * PAGE]
    finally:
        for fd in fds.values():
            os.close(fd)


def test_range_discarded_during_postcopy_reads_zeros(bed, tmp_path):
    params = GuestParams(ram=16 << 20, threads=1, workload="random-write", seed=4, steps=2_000_000, rate=50_000)
    key = tmp_path / "key"
    key.write_bytes(wire.new_key())
    key.chmod(0o600)
    control = str(tmp_path / "guest.sock")
    guest = bed.popen(bed.source, params.argv(control=control), stdout=subprocess.PIPE, text=True)
    wait_for_control(control, proc=guest)
    # A short folder: the incoming guest's control socket path must fit AF_UNIX's limit.
    workdir = Path(tempfile.mkdtemp(prefix="pc-", dir="/tmp"))
    endpoint = f"{bed.dest.address}:7050"
    dest = bed.popen(bed.dest, [sys.executable, "-m", "postcopy", "dest", "--listen", endpoint, "--key-file",
                                str(key), "--workdir", str(workdir)], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    source = bed.popen(bed.source, [sys.executable, "-m", "postcopy", "source", "--guest", control, "--connect",
                                    endpoint, "--key-file", str(key), "--push-delay", "2"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Switchover done: the source guest is paused and the incoming one runs.
    deadline = time.monotonic() + 30
    while _state(control) != "paused":
        if time.monotonic() > deadline or source.poll() is not None:
            source.kill()
            dest.kill()
            pytest.fail(f"no switchover: source {source.communicate()} dest {dest.communicate()}")
        time.sleep(0.02)
    source_shared = _read_memfd(control, SHARED_FIRST, SHARED_PAGES)
    assert source_shared.count(0) < len(source_shared) // 2  # the slice holds data
    incoming = glob.glob(str(workdir / "*" / "incoming.sock"))[0]
    # The source paused its guest; the destination resumes the incoming one a moment
    # later (a busy host stretches that): wait for it to run before pausing it.
    while _state(incoming) != "running":
        if time.monotonic() > deadline + 30 or dest.poll() is not None:
            source.kill()
            dest.kill()
            pytest.fail(f"the incoming guest never ran: dest {dest.communicate()}")
        time.sleep(0.02)
    dropped_first, dropped_pages = SHARED_FIRST + 128, 64
    with GuestClient(incoming) as client:
        # The guest drops the range (MADV_DONTNEED + hole punch) at a step boundary
        # while the fault server and the pusher are at work.
        client.pause()
        client.discard([(dropped_first * PAGE, dropped_pages * PAGE)])
        client.resume()
    out, err = source.communicate(timeout=60)
    assert source.returncode == 0, err
    # Every page is in: the dropped range reads zeros, the rest of the slice is intact.
    dest_shared = _read_memfd(incoming, SHARED_FIRST, SHARED_PAGES)
    lo, hi = (dropped_first - SHARED_FIRST) * PAGE, (dropped_first - SHARED_FIRST + dropped_pages) * PAGE
    assert dest_shared[lo:hi] == bytes(hi - lo)
    assert dest_shared[:lo] == source_shared[:lo]
    assert dest_shared[hi:] == source_shared[hi:]
    with GuestClient(incoming) as client:
        client.quit()
    dest.communicate(timeout=60)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.loaded
@pytest.mark.parametrize("attempt", range(3))
def test_many_vcpus_faulting_on_the_same_pages(attempt):
    require_netns()
    require_uffd()
    # uffd-stress style: eight vCPUs hammer the same hot pages and the shared slice
    # while the pusher installs runs next to them; any lost wake-up hangs the guest.
    params = GuestParams(ram=16 << 20, threads=8, workload="hotspot", seed=20 + attempt, steps=160_000,
                         rate=40_000)
    # The guest parks at step 1000 until it is migrated: it cannot finish before the
    # agents are up, however busy the host.
    report = run_demo(DemoOptions(params=params, hold_at=1_000, timeout=240))
    assert report["verified"], report
    assert report["fault_latency_us"]["count"] > 0
