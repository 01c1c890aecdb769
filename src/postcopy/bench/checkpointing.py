"""The continuous-checkpointing section of ``postcopy bench``: checkpoints per second
at each dirty bound beside the C floor of one epoch (:mod:`postcopy.bench.ckptfloor`)."""
from __future__ import annotations

from postcopy.units import format_num


def checkpoint_figures(quick: bool, port: int) -> dict:
    """Checkpoints per second at each dirty bound, beside the C floor of one epoch
    (bench/ckptfloor.py), measured right before and right after (the best of both)."""
    from postcopy.bench.ckptfloor import FloorUnavailable, attach_floors, measure_floors
    from postcopy.testbed.checkpoint_demo import run_checkpoint_demo

    bounds = (64,) if quick else (64, 256, 1024)
    try:
        floors = measure_floors(bounds)
    except FloorUnavailable:
        floors = None
    result = run_checkpoint_demo(ram=32 << 20, dirty_bounds=bounds, seconds=1.0 if quick else 3.0,
                                 port=port)
    if floors is not None:
        attach_floors(result, measure_floors(bounds, floors))
    return result


def checkpoint_table(checkpoint: dict) -> list[str]:
    """The continuous-checkpointing section: rate per dirty bound beside the C floor of
    one epoch, then where the floor's epoch goes."""
    lines = ["", "## Continuous checkpointing", "",
             "| dirty bound | checkpoints/s | floor/s | vs floor | pause p50 ms | pause p99 ms |", "|---|---|---|---|---|---|"]
    rows = checkpoint.get("bounds", {})
    for bound, row in rows.items():
        pause = row.get("pause_ms") or {}
        lines.append(f"| {bound} | {format_num(row.get('checkpoints_per_s'), '{:.0f}')} | "
                     f"{format_num(row.get('floor_per_s'), '{:.0f}')} | {format_num(row.get('vs_floor'))} | "
                     f"{format_num(pause.get('p50'), '{:.3f}')} | {format_num(pause.get('p99'), '{:.3f}')} |")
    return lines + _floor_parts_rows(rows)


def _floor_parts_rows(checkpoint_rows: dict) -> list[str]:
    """Where the C floor's epoch goes (µs per epoch), per dirty bound."""
    from postcopy.bench.ckptfloor import PARTS

    floors = {bound: row["floor"] for bound, row in checkpoint_rows.items() if row.get("floor")}
    if not floors:
        return []
    lines = ["", "C floor of one epoch (native/ckpt_floor.c), µs per epoch (ack window: unacknowledged epochs "
             "allowed; apply: the receiver's):", "",
             "| dirty pages | window | " + " | ".join(PARTS) + " |", "|---" * (len(PARTS) + 2) + "|"]
    for bound, floor in floors.items():
        lines.append(f"| {bound} | {floor['window']} | " + " | ".join(f"{floor['parts_us'][p]:.1f}" for p in PARTS) + " |")
    return lines
