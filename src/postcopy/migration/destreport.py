"""The destination's figures of one migration, from what its receive loop saw: fault
latencies (before and during the push), pages by cause, push rate, downtime and the
guest's own view after the switchover."""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from postcopy import report
from postcopy.kernel.meminfo import peak_rss_kib


@dataclass
class ReceiveFacts:
    """What the receive loop knows once every page is in."""

    table: object  # the PageTable: pages, faults, removed_by_guest
    timeline: object  # report timeline: switchover_ns, as_dict()
    install: str  # the install path's name
    page_size: int
    started: float  # time.monotonic() when receiving began
    all_in: float  # time.monotonic() when every page was in
    first_push_ns: int | None  # the pusher's first run (monotonic ns)
    switchover: dict | None  # the Switchover frame's information
    resumed: dict | None  # the guest's resume reply here
    first_step_ns: int | None
    max_gap_ns: int | None
    recoveries_ms: list
    frames_in_c: dict  # per channel: data frames received and installed in C (copy, continue)
    prealloc_ms: float | None = None  # --prealloc: populating the guest's RAM took this long (before the pause)


def receive_figures(f: ReceiveFacts) -> dict:
    """The destination's report (also sent to the source in Complete)."""
    faults = f.table.faults
    f.table.sync_timeline()
    ns, latencies = faults.ns, faults.us  # compact arrays: no Python object per fault
    push_from = f.first_push_ns or time.monotonic_ns()
    downtime_ms = None
    if f.switchover and f.first_step_ns:
        downtime_ms = (f.first_step_ns - f.switchover["last_heartbeat_ns"]) / 1e6
    pushed_bytes = f.table.pages["pushed"] * f.page_size
    push_seconds = (f.all_in - push_from / 1e9) if f.first_push_ns else None
    resumed_ns = f.resumed and f.resumed.get("resumed_ns")
    return {
        "install": f.install,
        # Faults served before the pusher's first run arrived, and while it ran.
        "fault_latency_us_before_push": report.latency_summary(us for t, us in zip(ns, latencies) if t < push_from),
        "fault_latency_us_during_push": report.latency_summary(us for t, us in zip(ns, latencies) if t >= push_from),
        "push_bytes_per_s": pushed_bytes / push_seconds if push_seconds else None,
        "pages": dict(f.table.pages),
        "fault_latency_us": report.latency_summary(latencies),
        "fault_latency_histogram": report.pow2_histogram(latencies),
        "blocktime_ms": sum(latencies) / 1e3,
        # Demand faults in the first second after the switchover: hybrid's stale-set
        # storm shows here (compare with postcopy at the same dirty rate).
        "faults_first_second": faults_within(faults, f.timeline.switchover_ns, 1_000_000_000),
        "downtime_ms": downtime_ms,
        "resumed_ns": resumed_ns,
        "first_step_ns": f.first_step_ns,
        # The guest's own view: resume -> its first step, and the longest gap between
        # two steps of any vCPU here (fault stalls; None if it finished and left
        # first: then its last output line gives it, see DestinationAgent.run()).
        "first_step_ms": (f.first_step_ns - resumed_ns) / 1e6 if f.first_step_ns and resumed_ns else None,
        "max_step_gap_ms": f.max_gap_ns / 1e6 if f.max_gap_ns is not None else None,
        # Inside the downtime: the faults read between the resume and the first step.
        "faults_before_first_step_us": [round(us, 1) for t, us in zip(ns, latencies)
                                        if resumed_ns and f.first_step_ns and resumed_ns <= t < f.first_step_ns],
        "receive_ms": (f.all_in - f.started) * 1e3,
        "timeline": f.timeline.as_dict(),
        "pages_removed_by_guest": f.table.removed_by_guest,
        "recoveries_ms": f.recoveries_ms,
        "data_frames_received_in_c": f.frames_in_c,
        # With --prealloc this counts the guest's RAM, mapped here to receive in place.
        "max_rss_kib": peak_rss_kib(),
        "prealloc_ms": f.prealloc_ms,
    }


def faults_within(fault_times: Iterable[tuple[int, float]], start_ns: int | None, window_ns: int) -> int | None:
    """How many faults were read within ``window_ns`` after ``start_ns``."""
    if start_ns is None:
        return None
    return sum(1 for t, _ in fault_times if start_ns <= t < start_ns + window_ns)


def first_step_ns(guest, timeline) -> int | None:
    """When the resumed guest completed its first step here (polls it briefly); its
    start's steps go into the timeline's marks. None if it already finished and left."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = guest.status()
        except Exception:
            return None
        value = status.get("first_step_after_resume_ns")
        if value:
            timeline.marks.update(status.get("incoming_start_ns") or {}, resume_received=status.get("resumed_ns"),
                                  first_step=value)
            return value
        time.sleep(0.001)
    return None


def max_step_gap_ns(guest) -> int | None:
    """The longest gap between two steps of any vCPU of the guest here (None if it
    already finished and left: then its last output line says it)."""
    try:
        return guest.max_step_gap_ns()
    except Exception:
        return None
