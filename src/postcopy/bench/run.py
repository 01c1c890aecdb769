"""``postcopy bench``: postcopy figures as ratios to baselines measured in the same run
on the same machine (raw TCP over the same veth, the in-process uffd round trip with a
C handler)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from postcopy import report

from postcopy import svg
from postcopy.testbed.demo import DemoOptions, run_demo
from postcopy.guest import GuestParams
from postcopy.testbed.netns import Testbed

BENCH_PORT = 7020


def network_baselines(bulk_bytes: int, rtt_count: int) -> dict:
    """Raw TCP bulk throughput and 4 KiB request/response RTT between the two hosts,
    each side its own process, as the agents are."""
    with Testbed() as bed:
        server = bed.popen(bed.dest, [sys.executable, "-m", "postcopy.bench.net", "server", str(BENCH_PORT), "2"],
                           stdout=subprocess.PIPE, text=True)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("benchmark server did not start")
        results = {}
        for kind, n in (("bulk", bulk_bytes), ("rtt", rtt_count)):
            out = bed.run(bed.source, [sys.executable, "-m", "postcopy.bench.net", kind, bed.dest.address,
                                       str(BENCH_PORT), str(n)], timeout=120, capture_output=True, text=True, check=True)
            results[kind] = json.loads(out.stdout)
        server.wait(timeout=30)
    rtt = report.latency_summary(results["rtt"]["latencies_us"])
    return {"tcp_bulk_bytes_per_s": results["bulk"]["bytes_per_s"], "tcp_rtt_4k_us": rtt}


def uffd_roundtrip(npages: int) -> dict:
    """In-process fault round trip: fault, C handler thread reads the event, UFFDIO_COPY, wake."""
    from postcopy._native import ffi, lib

    lat = ffi.new("uint64_t[]", npages)
    rc = lib.pc_bench_uffd_roundtrip(npages, lat)
    if rc != 0:
        raise OSError(-rc if rc < 0 else rc, "uffd round-trip benchmark failed")
    return report.latency_summary(lat[i] / 1e3 for i in range(npages))


def migration(ram: int, *, workload: str, steps: int, rate: float = 0, migrate_after: float = 0.5,
              push_delay: float = 0.0, threads: int = 2) -> dict:
    params = GuestParams(ram=ram, threads=threads, workload=workload, seed=11, steps=steps, rate=rate, working_set=1.0)
    return run_demo(DemoOptions(params=params, migrate_after=migrate_after, port=BENCH_PORT + 1,
                                push_delay=push_delay))


def harvest_rows(quick: bool) -> list[dict]:
    """Harvest cost per dirty-log backend this kernel has (plus the C-loop and full
    pagemap-read baselines), labelled with the kernel it ran on."""
    from postcopy.bench.harvest import harvest_table

    sizes = (256 << 20,) if quick else (256 << 20, 1 << 30, 4 << 30)
    rows = harvest_table(sizes=sizes, dirty=(0, 100, 10_000, 100_000), large=not quick, repeats=3 if quick else 7)
    kernel = platform.release()
    return [{**row, "backend": row["method"], "kernel": kernel} for row in rows]


def precopy_rows(quick: bool) -> list[dict]:
    """Precopy and hybrid on a random-write guest at a few dirty rates: rounds, bytes
    sent per byte of RAM, downtime."""
    rows = []
    ram = 64 << 20
    for rate in ((50_000,) if quick else (10_000, 50_000, 200_000)):
        for mode in ("precopy", "hybrid"):
            params = GuestParams(ram=ram, threads=2, workload="random-write", seed=13, steps=int(rate * 4),
                                 rate=rate, working_set=0.5)
            result = run_demo(DemoOptions(params=params, mode=mode, migrate_after=0.5, port=BENCH_PORT + 2,
                                          downtime_limit_ms=20, max_rounds=10))
            rows.append({"mode": mode, "dirty_log": result["dirty_log"], "steps_per_s": rate,
                         "rounds": len(result["precopy_rounds"]),
                         "sent_per_ram": result["bytes_sent"] / ram, "downtime_ms": result["downtime_ms"],
                         "verified": result["verified"]})
    return rows


def checkpoint_figures(quick: bool) -> dict:
    from postcopy.checkpoint.cli import run_checkpoint_demo

    bounds = (64,) if quick else (64, 256, 1024)
    return run_checkpoint_demo(ram=32 << 20, dirty_bounds=bounds, seconds=1.0 if quick else 3.0,
                               port=BENCH_PORT + 3)


def pause_resume(quick: bool) -> dict:
    """How fast the guest answers pause and resume (persistent vCPU threads): p50/p99 of
    pause -> parked, resume -> first step and one ``run`` epoch, in µs."""
    from postcopy.bench.pauseresume import pause_resume_figures

    return pause_resume_figures(rounds=200 if quick else 2000)


def _install_migration(install: str, backing: str, ram: int, *, workload: str, steps: int, rate: float,
                       migrate_after: float, push_delay: float) -> dict:
    params = GuestParams(ram=ram, threads=2, workload=workload, seed=17, steps=steps, rate=rate, working_set=1.0,
                         backing=backing)
    return run_demo(DemoOptions(params=params, migrate_after=migrate_after, port=BENCH_PORT + 4,
                                push_delay=push_delay, install=install))


def install_paths(quick: bool) -> list[dict]:
    """Each install path this kernel offers (copy on both backings, continue on memfd,
    move on anon): push throughput with RAM populated, and demand fault latency with
    the pusher held back, with ratios to copy on the same backing. Quick: one 64 MiB
    random-write migration per path gives both; full: a 256 MiB sequential one for the
    push and a 256 MiB random-write one for the faults."""
    from postcopy.migration.install import supported_paths

    rows = []
    for backing in ("memfd", "anon"):
        for path in supported_paths(backing):
            # Steps are sized so each guest runs ~3 s at its rate: populated before the
            # move, still running after it.
            if quick:
                demand = push = _install_migration(path, backing, 64 << 20, workload="random-write", steps=250_000,
                                                   rate=100_000, migrate_after=0.6, push_delay=0.3)
            else:
                push = _install_migration(path, backing, 256 << 20, workload="sequential", steps=300_000,
                                          rate=100_000, migrate_after=1.0, push_delay=0.0)
                demand = _install_migration(path, backing, 256 << 20, workload="random-write", steps=900_000,
                                            rate=300_000, migrate_after=1.0, push_delay=1.0)
            faults = demand["dest"]["fault_latency_us_before_push"]
            rows.append({"install": push.get("install", path), "backing": backing,
                         "push_bytes_per_s": push["dest"]["push_bytes_per_s"],
                         "fault_us": faults, "verified": push["verified"] and demand["verified"]})
    for row in rows:
        base = next(r for r in rows if r["backing"] == row["backing"] and r["install"] == "copy")
        row["push_vs_copy"] = _ratio(row["push_bytes_per_s"], base["push_bytes_per_s"])
        row["fault_p50_vs_copy"] = _ratio(row["fault_us"]["p50"], base["fault_us"]["p50"])
        row["fault_p99_vs_copy"] = _ratio(row["fault_us"]["p99"], base["fault_us"]["p99"])
    return rows


_ERRORS: dict[str, str] = {}


def _experiment(name: str, run, quick: bool, empty):
    """Run one experiment; a failure is recorded and reported, not fatal to the rest."""
    try:
        return run(quick)
    except Exception as exc:  # the other experiments' figures still count
        _ERRORS[name] = f"{type(exc).__name__}: {exc}"
        print(f"bench: {name} failed: {_ERRORS[name]}", file=sys.stderr)
        return empty


def _ratio(value, base):
    return None if value is None or not base else value / base


def run_bench(quick: bool) -> dict:
    started = time.monotonic()
    base = network_baselines(bulk_bytes=(512 << 20) if quick else (4 << 30), rtt_count=3000 if quick else 20000)
    base["uffd_roundtrip_us"] = uffd_roundtrip(2000 if quick else 20000)
    # Demand faults alone first (the pusher waits), then with the pusher running.
    # Demand faults alone first (the pusher waits a second), then with the pusher.
    demand = migration(256 << 20, workload="random-write", steps=900_000, rate=300_000, push_delay=1.0)
    # Sequential at a fixed rate: all RAM is populated before the move, and the guest
    # is still running (lightly) while the pusher streams it.
    small = migration(256 << 20, workload="sequential", steps=400_000, rate=200_000, migrate_after=0.6)
    large = migration(2 << 30, workload="sequential", steps=700_000, rate=200_000, migrate_after=1.8)
    fault_base = (base["tcp_rtt_4k_us"]["p50"] or 0) + (base["uffd_roundtrip_us"]["p50"] or 0)
    fault_base_p99 = (base["tcp_rtt_4k_us"]["p99"] or 0) + (base["uffd_roundtrip_us"]["p99"] or 0)
    no_push = demand["dest"]["fault_latency_us_before_push"]
    with_push = demand["dest"]["fault_latency_us_during_push"]
    push_rate = small["dest"]["push_bytes_per_s"]
    figures = {
        "push_bytes_per_s": push_rate,
        "fault_us_without_pusher": no_push,
        "fault_us_with_pusher": with_push,
        "downtime_ms_256M": small["downtime_ms"],
        "downtime_ms_2G": large["downtime_ms"],
        "agent_max_rss_mib_2G": {"source": large["source"]["max_rss_kib"] / 1024,
                                 "dest": large["source"]["dest"]["max_rss_kib"] / 1024},
        "verified": all(r["verified"] for r in (demand, small, large)),
    }
    ratios = {
        "push_vs_tcp_bulk": _ratio(push_rate, base["tcp_bulk_bytes_per_s"]),
        "fault_p50_vs_rtt_plus_uffd": _ratio(no_push["p50"], fault_base),
        "fault_p99_vs_rtt_plus_uffd": _ratio(no_push["p99"], fault_base_p99),
        "fault_p99_with_vs_without_pusher": _ratio(with_push["p99"], no_push["p99"]),
    }
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "quick": quick,
        "baselines": base,
        "postcopy": figures,
        "ratios": ratios,
        "harvest": _experiment("harvest", harvest_rows, quick, []),
        "precopy": _experiment("precopy", precopy_rows, quick, []),
        "checkpoint": _experiment("checkpoint", checkpoint_figures, quick, {}),
        "pause_resume": _experiment("pause-resume", pause_resume, quick, {}),
        "install_paths": _experiment("install paths", install_paths, quick, []),
        "errors": _ERRORS,
        "seconds": time.monotonic() - started,
    }


def markdown(result: dict) -> str:
    """The headline figures as Markdown tables."""
    from postcopy.bench.harvest import format_table

    b, f, r = result["baselines"], result["postcopy"], result["ratios"]

    def num(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    lines = [f"# postcopy bench ({'quick' if result['quick'] else 'full'}), kernel {result['kernel']}, "
             f"{result['cpus']} CPUs", "",
             "| figure | value | baseline | ratio |", "|---|---|---|---|",
             f"| push throughput | {num(f['push_bytes_per_s'] and f['push_bytes_per_s'] / 1e9)} GB/s | "
             f"TCP bulk {b['tcp_bulk_bytes_per_s'] / 1e9:.2f} GB/s | {num(r['push_vs_tcp_bulk'])}x |",
             f"| demand fault p50, no pusher | {num(f['fault_us_without_pusher']['p50'], '{:.1f}')} µs | "
             f"RTT+uffd p50 | {num(r['fault_p50_vs_rtt_plus_uffd'])}x |",
             f"| demand fault p99, no pusher | {num(f['fault_us_without_pusher']['p99'], '{:.1f}')} µs | "
             f"RTT+uffd p99 | {num(r['fault_p99_vs_rtt_plus_uffd'])}x |",
             f"| demand fault p99, pusher on | {num(f['fault_us_with_pusher']['p99'], '{:.1f}')} µs | "
             f"p99 without pusher | {num(r['fault_p99_with_vs_without_pusher'])}x |",
             f"| downtime 256 MiB / 2 GiB | {num(f['downtime_ms_256M'])} / {num(f['downtime_ms_2G'])} ms | | |",
             "", "## Harvest cost (ms per harvest)", "", "```", format_table(result["harvest"]), "```", "",
             "## Precopy and hybrid (random-write)", "",
             "| mode | dirty log | steps/s per vCPU | rounds | sent / RAM | downtime ms | verified |",
             "|---|---|---|---|---|---|---|"]
    for row in result["precopy"]:
        lines.append(f"| {row['mode']} | {row['dirty_log']} | {row['steps_per_s']} | {row['rounds']} | "
                     f"{row['sent_per_ram']:.2f} | {num(row['downtime_ms'])} | {row['verified']} |")
    lines += ["", "## Continuous checkpointing", "", "| dirty bound | checkpoints/s | pause p50 ms | pause p99 ms |",
              "|---|---|---|---|"]
    for bound, row in (result.get("checkpoint") or {}).get("bounds", {}).items():
        pause = row.get("pause_ms") or {}
        lines.append(f"| {bound} | {num(row.get('checkpoints_per_s'), '{:.0f}')} | {num(pause.get('p50'), '{:.3f}')} | "
                     f"{num(pause.get('p99'), '{:.3f}')} |")
    pr = result.get("pause_resume") or {}
    if pr:
        lines += ["", f"## Guest pause and resume ({pr['rounds']} rounds, {pr['threads_created']} threads created)", "",
                  "| figure | p50 µs | p99 µs | max µs |", "|---|---|---|---|"]
        for label, key in (("pause -> parked", "pause_to_parked_us"), ("resume -> first step", "resume_to_first_step_us"),
                           (f"one epoch ({pr['epoch_command']} 1 step)", "epoch_rpc_us")):
            row = pr[key]
            lines.append(f"| {label} | {num(row['p50'], '{:.1f}')} | {num(row['p99'], '{:.1f}')} | "
                         f"{num(row['max'], '{:.1f}')} |")
    lines += ["", "## Install paths (UFFDIO_COPY vs CONTINUE vs MOVE)", "",
              "| install | backing | push GB/s | vs copy | demand fault p50 µs | p99 µs | p50 / p99 vs copy | verified |",
              "|---|---|---|---|---|---|---|---|"]
    for row in result.get("install_paths") or []:
        push, lat = row["push_bytes_per_s"], row["fault_us"]
        lines.append(f"| {row['install']} | {row['backing']} | {num(push and push / 1e9)} | {num(row['push_vs_copy'])}x | "
                     f"{num(lat['p50'], '{:.1f}')} | {num(lat['p99'], '{:.1f}')} | "
                     f"{num(row['fault_p50_vs_copy'])}x / {num(row['fault_p99_vs_copy'])}x | {row['verified']} |")
    return "\n".join(lines) + "\n"


def format_bench(result: dict) -> str:
    b, f, r = result["baselines"], result["postcopy"], result["ratios"]

    def num(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    lines = [
        f"kernel {result['kernel']}, {result['cpus']} CPUs, {'quick' if result['quick'] else 'full'} run",
        "baselines:",
        f"  TCP bulk over veth          {b['tcp_bulk_bytes_per_s'] / 1e9:.2f} GB/s",
        f"  TCP 4 KiB RTT over veth     p50 {num(b['tcp_rtt_4k_us']['p50'], '{:.1f}')} µs  p99 {num(b['tcp_rtt_4k_us']['p99'], '{:.1f}')} µs",
        f"  uffd round trip (C handler) p50 {num(b['uffd_roundtrip_us']['p50'], '{:.1f}')} µs  p99 {num(b['uffd_roundtrip_us']['p99'], '{:.1f}')} µs",
        "postcopy:",
        f"  push throughput             {num(f['push_bytes_per_s'] and f['push_bytes_per_s'] / 1e9)} GB/s"
        f"   ({num(r['push_vs_tcp_bulk'])}x TCP bulk)",
        f"  demand fault, no pusher     p50 {num(f['fault_us_without_pusher']['p50'], '{:.1f}')} µs"
        f" ({num(r['fault_p50_vs_rtt_plus_uffd'])}x RTT+uffd)  p99 {num(f['fault_us_without_pusher']['p99'], '{:.1f}')} µs"
        f" ({num(r['fault_p99_vs_rtt_plus_uffd'])}x)",
        f"  demand fault, pusher on     p50 {num(f['fault_us_with_pusher']['p50'], '{:.1f}')} µs"
        f"  p99 {num(f['fault_us_with_pusher']['p99'], '{:.1f}')} µs ({num(r['fault_p99_with_vs_without_pusher'])}x without)",
        f"  downtime                    256 MiB {num(f['downtime_ms_256M'])} ms, 2 GiB {num(f['downtime_ms_2G'])} ms",
        f"  agent max RSS at 2 GiB      source {f['agent_max_rss_mib_2G']['source']:.0f} MiB,"
        f" dest {f['agent_max_rss_mib_2G']['dest']:.0f} MiB",
        f"  all migrations verified     {f['verified']}",
        f"({result['seconds']:.0f} s)",
    ]
    return "\n".join(lines) + "\n\n" + markdown(result)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure postcopy against same-run baselines")
    p.add_argument("--quick", action="store_true", help="smaller samples (under two minutes)")
    p.add_argument("--markdown", metavar="FILE", help="write the Markdown tables to FILE")
    p.add_argument("--harvest", action="store_true",
                   help="only the dirty-log harvest-cost table (what scripts/kernel-matrix runs in other kernels)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--svg", metavar="DIR", help="write the benchmark figures (SVG) into DIR")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.harvest:
        from postcopy.bench.harvest import format_table

        rows = harvest_rows(args.quick)
        print(f"kernel {platform.release()}: dirty-log harvest cost")
        print(format_table(rows))
        if args.json:
            report.write_json(args.json, {"kernel": platform.release(), "harvest": rows})
        return 0
    result = run_bench(args.quick)
    print(format_bench(result))
    if args.json:
        report.write_json(args.json, result)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    if args.svg:
        os.makedirs(args.svg, exist_ok=True)
        for path in svg.write_figures(args.svg, svg.bench_figures(result)):
            print(f"wrote {path}")
    for name, error in result["errors"].items():
        print(f"bench: {name} failed: {error}", file=sys.stderr)
    return 1 if result["errors"] else 0
