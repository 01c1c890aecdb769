"""The primary's per-epoch figures and the report made of them."""
from __future__ import annotations

import time

from postcopy import report


class EpochLog:
    """Per-epoch figures in flat lists (appending floats is all the loop does)."""

    def __init__(self) -> None:
        self.dirty_pages: list[int] = []
        self.runs: list[int] = []
        self.pause_us: list[float] = []  # guest parked -> resume requested
        self.run_us: list[float] = []  # resume requested -> parked again (includes the guest's steps)
        self.cycle_us: list[float] = []  # resume requested -> the next resume requested (steady epochs)
        self.harvest_us: list[float] = []
        self.collect_us: list[float] = []  # the epoch's frames built (with overlap: pages copied)
        self.send_us: list[float] = []  # the epoch buffer into the socket (guest running)
        self.ack_us: list[float] = []  # acknowledgement handling before resuming
        self.commit_ms: list[float] = []  # marker sent -> acknowledgement read
        self.steps: list[int] = []  # steps per vCPU of the first vCPU at each epoch
        self.unacked: list[int] = []  # epochs unacknowledged whenever the guest was let run


def summary(values: list[float], digits: int = 3) -> dict:
    s = report.latency_summary(values)
    out = {k: (round(v, digits) if isinstance(v, float) else v) for k, v in s.items()}
    out["mean"] = round(sum(values) / len(values), digits) if values else None
    return out


def primary_report(primary, mem, dirty, runner, status: dict, budget: int, sync: dict, started: float,
                   loop_started: float | None, loop_ended: float) -> dict:
    """The primary's report. Per-epoch statistics cover the steady epochs (2 on):
    epoch 1 carries everything written during the initial sync and is reported apart
    (``first_epoch``). ``pause_ms``: from the guest parking (its clock) to the resume
    request; the resume itself (control round trip, vCPU start) and the epoch's steps
    are in ``time_us.run_until_rpc``. ``checkpoints_per_s``: steady epochs over their
    wall time (from one resume to the next; ``checkpoints_per_s_pause_plus_run``, the
    figure reported before, sums pause and run times, which counts the time from the
    guest's park to the agent's notice twice: the harvest and a wake-up, ~10 % of an
    epoch of 64 pages, and with ``overlap`` the agent's send of the previous epoch too).
    ``commit_latency_ms``: marker sent to acknowledgement read."""
    log, cfg = primary.log, primary.config
    steady = slice(1, None)
    elapsed = (loop_ended - loop_started) if loop_started else 0.0
    epochs_timed = len(log.pause_us)  # epochs followed by a run
    steady_s = sum(log.pause_us[1:]) / 1e6 + sum(log.run_us[1:]) / 1e6
    dirty_steady = log.dirty_pages[steady]
    return {
        "role": "primary",
        "dirty_log": dirty.name if dirty is not None else None,
        "ram_bytes": mem.size if mem is not None else None,
        "page_size": mem.page_size if mem is not None else None,
        "workload": status.get("workload"),
        "threads": status.get("threads"),
        "max_dirty": cfg.max_dirty,
        "steps_per_epoch": budget,
        "interval_ms": cfg.interval_ms,
        "max_unacked": cfg.max_unacked,
        "overlap": primary.overlap,
        "epochs": primary.epoch,
        "committed_epoch": primary.acked,
        "committed_steps": log.steps[primary.acked - 1] if 0 < primary.acked <= len(log.steps) else None,
        "total_s": round(time.monotonic() - started, 4),
        "loop_s": round(elapsed, 4),
        "checkpoints_per_s": round(len(log.cycle_us) / (sum(log.cycle_us) / 1e6), 1) if log.cycle_us else None,
        "checkpoints_per_s_pause_plus_run": round((epochs_timed - 1) / steady_s, 1)
        if epochs_timed > 1 and steady_s else None,
        "checkpoints_per_s_overall": round(primary.epoch / elapsed, 1) if elapsed else None,
        "pause_ms": summary([v / 1e3 for v in log.pause_us[1:]], 4),
        "dirty_pages": summary(dirty_steady, 1),
        "bound_exceeded": sum(1 for n in dirty_steady if n > cfg.max_dirty),
        "runs_per_epoch": summary(log.runs[steady], 1),
        "time_us": {  # where an epoch's time goes (steady epochs)
            "run_until_rpc": summary(log.run_us[1:], 1),
            "harvest": summary(log.harvest_us[steady], 1),
            "collect": summary(log.collect_us[steady], 1),
            "send": summary(log.send_us[steady], 1),
            "ack": summary(log.ack_us[steady], 1),
        },
        "commit_latency_ms": summary(log.commit_ms[1:], 4),
        "first_epoch": {"dirty_pages": log.dirty_pages[0] if log.dirty_pages else None,
                        "pause_ms": round(log.pause_us[0] / 1e3, 4) if log.pause_us else None},
        "initial_sync": sync,
        "interval_pauses": runner.interval_pauses if runner is not None else 0,
        "unacked_at_resume": {"max": max(log.unacked, default=None), "count": len(log.unacked)},
        "bytes_sent": primary.bytes_sent,
    }
