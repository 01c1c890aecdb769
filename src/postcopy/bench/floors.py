"""How a floor is summarised: the calmest stretch of its samples, so that a burst of
someone else's load on a shared host cannot raise a floor (and so flatter the ratios
taken against it)."""
from __future__ import annotations

from postcopy import report

# A floor is what the machine can do, so each latency floor is taken over the calmest
# of this many consecutive stretches of its samples, and the bulk floor is the best of
# this many transfers: on a host shared with other work, a burst of someone else's load
# must not raise the floor and so flatter the ratios taken against it.
STRETCHES = 5


def floor_summary(samples_us: list[float], stretches: int = STRETCHES) -> dict:
    """Latency summary of a floor: count, and p50/p99/max each the lowest over
    ``stretches`` consecutive stretches of the samples; "all" summarises them all."""
    size = max(1, len(samples_us) // stretches)
    parts = [report.latency_summary(samples_us[i:i + size]) for i in range(0, len(samples_us) - size + 1, size)]
    best = {p: min(part[p] for part in parts) for p in ("p50", "p99", "max")}
    return {"count": len(samples_us), **best, "stretches": len(parts), "all": report.latency_summary(samples_us)}
