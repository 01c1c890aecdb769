"""Migration figures: latency statistics, the power-of-two histogram, and the report
contract of DESIGN.md ("What every report carries")."""
from __future__ import annotations

import json
import time
from typing import Iterable

PAGE_CAUSES = ("precopy", "resent", "demand", "pushed", "zero")


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, int(round(fraction * len(sorted_values) + 0.5)) - 1))
    return sorted_values[rank]


def latency_summary(latencies_us: Iterable[float]) -> dict:
    """p50/p99/max and count of fault latencies in microseconds."""
    values = sorted(latencies_us)
    return {
        "count": len(values),
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
        "max": values[-1] if values else None,
    }


def pow2_histogram(latencies_us: Iterable[float]) -> list[dict]:
    """Histogram in power-of-two microsecond buckets, as QEMU's postcopy-latency-dist:
    bucket k counts latencies in [2^k, 2^(k+1)) µs (bucket 0 also takes < 1 µs)."""
    counts: dict[int, int] = {}
    for value in latencies_us:
        bucket = max(0, int(value).bit_length() - 1)
        counts[bucket] = counts.get(bucket, 0) + 1
    if not counts:
        return []
    return [
        {"from_us": 0 if k == 0 else 1 << k, "to_us": 1 << (k + 1), "count": counts.get(k, 0)}
        for k in range(0, max(counts) + 1)
    ]


def format_histogram(buckets: list[dict], width: int = 40) -> str:
    """Text bars for a terminal."""
    if not buckets:
        return "  (no faults)"
    peak = max(b["count"] for b in buckets) or 1
    lines = []
    for b in buckets:
        bar = "#" * max(1 if b["count"] else 0, round(width * b["count"] / peak))
        lines.append(f"  {b['from_us']:>7}-{b['to_us']:<7} µs {b['count']:>8} {bar}")
    return "\n".join(lines)


def build_report(*, mode: str, dirty_log: str, ram_bytes: int, workload: str, source: dict,
                 dest: dict, final_hash: str | None, reference_hash: str | None,
                 guest: dict | None = None) -> dict:
    """Merge the two agents' figures into the report of DESIGN.md. ``guest_view`` is the
    guest's own view of the move (from the destination): its first step after the
    resume there and the longest gap between two steps of any vCPU after the
    switchover (the worst stall it felt). ``guest`` (when known): the guest's full
    parameter set and the ``postcopy guest`` command line that reproduces the reference."""
    pages = {cause: dest.get("pages", {}).get(cause, 0) for cause in PAGE_CAUSES}
    return {
        "mode": mode,
        "dirty_log": dirty_log,
        "ram_bytes": ram_bytes,
        "workload": workload,
        "downtime_ms": dest.get("downtime_ms"),
        "downtime_breakdown": downtime_breakdown({**(source.get("switchover_marks_ns") or {}),
                                                  **((dest.get("timeline") or {}).get("marks_ns") or {})}),
        "total_ms": source.get("total_ms"),
        "precopy_rounds": source.get("rounds", []),
        "bytes_sent": source.get("bytes_sent"),
        "pages": pages,
        "fault_latency_us": dest.get("fault_latency_us"),
        "fault_latency_histogram": dest.get("fault_latency_histogram", []),
        "blocktime_ms": dest.get("blocktime_ms"),
        "guest_view": {"first_step_ms": dest.get("first_step_ms"), "max_step_gap_ms": dest.get("max_step_gap_ms")},
        "guest": guest,
        "pages_skipped_free": source.get("pages_skipped_free", 0),
        "timeline": dest.get("timeline"),
        "final_hash": final_hash,
        "reference_hash": reference_hash,
        # None: nothing to compare (an agent alone knows neither hash).
        "verified": final_hash == reference_hash if final_hash and reference_hash else None,
        "source": source,
        "dest": {k: v for k, v in dest.items() if k not in ("fault_latency_histogram", "timeline")},
    }


# The switchover's steps in the order they happen, each with what the time up to it went
# on; the downtime is last_step -> first_step (DESIGN.md). Marks are CLOCK_MONOTONIC ns
# (one clock on one host; both agents and both guests read it).
DOWNTIME_STEPS = (
    ("last_step", None),
    ("pause_asked", "source: until it asks the guest to pause"),
    ("parked", "source guest: fence set, vCPUs park"),
    ("pause_replied", "source: pause reply read"),
    ("final_harvest", "source: final dirty-log harvest"),
    ("final_send", "source: final pages (or their discard list) sent"),
    ("state_sent", "source: state page sent"),
    ("switchover_sent", "source: Switchover sent"),
    ("switchover_read", "destination: Switchover read"),
    ("switched", "destination: page table switched"),
    ("resume_received", "incoming guest: resume (and watchdog) request read"),
    ("start", "incoming guest: its start begins (in a thread if the state page is not in yet)"),
    ("state_loaded", "incoming guest: state page read"),
    ("vcpus_ready", "incoming guest: vCPU threads ready"),
    ("released", "incoming guest: vCPUs released"),
    ("first_step", "incoming guest: first step done (its first faults)"),
)


def downtime_breakdown(marks: dict[str, int]) -> dict | None:
    """Where the downtime went: the marks of :data:`DOWNTIME_STEPS` between the source
    guest's last step and the incoming guest's first, in the order they happened (steps
    overlap: vCPU threads made running are released before they are ready), each with
    the ms since the previous one; and every mark (also those off the path, such as the
    source's demand server being ready) in ms since the last step."""
    start, end = marks.get("last_step"), marks.get("first_step")
    if start is None or end is None:
        return None
    order = {name: i for i, (name, _) in enumerate(DOWNTIME_STEPS)}
    labels = dict(DOWNTIME_STEPS)
    path = sorted((t, order[name], name) for name, t in marks.items()
                  if name in order and t is not None and start <= t <= end and name != "last_step")
    steps, previous = [], start
    for t, _, name in path:
        steps.append({"step": name, "what": labels[name], "ms": (t - previous) / 1e6})
        previous = t
    return {"total_ms": (end - start) / 1e6, "steps": steps,
            "marks_ms": {name: (t - start) / 1e6 for name, t in sorted(marks.items(), key=lambda kv: kv[1])
                         if t is not None}}


def format_breakdown(breakdown: dict | None, indent: str = "  ") -> str:
    """One line per step of the downtime."""
    if not breakdown:
        return f"{indent}(no breakdown)"
    lines = [f"{indent}{step['ms']:8.3f} ms  {step['what']}" for step in breakdown["steps"]]
    on_path = {step["step"] for step in breakdown["steps"]} | {"last_step"}
    off_path = {k: v for k, v in breakdown["marks_ms"].items() if k not in on_path}
    if off_path:
        lines.append(f"{indent}off the path (ms after the last step): "
                     + "  ".join(f"{k} {v:.3f}" for k, v in off_path.items()))
    return "\n".join(lines)


_VERDICT = {True: "VERIFIED", False: "MISMATCH", None: "not verified (no reference hash here)"}


def source_report(figures: dict) -> dict:
    """The report of DESIGN.md as ``postcopy source --json`` writes it: the same shape
    as the demo's, from the source's figures and the destination's (its Complete
    message); the hashes are the demo's to compare, so ``verified`` is None here."""
    guest = figures.get("guest", {})
    return build_report(mode=figures["mode"], dirty_log=figures.get("dirty_log", "none"),
                        ram_bytes=guest.get("ram_size"), workload=guest.get("workload"), source=figures,
                        dest=figures.get("dest", {}), final_hash=None, reference_hash=None)


def format_summary(report: dict) -> str:
    """Human summary of a report."""
    lat = report.get("fault_latency_us") or {}
    view = report.get("guest_view") or {}
    pages = report["pages"]

    def fmt(value, unit="", digits=1):
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    lines = [
        f"mode {report['mode']}  dirty log {report['dirty_log']}  RAM {report['ram_bytes'] >> 20} MiB"
        f"  workload {report['workload']}",
        f"downtime {fmt(report['downtime_ms'], ' ms', 2)}  total {fmt(report['total_ms'], ' ms')}"
        f"  sent {(report['bytes_sent'] or 0) / 2**20:.1f} MiB",
        "downtime breakdown:",
        format_breakdown(report.get("downtime_breakdown")),
        "pages: " + "  ".join(f"{cause} {pages[cause]}" for cause in PAGE_CAUSES),
        _install_line(report.get("dest") or {}),
        f"guest view: first step {fmt(view.get('first_step_ms'), ' ms', 2)} after resume, longest step gap "
        f"after the switchover {fmt(view.get('max_step_gap_ms'), ' ms', 2)}",
        f"faults {lat.get('count', 0)}: p50 {fmt(lat.get('p50'), ' µs')}  p99 {fmt(lat.get('p99'), ' µs')}"
        f"  max {fmt(lat.get('max'), ' µs')}  blocktime {fmt(report['blocktime_ms'], ' ms', 2)}",
        "fault latency histogram:",
        format_histogram(report.get("fault_latency_histogram", [])),
        f"final hash {report['final_hash']}  reference {report['reference_hash']}"
        f"  -> {_VERDICT[report['verified']]}",
    ]
    if (report.get("guest") or {}).get("reference_command"):
        lines.append(f"reference: {report['guest']['reference_command']}")
    return "\n".join(lines)


def _install_line(dest: dict) -> str:
    """How the destination installed pages, the push rate, and its RAM allocated first."""
    push = dest.get("push_bytes_per_s")
    line = f"install {dest.get('install', 'n/a')}  push {'n/a' if push is None else f'{push / 1e9:.2f} GB/s'}"
    if dest.get("prealloc_ms") is not None:
        line += f"  (RAM allocated first, before the pause: {dest['prealloc_ms']:.0f} ms)"
    return line


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


class Timeline:
    """Pages installed on the destination per time bucket, by cause (for the report's
    timeline and its picture). Not thread-safe: callers hold their own lock."""

    def __init__(self, bucket_ms: float = 10.0, start_ns: int | None = None):
        self.bucket_ns = int(bucket_ms * 1e6)
        self.start_ns = start_ns if start_ns is not None else time.monotonic_ns()
        self.series: dict[str, list[int]] = {cause: [] for cause in PAGE_CAUSES}
        self.switchover_ns: int | None = None
        self.marks: dict[str, int] = {}  # the destination's steps of the switchover (monotonic ns)

    def mark(self, name: str) -> None:
        """Note when a step of the switchover ended (see :func:`downtime_breakdown`)."""
        self.marks[name] = time.monotonic_ns()

    def add(self, cause: str, pages: int, now_ns: int | None = None) -> None:
        bucket = max(0, ((now_ns or time.monotonic_ns()) - self.start_ns) // self.bucket_ns)
        series = self.series[cause]
        if len(series) <= bucket:
            for values in self.series.values():
                values.extend([0] * (bucket + 1 - len(values)))
        series[bucket] += pages

    def as_dict(self) -> dict:
        return {
            "bucket_ms": self.bucket_ns / 1e6,
            "start_ns": self.start_ns,
            "installed": self.series,
            "switchover_ms": None if self.switchover_ns is None else (self.switchover_ns - self.start_ns) / 1e6,
            "marks_ns": dict(self.marks),
        }
