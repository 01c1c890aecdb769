"""The C floors every ``postcopy bench`` ratio is taken against, measured in the same
run on the same machine: TCP bulk and 4 KiB round trips over the testbed's veth
(bench/net.py), and the userfaultfd fault round trip with a C handler thread, each with
both ends on one CPU and on two CPUs, plus the busy-polling handler across CPUs (what
a spinning fault loop could reach). Beside the raw link, bulk into a new guest's RAM
(fresh pages installed with UFFDIO_COPY, or RAM populated first and received in place)
and the RAM steps alone (native/ram_floor.c): on a VM, a page the host has not backed
costs a trip to the hypervisor on first touch, which a push pays and the raw link's
reused buffer does not. Python plays no part in any of these figures. They
run at the real-time priorities the agents give their own threads (kernel/priority.py),
so a busy host slows the floors no more than it slows the agents.

    python -m postcopy.bench.baselines [--quick]     prints them as JSON
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from postcopy.bench.floors import floor_summary

SAME_CPU = "same_cpu"
ACROSS_CPUS = "across_cpus"
TWO_HOSTS = "two_hosts"  # a pinned migration only: the source on one CPU, the destination on another


def cpu_placements() -> dict[str, tuple[int, int]]:
    """Placement name -> (first CPU, second CPU): both on the lowest CPU this process
    may use, and on the two lowest (left out on a one-CPU machine)."""
    cpus = sorted(os.sched_getaffinity(0))
    placements = {SAME_CPU: (cpus[0], cpus[0])}
    if len(cpus) > 1:
        placements[ACROSS_CPUS] = (cpus[0], cpus[1])
    return placements


def uffd_roundtrip(npages: int, fault_cpu: int = -1, handler_cpu: int = -1, *, spin: bool = False,
                   rt_priority: int = 0) -> dict:
    """Fault round trip in one process, no Python: the faulting thread on fault_cpu
    reads each missing page once; a C thread on handler_cpu reads the event, installs
    the page with UFFDIO_COPY and so wakes it. spin: the handler busy-polls the
    userfaultfd with non-blocking reads instead of sleeping in poll(2). rt_priority:
    both run SCHED_FIFO at it (if allowed)."""
    from postcopy._native import ffi, lib

    lat = ffi.new("uint64_t[]", npages)
    rc = lib.pc_bench_uffd_roundtrip_at(npages, lat, lib.PC_BENCH_SPIN if spin else 0, fault_cpu, handler_cpu,
                                        rt_priority)
    if rc != 0:
        raise OSError(-rc, f"uffd round-trip benchmark failed: {os.strerror(-rc)}")
    return floor_summary([lat[i] / 1e3 for i in range(npages)])


def ram_floor(nbytes: int) -> dict:
    """The steps of filling a new guest's RAM alone, each on fresh RAM, in 1 MiB chunks
    (native/ram_floor.h): CPU seconds per GiB and GB/s of UFFDIO_COPY into fresh pages,
    populating fresh pages (MADV_POPULATE_WRITE), UFFDIO_CONTINUE of populated pages and
    a plain copy into populated pages."""
    from postcopy._native import ffi, lib

    out = ffi.new("struct pc_ram_floor *")
    rc = lib.pc_ram_floor(nbytes, out)
    if rc != 0:
        raise OSError(-rc, f"guest RAM floor failed: {os.strerror(-rc)}")
    gib = out.bytes / (1 << 30)
    steps = {"uffdio_copy_fresh": (out.copy_cpu_ns, out.copy_wall_ns),
             "populate_fresh": (out.populate_cpu_ns, out.populate_wall_ns),
             "uffdio_continue": (out.continue_cpu_ns, out.continue_wall_ns),
             "copy_into_populated": (out.rewrite_cpu_ns, out.rewrite_wall_ns)}
    return {"bytes": out.bytes, **{name: {"cpu_s_per_gib": cpu / 1e9 / gib, "bytes_per_s": out.bytes / (wall / 1e9)}
                                    for name, (cpu, wall) in steps.items()}}


def pinned_placements() -> dict[str, tuple[int, int]]:
    """Where the bench pins a migration to compare its demand faults with a floor of the
    same placement: name -> (the source host's CPU: its guest and agent; the
    destination's: its agent and the incoming guest). same_cpu: everything on one CPU;
    two_hosts: as two hosts would be, the link crosses CPUs, a fault's wake-ups do not."""
    placements = cpu_placements()
    pinned = {SAME_CPU: placements[SAME_CPU]}
    if ACROSS_CPUS in placements:
        pinned[TWO_HOSTS] = placements[ACROSS_CPUS]
    return pinned


def pinned_fault_floors(tcp_rtt: dict, uffd: dict) -> dict[str, dict]:
    """The floor of one demand fault in each of :func:`pinned_placements`: the C round
    trip over the link plus the C userfaultfd round trip, each placed as that migration's
    hops are (two_hosts: the round trip across CPUs, the fault's on one)."""
    floors = {SAME_CPU: _sum_latency(tcp_rtt[SAME_CPU]["latency_us"], uffd[SAME_CPU])}
    if ACROSS_CPUS in tcp_rtt:
        floors[TWO_HOSTS] = _sum_latency(tcp_rtt[ACROSS_CPUS]["latency_us"], uffd[SAME_CPU])
    return floors


def _sum_latency(a: dict, b: dict) -> dict:
    return {p: None if a.get(p) is None or b.get(p) is None else a[p] + b[p] for p in ("p50", "p99")}


def measure(*, bulk_bytes: int, rtt_count: int, uffd_faults: int, port: int) -> dict:
    """Every floor, by placement; plus the flat figures the report and its pictures
    read: tcp_bulk_bytes_per_s (the faster placement: a ratio to it flatters nothing),
    tcp_rtt_4k_us and uffd_roundtrip_us (same CPU, the lower)."""
    from postcopy.bench import net
    from postcopy.kernel.priority import URGENT_RT_PRIORITY as RT
    from postcopy.testbed.netns import Testbed

    placements = cpu_placements()
    with Testbed() as bed:
        tcp = net.measure(bed, placements, bulk_bytes=bulk_bytes, rtt_count=rtt_count, port=port)
    # At the priority of the agents' fault threads, as the TCP round trips.
    uffd = {name: uffd_roundtrip(uffd_faults, a, b, rt_priority=RT) for name, (a, b) in placements.items()}
    if ACROSS_CPUS in placements:
        uffd[ACROSS_CPUS + "_spin"] = uffd_roundtrip(uffd_faults, *placements[ACROSS_CPUS], spin=True, rt_priority=RT)
    best_bulk = max(tcp["bulk"], key=lambda name: tcp["bulk"][name]["bytes_per_s"])
    into_ram = {into: {"by_placement": rows, "placement": max(rows, key=lambda name: rows[name]["bytes_per_s"])}
                for into, rows in tcp["into_ram"].items()}
    for row in into_ram.values():
        row["bytes_per_s"] = row["by_placement"][row["placement"]]["bytes_per_s"]
    return {
        "placements": {name: list(cpus) for name, cpus in placements.items()},
        "tcp_bulk": tcp["bulk"],
        "tcp_rtt_4k": tcp["rtt"],
        "uffd_roundtrip_us": uffd[SAME_CPU],
        "uffd_roundtrip_by_placement_us": uffd,
        # What one demand fault cannot beat: a request/reply over the link plus a fault.
        "fault_floor_us": {name: _sum_latency(tcp["rtt"][name]["latency_us"], uffd[name]) for name in placements},
        "pinned_placements": {name: list(cpus) for name, cpus in pinned_placements().items()},
        "pinned_fault_floor_us": pinned_fault_floors(tcp["rtt"], uffd),
        "tcp_bulk_placement": best_bulk,
        "tcp_bulk_bytes_per_s": tcp["bulk"][best_bulk]["bytes_per_s"],
        "tcp_rtt_4k_us": tcp["rtt"][SAME_CPU]["latency_us"],
        # Bulk into a new guest's RAM (the best placement of each), and the RAM steps alone.
        "tcp_into_ram": into_ram,
        "ram_floor": ram_floor(bulk_bytes),
    }


def format_lines(base: dict) -> list[str]:
    """The floors as aligned text lines, one per figure and placement (bulk: the best
    of its runs; latencies: the calmest of their stretches)."""
    def us(v):
        return "n/a" if v is None else f"{v:.1f}"

    lines = []
    for name, row in base["tcp_bulk"].items():
        cpu = row["cpu"]
        lines.append(f"  C TCP bulk, {name:<12}     {row['bytes_per_s'] / 1e9:.2f} GB/s   CPU s/GiB sender "
                     f"{cpu['client']['cpu_s_per_gib']:.2f}, receiver {cpu['server']['cpu_s_per_gib']:.2f}")
    for into, row in base["tcp_into_ram"].items():
        best = row["by_placement"][row["placement"]]
        prefault = f", populated first at {best['prefault_s_per_gib']:.2f} s/GiB" if "prefault_s_per_gib" in best else ""
        lines.append(f"  C TCP bulk into {into:<12} {row['bytes_per_s'] / 1e9:.2f} GB/s   ({row['placement']}; receiver "
                     f"CPU s/GiB {best['cpu']['server']['cpu_s_per_gib']:.2f}{prefault})")
    for step, row in _ram_steps(base):
        lines.append(f"  C guest RAM, {step:<22} {row['bytes_per_s'] / 1e9:.2f} GB/s   CPU s/GiB {row['cpu_s_per_gib']:.2f}")
    for name, row in base["tcp_rtt_4k"].items():
        lat = row["latency_us"]
        lines.append(f"  C TCP 4 KiB RTT, {name:<12} p50 {us(lat['p50'])} µs  p99 {us(lat['p99'])} µs  max {us(lat['max'])} µs")
    for name, lat in base["uffd_roundtrip_by_placement_us"].items():
        lines.append(f"  C uffd round trip, {name:<17} p50 {us(lat['p50'])} µs  p99 {us(lat['p99'])} µs")
    for name, lat in base["fault_floor_us"].items():
        lines.append(f"  fault floor (RTT+uffd), {name:<12} p50 {us(lat['p50'])} µs  p99 {us(lat['p99'])} µs")
    if TWO_HOSTS in base.get("pinned_fault_floor_us", {}):
        lat = base["pinned_fault_floor_us"][TWO_HOSTS]
        lines.append(f"  fault floor (RTT+uffd), {TWO_HOSTS:<12} p50 {us(lat['p50'])} µs  p99 {us(lat['p99'])} µs"
                     "  (RTT across CPUs, uffd on one)")
    return lines


def _ram_steps(base: dict) -> list[tuple[str, dict]]:
    floor = base.get("ram_floor") or {}
    return [(step, row) for step, row in floor.items() if isinstance(row, dict)]


def markdown_rows(base: dict) -> list[str]:
    """The floors as a Markdown table, one row per figure and placement."""
    def us(lat: dict) -> str:
        return f"p50 {lat['p50']:.1f} µs, p99 {lat['p99']:.1f} µs"

    rows = ["| C floor | placement | figure | CPU s/GiB sender / receiver |", "|---|---|---|---|"]
    for name, row in base["tcp_bulk"].items():
        cpu = row["cpu"]
        rows.append(f"| TCP bulk | {name} | {row['bytes_per_s'] / 1e9:.2f} GB/s | "
                    f"{cpu['client']['cpu_s_per_gib']:.2f} / {cpu['server']['cpu_s_per_gib']:.2f} |")
    for into, row in base.get("tcp_into_ram", {}).items():
        best = row["by_placement"][row["placement"]]
        prefault = f" (populated first: {best['prefault_s_per_gib']:.2f} s/GiB)" if "prefault_s_per_gib" in best else ""
        rows.append(f"| TCP bulk into {into}{prefault} | {row['placement']} | {row['bytes_per_s'] / 1e9:.2f} GB/s | "
                    f"{best['cpu']['client']['cpu_s_per_gib']:.2f} / {best['cpu']['server']['cpu_s_per_gib']:.2f} |")
    rows += [f"| guest RAM: {step} | one thread | {row['bytes_per_s'] / 1e9:.2f} GB/s | {row['cpu_s_per_gib']:.2f} s/GiB |"
             for step, row in _ram_steps(base)]
    rows += [f"| TCP 4 KiB RTT | {name} | {us(row['latency_us'])} | |" for name, row in base["tcp_rtt_4k"].items()]
    rows += [f"| uffd round trip | {name} | {us(lat)} | |"
             for name, lat in base["uffd_roundtrip_by_placement_us"].items()]
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m postcopy.bench.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller samples")
    p.add_argument("--port", type=int, default=7030)
    args = p.parse_args(argv)
    try:
        base = measure(bulk_bytes=(256 << 20) if args.quick else (2 << 30), rtt_count=3000 if args.quick else 20000,
                       uffd_faults=2000 if args.quick else 20000, port=args.port)
    except (OSError, RuntimeError) as exc:
        print(f"postcopy.bench.baselines: {exc}", file=sys.stderr)
        return 1
    print("\n".join(format_lines(base)), file=sys.stderr)
    print(json.dumps(base, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
