"""``postcopy bench``: postcopy figures as ratios to baselines measured in C in the same
run on the same machine (TCP bulk and 4 KiB round trips over the same veth, the uffd
round trip with a C handler; each with both ends on one CPU and across two CPUs), and
the agents' CPU seconds per GiB moved in the push window (pushed and demand pages)
beside the C sender's and receiver's."""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

from postcopy import report

from postcopy import svg
from postcopy.bench.agentcpu import AgentCpu, push_cpu_per_gib
from postcopy.bench.checkpointing import checkpoint_figures
from postcopy.bench.ratios import baseline_ratios, ratio
from postcopy.bench.tables import format_bench, markdown
from postcopy.testbed.demo import DemoOptions, run_demo
from postcopy.guest import GuestParams

BENCH_PORT = 7020


def c_baselines(quick: bool) -> dict:
    """The C floors of this run (bench/baselines.py), on a testbed of their own."""
    from postcopy.bench import baselines

    return baselines.measure(bulk_bytes=(256 << 20) if quick else (2 << 30), rtt_count=3000 if quick else 20000,
                             uffd_faults=2000 if quick else 20000, port=BENCH_PORT)


def _park_at(params: GuestParams) -> int:
    """Where a bench guest parks if a busy host has not migrated it yet (see
    DemoOptions.park_at): late enough that an idle host always migrates it mid-run."""
    return params.steps - max(1, params.steps // 20)


def migration(ram: int, *, workload: str, steps: int, rate: float = 0, migrate_after: float = 0.5,
              push_delay: float = 0.0, threads: int = 2, install: str = "copy", prealloc: bool = False,
              cpus: tuple[int, int] | None = None) -> dict:
    """One bench migration on a fresh testbed; ``cpus``: (the source host's CPU, the
    destination's) to pin it, else unpinned."""
    params = GuestParams(ram=ram, threads=threads, workload=workload, seed=11, steps=steps, rate=rate, working_set=1.0)
    return run_demo(DemoOptions(params=params, park_at=_park_at(params), migrate_after=migrate_after,
                                port=BENCH_PORT + 1,
                                push_delay=push_delay, install=install, prealloc=prealloc,
                                cpus=cpus and (frozenset({cpus[0]}), frozenset({cpus[1]}))))


def demand_migration(cpus: tuple[int, int] | None = None) -> dict:
    """The demand-fault migration (256 MiB, random-write: faults stay random): the
    pusher waits a second, so faults are first served alone, then beside it."""
    return migration(256 << 20, workload="random-write", steps=900_000, rate=300_000, push_delay=1.0, cpus=cpus)


def pinned_faults(base: dict) -> dict[str, dict]:
    """Demand faults served alone with the migration pinned as each floor of
    ``base["pinned_placements"]`` was measured (bench/baselines.py), so that each is
    compared with the floor of its own placement: name -> the CPUs, the latency
    summary and whether the migration verified."""
    rows = {}
    for name, (source_cpu, dest_cpu) in base["pinned_placements"].items():
        result = demand_migration(cpus=(source_cpu, dest_cpu))
        rows[name] = {"cpus": [source_cpu, dest_cpu], "fault_us": result["dest"]["fault_latency_us_before_push"],
                      "verified": result["verified"]}
    return rows


# Push variants: (install path, --prealloc, the C floor of the same RAM work: bulk into
# fresh RAM page by page, or into RAM populated first; see bench/baselines.py).
PUSH_VARIANTS = {"copy": ("copy", False, "ram-copy"), "continue": ("continue", False, "ram-copy"),
                 "continue+prealloc": ("continue", True, "ram-prefault")}


def push_runs() -> dict[str, dict]:
    """The headline push migration (256 MiB, sequential at a fixed rate: all RAM populated
    before the move, the guest still running lightly while the pusher streams it) on each
    install path this kernel offers for memfd RAM (copy, continue, and continue with the
    destination's RAM allocated first): the user's choice (--install, --prealloc), so the
    bench reports the best beside each. Per variant: the report and the agents' CPU per
    GiB moved in the push window."""
    from postcopy.migration.install import supported_paths

    runs = {}
    offered = supported_paths("memfd")
    for name, (path, prealloc, _) in PUSH_VARIANTS.items():
        if path not in offered:
            continue
        with AgentCpu() as agent_cpu:
            result = migration(256 << 20, workload="sequential", steps=400_000, rate=200_000, migrate_after=0.6,
                               install=path, prealloc=prealloc)
        runs[name] = {"result": result, "cpu": push_cpu_per_gib(agent_cpu, result, resource.getpagesize())}
    return runs


def push_figures(runs: dict[str, dict]) -> dict:
    """The best variant's push (named) and each variant's, from :func:`push_runs`."""
    def rate(name: str) -> float:
        return runs[name]["result"]["dest"]["push_bytes_per_s"] or 0.0

    best = max(runs, key=rate)
    by_install = {name: {"push_bytes_per_s": rate(name) or None, "ram_floor": PUSH_VARIANTS[name][2],
                         "prealloc_ms": run["result"]["dest"].get("prealloc_ms"),
                         **{f"{role}_cpu_s_per_gib": (run["cpu"].get(role) or {}).get("cpu_s_per_gib")
                            for role in ("source", "dest")}}
                  for name, run in runs.items()}
    return {"push_bytes_per_s": rate(best) or None, "push_install": best, "push_by_install": by_install,
            "push_cpu": runs[best]["cpu"]}


def harvest_rows(quick: bool) -> list[dict]:
    """Harvest cost per dirty-log backend this kernel has (plus the C-loop and full
    pagemap-read baselines), labelled with the kernel it ran on."""
    from postcopy.bench.harvest import harvest_table

    sizes = (256 << 20,) if quick else (256 << 20, 1 << 30, 4 << 30)
    rows = harvest_table(sizes=sizes, dirty=(0, 100, 10_000, 100_000), large=not quick, repeats=3 if quick else 7)
    kernel = platform.release()
    return [{**row, "backend": row["method"], "kernel": kernel} for row in rows]


def precopy_rows(quick: bool) -> list[dict]:
    """Postcopy, precopy and hybrid on a random-write guest at a few dirty rates:
    rounds, bytes sent per byte of RAM, downtime, and demand faults in the first second
    after the switchover (hybrid sends its stale set first to keep that near postcopy's)."""
    rows = []
    ram = 64 << 20
    for rate in ((50_000,) if quick else (10_000, 50_000, 200_000)):
        for mode in ("postcopy", "precopy", "hybrid"):
            params = GuestParams(ram=ram, threads=2, workload="random-write", seed=13, steps=int(rate * 4),
                                 rate=rate, working_set=0.5)
            result = run_demo(DemoOptions(params=params, park_at=_park_at(params), mode=mode, migrate_after=0.5,
                                          port=BENCH_PORT + 2,
                                          downtime_limit_ms=20, max_rounds=10))
            rows.append({"mode": mode, "dirty_log": result["dirty_log"], "steps_per_s": rate,
                         "rounds": len(result["precopy_rounds"]),
                         "sent_per_ram": result["bytes_sent"] / ram, "downtime_ms": result["downtime_ms"],
                         "faults_first_s": result["dest"].get("faults_first_second"),
                         "verified": result["verified"]})
    return rows


def pause_resume(quick: bool) -> dict:
    """How fast the guest answers pause and resume (persistent vCPU threads): p50/p99 of
    pause -> parked, resume -> first step and one ``run`` epoch, in µs."""
    from postcopy.bench.pauseresume import pause_resume_figures

    return pause_resume_figures(rounds=200 if quick else 2000)


def _install_migration(install: str, backing: str, ram: int, *, workload: str, steps: int, rate: float,
                       migrate_after: float, push_delay: float) -> dict:
    params = GuestParams(ram=ram, threads=2, workload=workload, seed=17, steps=steps, rate=rate, working_set=1.0,
                         backing=backing)
    return run_demo(DemoOptions(params=params, park_at=_park_at(params), migrate_after=migrate_after,
                                port=BENCH_PORT + 4,
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
        row["push_vs_copy"] = ratio(row["push_bytes_per_s"], base["push_bytes_per_s"])
        row["fault_p50_vs_copy"] = ratio(row["fault_us"]["p50"], base["fault_us"]["p50"])
        row["fault_p99_vs_copy"] = ratio(row["fault_us"]["p99"], base["fault_us"]["p99"])
    return rows


def mac_speeds(size: int = 1 << 20, seconds: float = 0.3) -> dict:
    """Bytes per CPU second of the frame MAC alone (CPU time: other load on the machine
    does not count): AES-256-GMAC in C (libcrypto, what the wire uses) against
    HMAC-SHA256 from hashlib, over the same 1 MiB buffer."""
    import hashlib
    import hmac

    from postcopy.protocol.auth import FrameAuth

    buf = os.urandom(size)
    gmac = FrameAuth(os.urandom(32))
    rounds = max(1, int(4e9 * seconds / size))  # ~4 GB/s worth: the CPU time taken sets the rate
    gmac_rate = rounds * size / gmac.bench(buf, rounds)
    key, t0, n = os.urandom(32), time.thread_time(), 0
    while time.thread_time() - t0 < seconds:
        hmac.new(key, buf, hashlib.sha256).digest()
        n += 1
    hmac_rate = n * size / (time.thread_time() - t0)
    return {"gmac_c_bytes_per_s": gmac_rate, "hmac_sha256_hashlib_bytes_per_s": hmac_rate,
            "gmac_vs_hmac": ratio(gmac_rate, hmac_rate)}


def frame_auth_figures(quick: bool) -> dict:
    """What frame authentication costs: the MAC alone, and push throughput of the same
    migration with tags and without (the UNSAFE --unsafe-no-frame-auth, only here)."""
    ram = (64 << 20) if quick else (256 << 20)
    runs = {}
    for label, auth in (("authenticated", True), ("unauthenticated_unsafe", False)):
        # As the headline push figure: RAM populated before the move, the guest still running.
        params = GuestParams(ram=ram, threads=2, workload="sequential", seed=19, steps=800_000, rate=200_000,
                             working_set=1.0)
        result = run_demo(DemoOptions(params=params, migrate_after=0.6, port=BENCH_PORT + 5, frame_auth=auth))
        runs[label] = {"push_bytes_per_s": result["dest"]["push_bytes_per_s"], "verified": result["verified"]}
    with_auth = runs["authenticated"]["push_bytes_per_s"]
    return {"mac": mac_speeds(), "push": runs,
            "push_with_vs_without_auth": ratio(with_auth, runs["unauthenticated_unsafe"]["push_bytes_per_s"])}


_ERRORS: dict[str, str] = {}


def _experiment(name: str, run, quick: bool, empty):
    """Run one experiment; a failure is recorded and reported, not fatal to the rest."""
    try:
        return run(quick)
    except Exception as exc:  # the other experiments' figures still count
        _ERRORS[name] = f"{type(exc).__name__}: {exc}"
        print(f"bench: {name} failed: {_ERRORS[name]}", file=sys.stderr)
        return empty


def _kvm_figures(quick: bool) -> dict:
    from postcopy.bench.kvm import kvm_figures

    result = kvm_figures(quick, port=BENCH_PORT + 6)
    if result.get("failed_rows"):
        _ERRORS["kvm"] = f"{result['failed_rows']} row(s) failed (reasons in the KVM tables)"
    return result


def run_bench(quick: bool) -> dict:
    started = time.monotonic()
    base = c_baselines(quick)
    # Demand faults alone first (the pusher waits a second), then with the pusher.
    demand = demand_migration()
    pinned = pinned_faults(base)
    pushes = push_runs()
    small = pushes["copy"]["result"]  # the default path's downtime
    large = migration(2 << 30, workload="sequential", steps=700_000, rate=200_000, migrate_after=1.8)
    no_push = demand["dest"]["fault_latency_us_before_push"]
    with_push = demand["dest"]["fault_latency_us_during_push"]
    figures = {
        **push_figures(pushes),
        "fault_us_without_pusher": no_push,
        "fault_us_with_pusher": with_push,
        "fault_us_pinned": pinned,
        "downtime_ms_256M": small["downtime_ms"],
        "downtime_ms_2G": large["downtime_ms"],
        "downtime_breakdown_256M": small.get("downtime_breakdown"),
        "downtime_breakdown_2G": large.get("downtime_breakdown"),
        "agent_max_rss_mib_2G": {"source": large["source"]["max_rss_kib"] / 1024,
                                 "dest": large["source"]["dest"]["max_rss_kib"] / 1024},
        "verified": all([*(r["verified"] for r in (demand, large, *(run["result"] for run in pushes.values()))),
                         *(row["verified"] for row in pinned.values())]),
    }
    ratios = baseline_ratios(base, figures)
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "quick": quick,
        "baselines": base,
        "postcopy": figures,
        "ratios": ratios,
        "harvest": _experiment("harvest", harvest_rows, quick, []),
        "precopy": _experiment("precopy", precopy_rows, quick, []),
        "checkpoint": _experiment("checkpoint", lambda q: checkpoint_figures(q, BENCH_PORT + 3), quick, {}),
        "pause_resume": _experiment("pause-resume", pause_resume, quick, {}),
        "install_paths": _experiment("install paths", install_paths, quick, []),
        "frame_auth": _experiment("frame auth", frame_auth_figures, quick, {}),
        "kvm": _experiment("kvm", _kvm_figures, quick, {}),
        "errors": _ERRORS,
        "seconds": time.monotonic() - started,
    }


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure postcopy against same-run baselines")
    p.add_argument("--quick", action="store_true", help="smaller samples (under two minutes)")
    p.add_argument("--markdown", metavar="FILE", help="write the Markdown tables to FILE")
    p.add_argument("--harvest", action="store_true",
                   help="only the dirty-log harvest-cost table (what scripts/kernel-matrix runs in other kernels)")
    p.add_argument("--kvm", action="store_true",
                   help="only the KVM guest's tables: KVM dirty logs beside pagemap-scan (and soft-dirty where "
                   "the kernel has it), step, harvest and checkpoint rates")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--svg", metavar="DIR", help="write the benchmark figures (SVG) into DIR")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.kvm:
        from postcopy.bench.kvm import format_kvm, kvm_figures

        result = kvm_figures(args.quick, progress=lambda msg: print(msg, file=sys.stderr), port=BENCH_PORT + 6)
        text = f"kernel {platform.release()}: KVM guest\n{format_kvm(result)}"
        print(text)
        if args.json:
            report.write_json(args.json, {"kernel": platform.release(), "kvm": result})
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(f"# {text.splitlines()[0]}\n\n```\n{format_kvm(result)}\n```\n")
        if result.get("failed_rows"):  # every other row was measured and saved; say so in the status
            print(f"bench: {result['failed_rows']} KVM row(s) FAILED (reasons in the tables)", file=sys.stderr)
            return 1
        return 0
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
