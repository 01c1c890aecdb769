"""End-to-end postcopy migrations between two network namespaces, each verified
against the hash of the same workload run without migration."""
from __future__ import annotations

import pytest

from postcopy.testbed.demo import DemoOptions, run_demo
from postcopy.guest import GuestParams
from conftest import require_netns, require_uffd

pytestmark = [pytest.mark.usefixtures("needs_migration")]


@pytest.fixture
def needs_migration():
    require_netns()
    require_uffd()


def migrate(**params) -> dict:
    # The guest parks a tenth of the way in until it is migrated, so it moves mid-run
    # however slow the machine is (the hash depends on neither the rate nor the park).
    defaults = dict(ram=16 << 20, threads=2, workload="random-write", seed=7, steps=300_000, rate=100_000)
    defaults.update(params)
    return run_demo(DemoOptions(params=GuestParams(**defaults), hold_at=defaults["steps"] // 10, port=7010))


def assert_verified(report: dict) -> None:
    assert report["final_hash"] is not None, report
    assert report["final_hash"] == report["reference_hash"], report
    assert report["verified"] is True
    pages = report["pages"]
    total = report["ram_bytes"] // 4096
    # Every page is accounted for exactly once, by exactly one cause.
    assert sum(pages.values()) == total, pages


@pytest.mark.parametrize("workload", ["idle", "random-write", "sequential", "hotspot"])
def test_every_workload_migrates_verified(workload):
    # idle runs at its default 1000 steps/s.
    report = migrate(workload=workload, steps=1_500, rate=0) if workload == "idle" else migrate(workload=workload)
    assert_verified(report)
    assert report["downtime_ms"] is not None and report["downtime_ms"] > 0
    assert_downtime_broken_down(report)


def assert_downtime_broken_down(report: dict) -> None:
    """The report says where the downtime went: the source's, the destination's and the
    incoming guest's steps, in order, adding up to the downtime."""
    breakdown = report["downtime_breakdown"]
    steps = [step["step"] for step in breakdown["steps"]]
    for name in ("parked", "state_sent", "switchover_sent", "switchover_read", "resume_received", "released",
                 "first_step"):
        assert name in steps, (name, steps)
    assert steps[-1] == "first_step"
    assert sum(step["ms"] for step in breakdown["steps"]) == pytest.approx(report["downtime_ms"], abs=1e-3)


@pytest.mark.loaded
@pytest.mark.parametrize("backing", ["memfd", "anon"])
def test_backings_migrate_verified(backing):
    report = migrate(backing=backing)
    assert_verified(report)


def test_four_vcpus_fault_concurrently_on_shared_pages():
    # Every vCPU reads the shared slice from its first step, so four threads fault on
    # the same pages at once right after the switchover.
    report = migrate(threads=4, workload="hotspot")
    assert_verified(report)
    assert report["fault_latency_us"]["count"] > 0


def test_untouched_pages_never_cross_the_wire():
    report = migrate(ram=64 << 20, workload="random-write", working_set=0.05)
    assert_verified(report)
    pages = report["pages"]
    data_pages = report["ram_bytes"] // 4096 - pages["zero"]
    source = report["source"]
    # Most of the RAM was never touched...
    assert pages["zero"] > 0.8 * (report["ram_bytes"] // 4096)
    # ...the source sent page data only for populated pages (a page may go both on
    # demand and by the pusher when they race, but the pusher sends each page once)...
    assert source["pages_pushed"] <= data_pages and source["pages_demand"] <= data_pages
    assert source["pages_zero"] >= pages["zero"]
    # ...and the bytes on the wire are those pages plus framing: no zero page crossed.
    sent_pages = source["pages_pushed"] + source["pages_demand"] + 1  # + the state page
    framing = 16 * (sent_pages + source["pages_zero"]) + 64 * 1024
    assert report["bytes_sent"] <= sent_pages * 4096 + framing, (report["bytes_sent"], sent_pages)


def test_unthrottled_write_heavy_guest_migrates_verified():
    # No rate limit: the guest writes as fast as it can on both sides of the move.
    report = migrate(ram=32 << 20, workload="random-write", steps=6_000_000, rate=0)
    assert_verified(report)
