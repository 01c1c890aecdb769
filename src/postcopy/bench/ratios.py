"""Each ``postcopy bench`` figure against its C floor of the same run (the ratios the
report and its tables carry)."""
from __future__ import annotations


def ratio(value, base):
    """value / base; None when either is missing (or base is 0)."""
    return None if value is None or not base else value / base


def baseline_ratios(base: dict, figures: dict) -> dict:
    """Every postcopy figure against its C floor of the same run: push against the
    faster C TCP bulk placement, demand faults against C RTT + C uffd round trip of
    each placement, the agents' CPU per GiB moved in the push window against the C sender's (source)
    and receiver's (dest) on that bulk placement."""
    no_push, with_push = figures["fault_us_without_pusher"], figures["fault_us_with_pusher"]
    ratios = {"push_vs_tcp_bulk": ratio(figures["push_bytes_per_s"], base["tcp_bulk_bytes_per_s"])}
    for name, row in (figures.get("push_by_install") or {}).items():  # each against bulk into RAM the same way
        floor = (base.get("tcp_into_ram") or {}).get(row["ram_floor"]) or {}
        ratios[f"push_{name}_vs_tcp_into_{row['ram_floor']}"] = ratio(row["push_bytes_per_s"], floor.get("bytes_per_s"))
    for placement, floor in base["fault_floor_us"].items():
        for p in ("p50", "p99"):
            ratios[f"fault_{p}_vs_floor_{placement}"] = ratio(no_push[p], floor[p])
    for placement, row in (figures.get("fault_us_pinned") or {}).items():
        floor = base["pinned_fault_floor_us"][placement]
        for p in ("p50", "p99"):
            ratios[f"fault_{p}_pinned_{placement}_vs_floor"] = ratio(row["fault_us"][p], floor[p])
    ratios["fault_p99_with_vs_without_pusher"] = ratio(with_push["p99"], no_push["p99"])
    c_cpu = base["tcp_bulk"][base["tcp_bulk_placement"]]["cpu"]
    into_cpu = push_floor_cpu(base, figures)
    for role, side in (("source", "client"), ("dest", "server")):
        agent = (figures.get("push_cpu") or {}).get(role) or {}
        ratios[f"{role}_cpu_per_gib_vs_c"] = ratio(agent.get("cpu_s_per_gib"), c_cpu[side]["cpu_s_per_gib"])
        ratios[f"{role}_cpu_per_gib_vs_c_into_ram"] = ratio(agent.get("cpu_s_per_gib"),
                                                            (into_cpu.get(side) or {}).get("cpu_s_per_gib"))
    return ratios


def push_floor_cpu(base: dict, figures: dict) -> dict:
    """The C sender's and receiver's CPU ("client", "server") of TCP bulk into guest RAM
    done as the reported push does it (its install variant's RAM floor, at that floor's
    faster placement): the same work, where the raw link's floor fills no RAM. {} if
    either is missing."""
    variant = (figures.get("push_by_install") or {}).get(figures.get("push_install")) or {}
    floor = (base.get("tcp_into_ram") or {}).get(variant.get("ram_floor")) or {}
    placement = (floor.get("by_placement") or {}).get(floor.get("placement")) or {}
    return placement.get("cpu") or {}
