"""The C floor of one continuous-checkpointing epoch (native/ckpt_floor.c): write N
distinct random pages of a 32 MiB memfd region armed with async write-protect, harvest
them with PAGEMAP_SCAN, copy them out, send them over loopback TCP to a thread that
stages, applies and acknowledges them. Its epochs per second are what this machine
can do at all; the checkpointer's rate is reported as a ratio to it."""
from __future__ import annotations

import errno
import os

from postcopy._native import ffi, lib
from postcopy.bench.floors import STRETCHES

PARTS = ("write", "harvest", "copy", "send", "ack", "apply")


class FloorUnavailable(RuntimeError):
    """The kernel lacks what the floor needs (async write-protect, PAGEMAP_SCAN)."""


def checkpoint_floor(dirty: int, *, ram: int = 32 << 20, epochs: int = 1000, window: int = 4,
                     seed: int = 7) -> dict:
    """Run the floor: ``epochs`` epochs of ``dirty`` pages, at most ``window`` epochs
    unacknowledged (the checkpointer's ``max_unacked``). Returns epochs_per_s (the
    calmest of a few consecutive stretches of epochs: a burst of someone else's load
    must not lower a floor), the mean µs per epoch of each part, and what was checked:
    pages_found against pages_written, image_matches (receiver's image == source)."""
    parts = ffi.new("struct pc_ckpt_floor_parts *")
    times = ffi.new("uint64_t[]", epochs)
    rc = lib.pc_ckpt_floor_run(ram, dirty, epochs, window, seed, times, parts)
    if rc == -errno.EOPNOTSUPP:
        raise FloorUnavailable("the checkpoint floor needs async write-protect (UFFD_FEATURE_WP_ASYNC) "
                               "and PAGEMAP_SCAN (Linux 6.7+)")
    if rc < 0:
        raise OSError(-rc, f"checkpoint floor: {os.strerror(-rc)}")
    done = parts.epochs
    return {
        "dirty_pages": dirty, "ram_bytes": ram, "epochs": done, "window": window,
        "epochs_per_s": _calmest_rate([times[i] for i in range(done)]),
        "epochs_per_s_all": round(done / (parts.total_ns / 1e9), 1),
        "parts_us": {name: round(getattr(parts, f"{name}_ns") / done / 1e3, 2) for name in PARTS},
        "pages_written": parts.pages_written, "pages_found": parts.pages_found,
        "epochs_short": parts.epochs_short, "image_matches": bool(parts.image_matches),
    }


def _calmest_rate(epoch_ns: list[int], stretches: int = STRETCHES) -> float:
    """Epochs per second of the fastest of ``stretches`` consecutive stretches."""
    size = max(1, len(epoch_ns) // stretches)
    best = min(sum(epoch_ns[i:i + size]) / size for i in range(0, len(epoch_ns) - size + 1, size))
    return round(1e9 / best, 1)


def best_floor(runs: list[dict]) -> dict:
    """Of several runs of the same floor (before and after the measurement it is a
    baseline for), the fastest: the floor is what the machine can do."""
    return max(runs, key=lambda run: run["epochs_per_s"])


def floor_epochs(dirty: int) -> int:
    """Epochs per floor run: a fraction of a second at this machine's rates."""
    return max(200, 200_000 // dirty)


# Acknowledgement windows the floor is run with: the checkpointer's default (4) and
# synchronous (0). On 2 CPUs that are hyperthreads of one core the two sides working at
# once can be slower than taking turns: the floor is the better of the two.
FLOOR_WINDOWS = (4, 0)


def measure_floors(bounds, runs: dict[int, list[dict]] | None = None,
                   windows=FLOOR_WINDOWS) -> dict[int, list[dict]]:
    """One floor run per dirty bound and window, appended to ``runs`` (bound -> runs so far)."""
    runs = {} if runs is None else runs
    for bound in bounds:
        for window in windows:
            runs.setdefault(bound, []).append(checkpoint_floor(bound, epochs=floor_epochs(bound), window=window))
    return runs


def attach_floors(result: dict, runs: dict[int, list[dict]]) -> dict:
    """Put each bound's floor (the best of its runs) beside the measured rate in a
    checkpoint-demo ``result``: ``floor`` (the run's figures), ``floor_per_s`` and
    ``vs_floor`` (measured checkpoints/s / floor epochs/s)."""
    for bound, row in result.get("bounds", {}).items():
        if not runs.get(bound):
            continue
        floor = best_floor(runs[bound])
        row["floor"] = {**floor, "runs": [run["epochs_per_s"] for run in runs[bound]]}
        row["floor_per_s"] = floor["epochs_per_s"]
        rate = row.get("checkpoints_per_s")
        row["vs_floor"] = round(rate / floor["epochs_per_s"], 3) if rate else None
    return result
