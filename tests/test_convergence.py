"""Issue 13 end to end: precopy that converges with auto-converge, the events file of
a real migration in a legal order, the live progress line only where asked, and the
source's status socket during a migration."""
from __future__ import annotations

import json

import pytest

from conftest import require_netns, require_uffd
from postcopy.guest import GuestParams
from postcopy.migration.progress import legal_order

# 50k random writes/s per vCPU on 128 MiB: the case that never converged unthrottled.
HEAVY = GuestParams(ram=128 << 20, threads=2, workload="random-write", seed=13, steps=1_500_000, rate=50_000)


def _demo(tmp_path, params: GuestParams, mode: str, *source_options: str, **options) -> tuple[dict, list[dict]]:
    require_netns()
    require_uffd()
    from postcopy.testbed.demo import DemoOptions, run_demo

    events = tmp_path / "events.jsonl"
    result = run_demo(DemoOptions(params=params, mode=mode, migrate_after=0.5, park_at=params.steps - 1000,
                                  source_options=(*source_options, "--events", str(events)), **options))
    return result, [json.loads(line) for line in events.read_text().splitlines()]


def test_auto_converge_makes_a_heavy_writer_converge_and_verify(tmp_path):
    result, events = _demo(tmp_path, HEAVY, "precopy", "--auto-converge", downtime_limit_ms=300, stall_rounds=3,
                           max_rounds=60)
    source = result["source"]
    assert result["verified"], result
    assert source["stop_reason"].startswith("converged"), source["stop_reason"]
    assert all("throttle_pct" in r and "dirty_rate" in r for r in source["rounds"])
    assert source["convergence_prediction"] is not None
    phases = [e["event"] for e in events]
    assert legal_order(phases) and phases[-1] == "done", phases
    throttles = [e["throttle_pct"] for e in events if e["event"] == "precopy"]
    assert throttles == sorted(throttles)  # auto-converge only ever raises the throttle
    assert [r["throttle_pct"] for r in source["rounds"]][0] == 0  # round 0 runs unthrottled


def test_pusher_sends_the_stale_set_before_its_sweep():
    """Hybrid: after the switchover the stale set goes first on the main channel."""
    import os
    import socket
    import threading

    from postcopy.migration.guestmem import GuestMemory
    from postcopy.migration.sender import PageSender
    from postcopy.protocol import wire
    from postcopy.protocol.channel import Channel

    npages, ps = 1024, 4096
    fd = os.memfd_create("pusher-test")
    os.ftruncate(fd, npages * ps)
    os.pwrite(fd, b"\x01" * npages * ps, 0)  # every page populated
    mem = GuestMemory({"pid": os.getpid(), "ram_address": 0, "ram_size": npages * ps, "page_size": ps},
                      {"memfd": fd})

    def pushed(stale, precopied, plane_first=False):
        sender = PageSender(mem, run_pages=256)
        if plane_first:  # as the source does: plane and sent map made before the pause
            sender.make_plane(precopied)
        sender.prepare_postcopy(stale, precopied=precopied)
        a, b = socket.socketpair()
        main = Channel(a, "main", mem.layout)
        raw = bytearray()
        reader = threading.Thread(target=lambda: [raw.extend(c) for c in iter(lambda: b.recv(1 << 16), b"")])
        reader.start()
        sender.push(main)
        main.close()
        reader.join()
        b.close()
        decoder = wire.Decoder(mem.layout)
        decoder.feed(raw)
        return [(m.first_page, m.npages) for m in decoder]

    assert pushed([(700, 10), (100, 5)], True) == [(700, 10), (100, 5)]  # precopied: only the stale runs, in order
    runs = pushed([(900, 3)], False)  # pure postcopy with a priority run
    assert runs[:2] == [(900, 3), (1, 256)]  # then the sweep (page 0 went with the state)
    assert sum(count for _, count in runs) == 1023
    for precopied, stale in ((True, [(700, 10), (100, 5)]), (False, [(900, 3)])):  # same pages when made first
        assert pushed(stale, precopied, plane_first=True) == pushed(stale, precopied)
    mem.close()


def test_hybrid_events_come_in_a_legal_order(tmp_path):
    params = GuestParams(ram=64 << 20, threads=2, workload="random-write", seed=5, steps=600_000, rate=50_000)
    result, events = _demo(tmp_path, params, "hybrid", "--max-postcopy-bandwidth", "2gbit", max_rounds=3)
    assert result["verified"], result
    phases = [e["event"] for e in events]
    assert legal_order(phases), phases
    assert phases[:2] == ["setup", "precopy"] and "switchover" in phases and phases[-1] == "done"
    assert any(e.get("stale_pages") for e in events if e["event"] == "switchover")
    assert isinstance(result["dest"]["faults_first_second"], int)  # the bench's storm figure
    limits = result["source"]["bandwidth_limits"]
    assert limits["postcopy_bytes_s"] == 2e9 / 8 and limits["precopy_bytes_s"] == 0


@pytest.mark.parametrize("forced", [False, True])
def test_progress_line_only_on_a_terminal_or_when_asked(bed, tmp_path, forced):
    """Off a terminal the source draws nothing unless --progress asks for it."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_failures import Migration

    params = GuestParams(ram=16 << 20, threads=1, workload="random-write", seed=2, steps=400_000, rate=100_000)
    m = Migration(bed, tmp_path, params, hold=True)
    dest = m.dest()
    source = m.source("--mode", "precopy", *(["--progress"] if forced else []))
    _, err = source.communicate(timeout=180)
    dest.communicate(timeout=60)
    assert source.returncode == 0, err
    assert ("\x1b[K" in err) == forced, err


def test_faults_within_the_first_second_are_counted_from_the_switchover():
    from postcopy.migration.destreport import faults_within as _faults_within

    faults = [(100, 5.0), (1_000_000_099, 7.0), (1_000_000_100, 9.0), (50, 1.0)]
    assert _faults_within(faults, 100, 1_000_000_000) == 2  # [100, 100 + 1 s)
    assert _faults_within(faults, None, 1_000_000_000) is None  # no switchover: no figure
