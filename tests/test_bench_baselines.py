"""The C baselines of ``postcopy bench`` (native/net_bench.c, native/uffd_bench.c) and
the agents' CPU accounting: each runs end to end with tiny counts and returns figures
of the right shape, placed where it was asked to run. No timed assertions: speed is
the bench's business."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import pytest

from postcopy._native import ffi, lib
from postcopy.bench import baselines, floors, net
from postcopy.bench.agentcpu import AgentCpu, pages_moved_in_push_window, push_cpu_per_gib, push_window_ns
from postcopy.bench.ratios import baseline_ratios
from postcopy.bench.run import push_figures
from postcopy.bench.tables import format_bench
from postcopy.guest import GuestParams
from conftest import require_netns, require_uffd

PORT = 7040


def _forbidden_cpu() -> int:
    """A CPU number this process may not run on."""
    return max(os.sched_getaffinity(0)) + 1


def _fifo_allowed() -> bool:
    """Whether a thread of this process may make itself SCHED_FIFO (tried in a thread
    that dies afterwards)."""
    box = []

    def attempt():
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            box.append(True)
        except OSError:
            box.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return box[0]


def _sane_latency(summary: dict, count: int) -> None:
    assert summary["count"] == count
    assert 0 < summary["p50"] <= summary["p99"] <= summary["max"]


def test_tcp_bulk_and_rtt_run_between_the_hosts_on_the_cpus_asked(bed):
    placements = baselines.cpu_placements()
    fifo = _fifo_allowed()
    result = net.measure(bed, placements, bulk_bytes=3 << 20, rtt_count=50, port=PORT,
                         bulk_runs=2)
    assert set(result["bulk"]) == set(result["rtt"]) == set(placements)
    assert set(result["into_ram"]) == {"ram-copy", "ram-prefault"}
    for name, (client_cpu, server_cpu) in placements.items():
        bulk, rtt = result["bulk"][name], result["rtt"][name]
        assert bulk["bytes"] == 3 << 20 and len(bulk["runs_bytes_per_s"]) == 2
        assert bulk["bytes_per_s"] == max(bulk["runs_bytes_per_s"]) > 0
        assert bulk["cpus"] == rtt["cpus"] == {"client": client_cpu, "server": server_cpu}
        assert bulk["fifo"] == rtt["fifo"] == {"client": fifo, "server": fifo}
        for side in ("client", "server"):
            cpu = bulk["cpu"][side]
            assert cpu["user_s"] >= 0 and cpu["sys_s"] >= 0
            assert cpu["cpu_s_per_gib"] == pytest.approx((cpu["user_s"] + cpu["sys_s"]) * 1024 / 3)
            assert "cpu_s_per_gib" not in rtt["cpu"][side]  # round trips move no bulk
        _sane_latency(rtt["latency_us"], 50)
        assert rtt["latency_us"]["stretches"] == floors.STRETCHES
        for into, row in result["into_ram"].items():  # bulk into a new guest's RAM, placed the same
            assert row[name]["bytes"] == 3 << 20 and row[name]["bytes_per_s"] > 0
            assert row[name]["cpus"] == {"client": client_cpu, "server": server_cpu}
            assert ("prefault_s_per_gib" in row[name]) == (into == "ram-prefault")
        assert result["into_ram"]["ram-prefault"][name]["prefault_s_per_gib"] > 0


def test_tcp_client_refuses_a_cpu_the_server_may_not_use(bed):
    argv = [sys.executable, "-m", "postcopy.bench.net"]
    server = bed.popen(bed.dest, [*argv, "server", str(PORT), "2"], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    bad = bed.run(bed.source, [*argv, "rtt", bed.dest.address, str(PORT), "10", "--server-cpu",
                               str(_forbidden_cpu())], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"postcopy.bench.net rtt: [Errno {errno.EINVAL}] TCP RTT to "
                                               f"{bed.dest.address}:{PORT}: {os.strerror(errno.EINVAL)}"]
    # The server goes on serving after a refused placement.
    good = bed.run(bed.source, [*argv, "rtt", bed.dest.address, str(PORT), "10"], capture_output=True, text=True,
                   timeout=60, check=True)
    assert '"count": 10' in good.stdout
    assert server.wait(timeout=30) == 0


def test_uffd_roundtrip_placed_sleeping_and_spinning():
    require_uffd()
    for name, (fault_cpu, handler_cpu) in baselines.cpu_placements().items():
        _sane_latency(baselines.uffd_roundtrip(200, fault_cpu, handler_cpu), 200)
        if fault_cpu != handler_cpu:
            _sane_latency(baselines.uffd_roundtrip(200, fault_cpu, handler_cpu, spin=True), 200)
    # The calling thread gets its own placement and scheduling policy back.
    before = os.sched_getaffinity(0)
    baselines.uffd_roundtrip(10, min(before), min(before), rt_priority=10)
    assert os.sched_getaffinity(0) == before
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_guest_ram_floor_times_each_step_on_whole_pages():
    require_uffd()
    ps = os.sysconf("SC_PAGESIZE")
    floor = baselines.ram_floor(3 * ps + 1)
    assert floor["bytes"] == 4 * ps  # rounded up to whole pages
    for step in ("uffdio_copy_fresh", "populate_fresh", "uffdio_continue", "copy_into_populated"):
        assert floor[step]["bytes_per_s"] > 0 and floor[step]["cpu_s_per_gib"] >= 0
    with pytest.raises(OSError, match="guest RAM floor failed"):
        baselines.ram_floor(0)


def test_uffd_roundtrip_refuses_a_forbidden_cpu():
    require_uffd()
    lat = ffi.new("uint64_t[]", 10)
    assert lib.pc_bench_uffd_roundtrip_at(10, lat, 0, _forbidden_cpu(), -1, 0) == -errno.EINVAL
    assert lib.pc_bench_uffd_roundtrip_at(10, lat, 0, -1, _forbidden_cpu(), 0) == -errno.EINVAL
    with pytest.raises(OSError, match="uffd round-trip benchmark failed"):
        baselines.uffd_roundtrip(10, handler_cpu=_forbidden_cpu())


def test_agent_cpu_is_read_over_the_push_window_of_a_real_migration():
    require_netns()
    require_uffd()
    from postcopy.testbed.demo import DemoOptions, run_demo

    params = GuestParams(ram=32 << 20, threads=2, workload="sequential", seed=3, steps=500_000, rate=100_000)
    with AgentCpu() as monitor:
        result = run_demo(DemoOptions(params=params, migrate_after=0.3, port=PORT + 1))
    assert result["verified"]
    window = push_window_ns(result)
    assert window is not None and window[0] < window[1]
    cpu = push_cpu_per_gib(monitor, result, 4096)
    assert cpu["pushed_bytes"] == result["pages"]["pushed"] * 4096 > 0
    assert cpu["moved_bytes"] >= cpu["pushed_bytes"]
    for role in ("source", "dest"):
        total = cpu[f"{role}_total"]
        assert total is not None and total["user_s"] + total["sys_s"] > 0  # Python start-up alone costs CPU
        during = cpu[role]
        assert during is not None and 0 <= during["user_s"] <= total["user_s"]
        assert during["cpu_s_per_gib"] >= 0


def test_cpu_per_gib_counts_the_demand_pages_moved_within_the_push_window():
    # Buckets of 10 ms: pushed pages in buckets 2..3, demand pages in 1, 3 and 5.
    result = {"pages": {"pushed": 300, "demand": 70},
              "timeline": {"bucket_ms": 10.0, "start_ns": 0,
                           "installed": {"pushed": [0, 0, 100, 200, 0, 0], "demand": [30, 10, 0, 20, 0, 40]}}}
    assert push_window_ns(result) == (20_000_000, 40_000_000)
    assert pages_moved_in_push_window(result) == 320  # the 20 demand pages of bucket 3 are in the window
    monitor = AgentCpu()
    monitor.samples["source"] = [(10_000_000, 1.0, 1.0), (40_000_000, 1.1, 1.3)]
    cpu = push_cpu_per_gib(monitor, result, 4096)
    assert cpu["moved_bytes"] == 320 * 4096 and cpu["pushed_bytes"] == 300 * 4096
    assert cpu["source"]["cpu_s_per_gib"] == pytest.approx(0.4 / (320 * 4096 / (1 << 30)))
    assert cpu["dest"] is None


def test_floor_summary_takes_each_percentile_from_the_calmest_stretch():
    calm, busy = [10.0] * 99 + [20.0], [100.0] * 99 + [900.0]
    summary = floors.floor_summary(busy + calm + busy, stretches=3)
    assert summary == {"count": 300, "p50": 10.0, "p99": 20.0, "max": 20.0, "stretches": 3,
                       "all": summary["all"]}
    assert summary["all"]["max"] == 900.0 and summary["all"]["count"] == 300


def test_agent_cpu_between_takes_the_samples_at_the_window_ends():
    monitor = AgentCpu()
    monitor.samples["source"] = [(100, 1.0, 0.5), (200, 1.5, 0.75), (300, 3.0, 1.0)]
    assert monitor.between("source", 150, 310) == {"user_s": 2.0, "sys_s": 0.5}
    assert monitor.between("source", 50, 310) is None  # no sample before the window
    assert monitor.between("dest", 0, 10) is None
    assert monitor.total("source") == {"user_s": 3.0, "sys_s": 1.0}


def _synthetic_bench() -> dict:
    lat = {"p50": 20.0, "p99": 80.0, "max": 100.0, "count": 10}
    side = {"user_s": 0.1, "sys_s": 0.2, "cpu_s_per_gib": 0.5}
    bulk = {"bytes_per_s": 2e9, "cpu": {"client": side, "server": {**side, "cpu_s_per_gib": 0.25}}}
    base = {"placements": {"same_cpu": [0, 0], "across_cpus": [0, 1]},
            "tcp_bulk": {"same_cpu": {**bulk, "bytes_per_s": 1e9}, "across_cpus": bulk},
            "tcp_rtt_4k": {"same_cpu": {"latency_us": lat}, "across_cpus": {"latency_us": lat}},
            "uffd_roundtrip_by_placement_us": {"same_cpu": lat}, "uffd_roundtrip_us": lat,
            "fault_floor_us": {"same_cpu": {"p50": 40.0, "p99": 100.0}, "across_cpus": {"p50": 100.0, "p99": 400.0}},
            "tcp_bulk_placement": "across_cpus", "tcp_bulk_bytes_per_s": 2e9, "tcp_rtt_4k_us": lat,
            "tcp_into_ram": {"ram-copy": {"bytes_per_s": 8e8, "placement": "same_cpu",
                                          "by_placement": {"same_cpu": {**bulk, "bytes_per_s": 8e8}}},
                             "ram-prefault": {"bytes_per_s": 1.6e9, "placement": "across_cpus",
                                              "by_placement": {"across_cpus": {
                                                  "bytes_per_s": 1.6e9, "prefault_s_per_gib": 0.6,
                                                  "cpu": {"client": {**side, "cpu_s_per_gib": 0.4},
                                                          "server": {**side, "cpu_s_per_gib": 0.125}}}}}},
            "ram_floor": {"bytes": 1 << 20, "uffdio_copy_fresh": {"cpu_s_per_gib": 0.3, "bytes_per_s": 3e9}}}
    figures = {"push_bytes_per_s": 5e8, "fault_us_without_pusher": {"p50": 200.0, "p99": 800.0},
               "fault_us_with_pusher": {"p50": 300.0, "p99": 1600.0},
               "push_cpu": {"source": {"cpu_s_per_gib": 1.0}, "dest": None},
               "downtime_ms_256M": 7.0, "downtime_ms_2G": 9.0, "agent_max_rss_mib_2G": {"source": 50, "dest": 60},
               "verified": True}
    return {"kernel": "k", "cpus": 2, "quick": True, "baselines": base, "postcopy": figures, "harvest": [],
            "precopy": [], "checkpoint": {}, "install_paths": [], "errors": {}, "seconds": 1.0}


def test_ratios_are_taken_against_the_c_floor_of_each_placement():
    result = _synthetic_bench()
    ratios = baseline_ratios(result["baselines"], result["postcopy"])
    assert ratios == {
        "push_vs_tcp_bulk": 0.25,
        "fault_p50_vs_floor_same_cpu": 5.0, "fault_p99_vs_floor_same_cpu": 8.0,
        "fault_p50_vs_floor_across_cpus": 2.0, "fault_p99_vs_floor_across_cpus": 2.0,
        "fault_p99_with_vs_without_pusher": 2.0,
        "source_cpu_per_gib_vs_c": 2.0, "dest_cpu_per_gib_vs_c": None,  # no figure, no ratio
        # No install variant named: no floor of its RAM work either.
        "source_cpu_per_gib_vs_c_into_ram": None, "dest_cpu_per_gib_vs_c_into_ram": None,
    }
    result["ratios"] = ratios
    text = format_bench(result)
    assert "| demand fault p50, no pusher | 200.0 µs | RTT+uffd 40.0 µs (same_cpu) / 100.0 µs (across_cpus) | " \
           "5.00x / 2.00x |" in text
    assert "| dest agent CPU s per GiB moved in the push window | n/a | TCP receiver 0.25 | n/a |" in text
    assert "| TCP bulk | across_cpus | 2.00 GB/s | 0.50 / 0.25 |" in text


def test_the_push_figure_is_the_best_install_path_and_names_it():
    def run(rate, source_cpu, prealloc_ms=None):
        return {"result": {"dest": {"push_bytes_per_s": rate, "prealloc_ms": prealloc_ms}},
                "cpu": {"source": {"cpu_s_per_gib": source_cpu}}}
    figures = push_figures({"copy": run(4e8, 2.0), "continue": run(2e8, 3.0),
                            "continue+prealloc": run(1e9, 1.0, prealloc_ms=150.0)})
    assert (figures["push_bytes_per_s"], figures["push_install"]) == (1e9, "continue+prealloc")
    assert figures["push_cpu"] == {"source": {"cpu_s_per_gib": 1.0}}
    assert figures["push_by_install"]["copy"] == {"push_bytes_per_s": 4e8, "ram_floor": "ram-copy", "prealloc_ms": None,
                                                  "source_cpu_s_per_gib": 2.0, "dest_cpu_s_per_gib": None}
    assert figures["push_by_install"]["continue+prealloc"]["ram_floor"] == "ram-prefault"
    result = _synthetic_bench()
    result["postcopy"].update(figures)
    result["ratios"] = baseline_ratios(result["baselines"], result["postcopy"])
    # Each variant against bulk into RAM the same way: fresh pages, or populated first.
    assert result["ratios"]["push_copy_vs_tcp_into_ram-copy"] == 0.5
    assert result["ratios"]["push_continue_vs_tcp_into_ram-copy"] == 0.25
    assert result["ratios"]["push_continue+prealloc_vs_tcp_into_ram-prefault"] == 0.625
    text = format_bench(result)
    assert "| push throughput (install continue+prealloc, the best of 3) | 1.00 GB/s | TCP bulk 2.00 GB/s " \
           "(across_cpus) | 0.50x |" in text
    assert "| push, install copy (CPU s/GiB source 2.00, dest n/a) | 0.40 GB/s | TCP bulk / TCP bulk into ram-copy " \
           "0.80 GB/s | 0.20x / 0.50x |" in text
    assert "| push, install continue+prealloc (CPU s/GiB source 1.00, dest n/a, RAM allocated first in 150 ms) | " \
           "1.00 GB/s | TCP bulk / TCP bulk into ram-prefault 1.60 GB/s | 0.50x / 0.62x |" in text
    assert "| TCP bulk into ram-prefault (populated first: 0.60 s/GiB) | across_cpus | 1.60 GB/s |" in text
    assert "| guest RAM: uffdio_copy_fresh | one thread | 3.00 GB/s | 0.30 s/GiB |" in text
    # The agents' CPU also against the C floor doing the same RAM work (here: received into populated RAM).
    assert result["ratios"]["source_cpu_per_gib_vs_c_into_ram"] == 2.5
    assert "| source agent CPU s per GiB moved in the push window (install continue+prealloc, the best of 3) | " \
           "1.00 | TCP sender 0.50 / TCP sender into ram-prefault 0.40 | 2.00x / 2.50x |" in text
    assert "source CPU per GiB moved while pushing   1.00 s   (2.00x C sender, 2.50x C sender into RAM the same way)" \
        in text


def test_popen_pins_the_child_and_everything_it_starts(bed):
    """Testbed.popen(cpus=...): the child and its own children run on those CPUs (a
    pinned bench migration's incoming guest is started by the destination agent); the
    caller's thread keeps its CPUs."""
    mine = os.sched_getaffinity(0)
    cpu = max(mine)
    script = ("import os, subprocess, sys; print(sorted(os.sched_getaffinity(0))); sys.stdout.flush(); "
              "subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'])")
    proc = bed.popen(bed.dest, [sys.executable, "-c", script], cpus=frozenset({cpu}), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert out.split("\n")[:2] == [str([cpu])] * 2
    assert os.sched_getaffinity(0) == mine
    unpinned = bed.popen(bed.dest, [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    out, _ = unpinned.communicate(timeout=30)
    assert out.split("\n")[:2] == [str(sorted(mine))] * 2


def test_pinned_fault_floors_place_each_hop_as_the_migration_does():
    rtt = {"same_cpu": {"latency_us": {"p50": 14.0, "p99": 15.0}},
           "across_cpus": {"latency_us": {"p50": 37.0, "p99": 47.0}}}
    uffd = {"same_cpu": {"p50": 7.0, "p99": 10.0}, "across_cpus": {"p50": 33.0, "p99": 42.0}}
    # two hosts: the round trip crosses CPUs, the fault is woken on the guest's CPU.
    assert baselines.pinned_fault_floors(rtt, uffd) == {"same_cpu": {"p50": 21.0, "p99": 25.0},
                                                        "two_hosts": {"p50": 44.0, "p99": 57.0}}
    assert baselines.pinned_fault_floors({"same_cpu": rtt["same_cpu"]}, uffd) == {"same_cpu": {"p50": 21.0, "p99": 25.0}}
    placements = baselines.pinned_placements()
    cpus = sorted(os.sched_getaffinity(0))
    assert placements["same_cpu"] == (cpus[0], cpus[0])
    assert placements.get("two_hosts") == ((cpus[0], cpus[1]) if len(cpus) > 1 else None)


def test_pinned_faults_are_compared_with_the_floor_of_their_placement():
    result = _synthetic_bench()
    result["baselines"]["pinned_placements"] = {"same_cpu": [0, 0], "two_hosts": [0, 1]}
    result["baselines"]["pinned_fault_floor_us"] = {"same_cpu": {"p50": 20.0, "p99": 25.0},
                                                    "two_hosts": {"p50": 40.0, "p99": 50.0}}
    result["postcopy"]["fault_us_pinned"] = {
        "same_cpu": {"cpus": [0, 0], "fault_us": {"p50": 30.0, "p99": 50.0}, "verified": True},
        "two_hosts": {"cpus": [0, 1], "fault_us": {"p50": 44.0, "p99": 60.0}, "verified": True}}
    ratios = baseline_ratios(result["baselines"], result["postcopy"])
    assert {k: v for k, v in ratios.items() if "pinned" in k} == {
        "fault_p50_pinned_same_cpu_vs_floor": 1.5, "fault_p99_pinned_same_cpu_vs_floor": 2.0,
        "fault_p50_pinned_two_hosts_vs_floor": pytest.approx(1.1), "fault_p99_pinned_two_hosts_vs_floor": 1.2}
    result["ratios"] = ratios
    text = format_bench(result)
    assert ("| demand fault p50 / p99, no pusher, pinned two_hosts (source CPU 0, dest CPU 1) | 44.0 / 60.0 µs | "
            "RTT+uffd 40.0 / 50.0 µs | 1.10x / 1.20x |") in text
    assert "demand fault, pinned same_cpu  p50 30.0 µs  p99 50.0 µs  (source CPU 0, dest CPU 0;" in text


def test_a_pinned_migration_runs_and_verifies():
    """The bench's pinned placement end to end: every process on one CPU."""
    require_netns()
    require_uffd()
    from postcopy.testbed.demo import DemoOptions, run_demo

    cpu = frozenset({min(os.sched_getaffinity(0))})
    params = GuestParams(ram=16 << 20, threads=2, workload="random-write", seed=4, steps=300_000, rate=100_000)
    result = run_demo(DemoOptions(params=params, migrate_after=0.3, port=PORT + 2, cpus=(cpu, cpu)))
    assert result["verified"]
    assert result["dest"]["fault_latency_us_before_push"]["count"] > 0
