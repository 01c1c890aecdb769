"""``postcopy bench``'s result as text and Markdown tables: each figure beside its C
floor and their ratio."""
from __future__ import annotations

from postcopy import report
from postcopy.bench.checkpointing import checkpoint_table
from postcopy.bench.ratios import push_floor_cpu, ratio
from postcopy.units import format_num


def _times(v) -> str:
    return format_num(v, "{:.2f}x")


def _headline_rows(result: dict) -> list[str]:
    """The postcopy figures beside their C floors, then the floors, as Markdown tables."""
    from postcopy.bench import baselines

    b, f, r = result["baselines"], result["postcopy"], result["ratios"]
    us = "{:.1f}"
    floor, bulk = b["fault_floor_us"], b["tcp_bulk"][b["tcp_bulk_placement"]]
    push_cpu = f.get("push_cpu") or {}
    placements = list(floor)
    tcp = b["tcp_bulk_bytes_per_s"]
    by_install = f.get("push_by_install") or {}
    best = f" (install {f['push_install']}, the best of {len(by_install)})" if len(by_install) > 1 else ""
    rows = ["| figure | value | C floor (same run) | ratio |", "|---|---|---|---|",
            f"| push throughput{best} | {format_num(f['push_bytes_per_s'] and f['push_bytes_per_s'] / 1e9)} GB/s | "
            f"TCP bulk {tcp / 1e9:.2f} GB/s ({b['tcp_bulk_placement']}) | {_times(r['push_vs_tcp_bulk'])} |"]
    for path, row in by_install.items():
        push, into = row["push_bytes_per_s"], row["ram_floor"]
        floor_rate = ((b.get("tcp_into_ram") or {}).get(into) or {}).get("bytes_per_s")
        prealloc = f", RAM allocated first in {row['prealloc_ms']:.0f} ms" if row.get("prealloc_ms") else ""
        rows.append(f"| push, install {path} (CPU s/GiB source {format_num(row['source_cpu_s_per_gib'])}, dest "
                    f"{format_num(row['dest_cpu_s_per_gib'])}{prealloc}) | {format_num(push and push / 1e9)} GB/s | "
                    f"TCP bulk / TCP bulk into {into} {format_num(floor_rate and floor_rate / 1e9)} GB/s | "
                    f"{_times(ratio(push, tcp))} / {_times(r.get(f'push_{path}_vs_tcp_into_{into}'))} |")
    into_cpu = push_floor_cpu(b, f)
    into = (by_install.get(f.get("push_install")) or {}).get("ram_floor")
    for role, side, name in (("source", "client", "sender"), ("dest", "server", "receiver")):
        agent = push_cpu.get(role) or {}
        c_floor, times = f"TCP {name} {bulk['cpu'][side]['cpu_s_per_gib']:.2f}", _times(r[f"{role}_cpu_per_gib_vs_c"])
        if into:  # and the same RAM work's floor
            c_floor += f" / TCP {name} into {into} {format_num((into_cpu.get(side) or {}).get('cpu_s_per_gib'))}"
            times += f" / {_times(r.get(f'{role}_cpu_per_gib_vs_c_into_ram'))}"
        rows.append(f"| {role} agent CPU s per GiB moved in the push window{best} | "
                    f"{format_num(agent.get('cpu_s_per_gib'))} | {c_floor} | {times} |")
    for p in ("p50", "p99"):
        rows.append(f"| demand fault {p}, no pusher | {format_num(f['fault_us_without_pusher'][p], us)} µs | RTT+uffd "
                    + " / ".join(f"{format_num(floor[n][p], us)} µs ({n})" for n in placements) + " | "
                    + " / ".join(_times(r[f"fault_{p}_vs_floor_{n}"]) for n in placements) + " |")
    pinned_floor = b.get("pinned_fault_floor_us") or {}
    for name, row in (f.get("fault_us_pinned") or {}).items():
        source_cpu, dest_cpu = row["cpus"]
        rows.append(f"| demand fault p50 / p99, no pusher, pinned {name} (source CPU {source_cpu}, dest CPU {dest_cpu})"
                    f" | {format_num(row['fault_us']['p50'], us)} / {format_num(row['fault_us']['p99'], us)} µs | "
                    f"RTT+uffd {format_num(pinned_floor[name]['p50'], us)} / {format_num(pinned_floor[name]['p99'], us)}"
                    f" µs | {_times(r[f'fault_p50_pinned_{name}_vs_floor'])} / "
                    f"{_times(r[f'fault_p99_pinned_{name}_vs_floor'])} |")
    rows += [f"| demand fault p99, pusher on | {format_num(f['fault_us_with_pusher']['p99'], us)} µs | "
             f"p99 without pusher | {_times(r['fault_p99_with_vs_without_pusher'])} |",
             f"| downtime 256 MiB / 2 GiB | {format_num(f['downtime_ms_256M'])} / {format_num(f['downtime_ms_2G'])} ms | | |",
             "", *baselines.markdown_rows(b)]
    return rows


def _push_line(name: str, row: dict, base: dict, ratios: dict) -> str:
    """One push variant's line: GB/s against the raw link and against bulk into RAM."""
    into, push = row["ram_floor"], row["push_bytes_per_s"]
    return (f"    install {name:<17}   {format_num(push and push / 1e9)} GB/s   "
            f"({_times(ratio(push, base['tcp_bulk_bytes_per_s']))} C TCP bulk, "
            f"{_times(ratios.get(f'push_{name}_vs_tcp_into_{into}'))} C TCP bulk into {into})")


def markdown(result: dict) -> str:
    """The headline figures as Markdown tables."""
    from postcopy.bench.harvest import format_table

    num = format_num
    lines = [f"# postcopy bench ({'quick' if result['quick'] else 'full'}), kernel {result['kernel']}, "
             f"{result['cpus']} CPUs", "",
             *_headline_rows(result),
             "", "## Harvest cost (ms per harvest)", "", "```", format_table(result["harvest"]), "```", "",
             "## Postcopy, precopy and hybrid (random-write)", "",
             "| mode | dirty log | steps/s per vCPU | rounds | sent / RAM | downtime ms | faults in 1st s | verified |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["precopy"]:
        lines.append(f"| {row['mode']} | {row['dirty_log']} | {row['steps_per_s']} | {row['rounds']} | "
                     f"{row['sent_per_ram']:.2f} | {num(row['downtime_ms'])} | {row.get('faults_first_s')} | "
                     f"{row['verified']} |")
    lines += checkpoint_table(result.get("checkpoint") or {})
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
    auth = result.get("frame_auth") or {}
    if auth:
        mac, push = auth["mac"], auth["push"]
        lines += ["", "## Frame authentication", "", "| figure | value | baseline | ratio |", "|---|---|---|---|",
                  f"| MAC alone: AES-GMAC (C) | {mac['gmac_c_bytes_per_s'] / 1e9:.2f} GB/s | HMAC-SHA256 (hashlib) "
                  f"{mac['hmac_sha256_hashlib_bytes_per_s'] / 1e9:.2f} GB/s | {num(mac['gmac_vs_hmac'])}x |",
                  f"| push, authenticated | {num(push['authenticated']['push_bytes_per_s'] / 1e9)} GB/s | "
                  f"unauthenticated (unsafe) {num(push['unauthenticated_unsafe']['push_bytes_per_s'] / 1e9)} GB/s | "
                  f"{num(auth['push_with_vs_without_auth'])}x |"]
    if result.get("kvm"):
        from postcopy.bench.kvm import format_kvm

        lines += ["", "## KVM guest: KVM's dirty logs beside the process dirty logs", "", "```", format_kvm(result["kvm"]), "```"]
    return "\n".join(lines) + "\n"


def format_bench(result: dict) -> str:
    from postcopy.bench import baselines

    b, f, r = result["baselines"], result["postcopy"], result["ratios"]

    num = format_num
    lines = [
        f"kernel {result['kernel']}, {result['cpus']} CPUs, {'quick' if result['quick'] else 'full'} run",
        "C baselines (same run; placements: " + ", ".join(f"{n} {c}" for n, c in b["placements"].items()) + "):",
        *baselines.format_lines(b),
        "postcopy:",
        f"  push throughput             {num(f['push_bytes_per_s'] and f['push_bytes_per_s'] / 1e9)} GB/s"
        f"   ({_times(r['push_vs_tcp_bulk'])} C TCP bulk; install {f.get('push_install', 'copy')})",
        *(_push_line(name, row, b, r) for name, row in (f.get("push_by_install") or {}).items()),
        *(f"  {role} CPU per GiB moved while pushing   {num((f['push_cpu'].get(role) or {}).get('cpu_s_per_gib'))} s"
          f"   ({_times(r[f'{role}_cpu_per_gib_vs_c'])} C {side},"
          f" {_times(r.get(f'{role}_cpu_per_gib_vs_c_into_ram'))} C {side} into RAM the same way)"
          for role, side in (("source", "sender"), ("dest", "receiver"))),
        f"  demand fault, no pusher     p50 {num(f['fault_us_without_pusher']['p50'], '{:.1f}')} µs"
        f"  p99 {num(f['fault_us_without_pusher']['p99'], '{:.1f}')} µs",
        *(f"    vs C floor {n:<13}   p50 {_times(r[f'fault_p50_vs_floor_{n}'])}  p99 {_times(r[f'fault_p99_vs_floor_{n}'])}"
          for n in b["fault_floor_us"]),
        *(f"  demand fault, pinned {n:<9} p50 {num(row['fault_us']['p50'], '{:.1f}')} µs"
          f"  p99 {num(row['fault_us']['p99'], '{:.1f}')} µs  (source CPU {row['cpus'][0]}, dest CPU {row['cpus'][1]};"
          f" vs C floor of that placement p50 {_times(r[f'fault_p50_pinned_{n}_vs_floor'])}"
          f"  p99 {_times(r[f'fault_p99_pinned_{n}_vs_floor'])})"
          for n, row in (f.get("fault_us_pinned") or {}).items()),
        f"  demand fault, pusher on     p50 {num(f['fault_us_with_pusher']['p50'], '{:.1f}')} µs"
        f"  p99 {num(f['fault_us_with_pusher']['p99'], '{:.1f}')} µs ({num(r['fault_p99_with_vs_without_pusher'])}x without)",
        f"  downtime                    256 MiB {num(f['downtime_ms_256M'])} ms, 2 GiB {num(f['downtime_ms_2G'])} ms",
        *(line for size in ("256M", "2G")
          for line in (f"    where the {size} downtime went:",
                       report.format_breakdown(f.get(f"downtime_breakdown_{size}"), "      "))),
        f"  agent max RSS at 2 GiB      source {f['agent_max_rss_mib_2G']['source']:.0f} MiB,"
        f" dest {f['agent_max_rss_mib_2G']['dest']:.0f} MiB",
        f"  all migrations verified     {f['verified']}",
        f"({result['seconds']:.0f} s)",
    ]
    return "\n".join(lines) + "\n\n" + markdown(result)
