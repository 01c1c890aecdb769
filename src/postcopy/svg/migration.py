"""The figure of one migration report (``postcopy demo --json``)."""
from __future__ import annotations

import math

from postcopy.report import PAGE_CAUSES
from postcopy.svg.bars import grouped_bar_chart, histogram_chart
from postcopy.svg.axes import auto_log
from postcopy.svg.document import _PANEL_W, FIGURE_WIDTH, document
from postcopy.svg.lines import cumulative, stacked_area_chart
from postcopy.svg.panel import note_panel
from postcopy.svg.primitives import _MUTED, CAUSE_COLOURS, MAX_TIMELINE_POINTS, PALETTE, Series, _text
from postcopy.svg.ticks import format_number, format_size

def _fmt(value, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _timeline(report: dict) -> dict | None:
    timeline = report.get("timeline")
    if timeline is None:  # older reports kept it with the destination's figures
        timeline = (report.get("dest") or {}).get("timeline")
    return timeline if isinstance(timeline, dict) else None


def timeline_series(timeline: dict | None, max_points: int = MAX_TIMELINE_POINTS) -> tuple[list[Series], str]:
    """Cumulative pages per cause as series over time, starting at (0, 0) and one point
    at the end of each bucket (sampled to at most ``max_points`` + 1 points; a sample of
    a running total is exact). Causes with no pages are left out. Returns the series and
    the time unit ("ms" or "s")."""
    if not timeline:
        return [], "ms"
    installed = timeline.get("installed") or {}
    bucket_ms = float(timeline.get("bucket_ms") or 10.0)
    n = max((len(v) for v in installed.values() if v), default=0)
    if n == 0:
        return [], "ms"
    unit, scale = ("s", 1e-3) if n * bucket_ms > 10_000 else ("ms", 1.0)
    stride = max(1, math.ceil(n / max_points))
    idx = list(range(stride - 1, n, stride))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    times = [0.0] + [(i + 1) * bucket_ms * scale for i in idx]
    causes = list(PAGE_CAUSES) + sorted(set(installed) - set(PAGE_CAUSES))
    out: list[Series] = []
    for cause in causes:
        counts = list(installed.get(cause) or [])
        if not any(counts):
            continue
        counts += [0] * (n - len(counts))
        totals = cumulative(counts)
        out.append((cause, list(zip(times, [0.0] + [totals[i] for i in idx]))))
    return out, unit


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _header(report: dict) -> list[str]:
    verified = report.get("verified")
    ram = report.get("ram_bytes")
    facts = [
        f"RAM {format_size(ram) if isinstance(ram, (int, float)) else 'n/a'}",
        f"workload {_clip(str(report.get('workload') or 'n/a'), 48)}",
    ]
    if report.get("dirty_log"):
        facts.append(f"dirty log {report['dirty_log']}")
    facts += [f"downtime {_fmt(report.get('downtime_ms'), ' ms', 2)}"]
    if report.get("total_ms") is not None:
        facts.append(f"total {_fmt(report.get('total_ms'), ' ms', 0)}")
    verdict = {True: ("verified", PALETTE[2]), False: ("NOT VERIFIED (RAM hash mismatch)", PALETTE[3])}.get(
        verified, ("verification n/a", _MUTED))
    line2 = "   ·   ".join(facts)
    return [
        _text(20, 28, f"postcopy migration: {report.get('mode') or 'unknown mode'}", size=19, weight="bold",
              class_="header"),
        _text(20, 52, line2, size=13, class_="header-facts"),
        _text(FIGURE_WIDTH - 20, 28, verdict[0], size=14, weight="bold", anchor="end", fill=verdict[1],
              class_="verdict"),
    ]


def migration_figure(report: dict | None) -> str:
    """One SVG document for a migration report: a header line (mode, RAM, workload,
    downtime, verified) and three panels: (a) pages on the destination over time,
    stacked by cause, with the switchover marked; (b) dirty and sent pages per precopy
    round; (c) the fault latency histogram. Missing parts become a "no data" note."""
    report = report or {}
    parts = _header(report)
    top, gap = 70, 16
    heights = (340, 270, 270)

    # (a) timeline
    timeline = _timeline(report)
    series, unit = timeline_series(timeline)
    title_a = "(a) pages on the destination, cumulative by cause"
    if not series:
        parts.append(note_panel("no timeline in this report" if timeline is None else "no pages installed",
                                x=20, y=top, width=_PANEL_W, height=heights[0], title=title_a))
    else:
        colors = [CAUSE_COLOURS.get(label, PALETTE[(i + 4) % len(PALETTE)]) for i, (label, _) in enumerate(series)]
        labelled = [(f"{label} {int(pts[-1][1]):,}", pts) for label, pts in series]
        switch = timeline.get("switchover_ms")
        vlines = []
        if isinstance(switch, (int, float)):
            when = f"{switch / 1e3:.2f} s" if unit == "s" else f"{switch:.0f} ms"
            vlines.append((switch * (1e-3 if unit == "s" else 1.0), f"switchover {when}"))
        total = sum(pts[-1][1] for _, pts in series)
        ram, page = report.get("ram_bytes"), report.get("page_size") or 4096
        hlines = [(ram / page, f"all of RAM: {int(ram // page):,} pages")] \
            if isinstance(ram, (int, float)) and ram > 0 else []
        sub = f"{int(total):,} pages installed, {float(timeline.get('bucket_ms') or 10):g} ms buckets"
        parts.append(stacked_area_chart(labelled, x=20, y=top, width=_PANEL_W, height=heights[0], title=title_a,
                                        subtitle=sub, x_label=f"time since migration start ({unit})",
                                        y_label="pages (cumulative)", colors=colors, vlines=vlines,
                                        hlines=hlines))
    # (b) precopy rounds
    y_b = top + heights[0] + gap
    rounds = [r for r in (report.get("precopy_rounds") or []) if isinstance(r, dict)]
    dirty = [r.get("dirty_pages") for r in rounds]
    sent = [r.get("sent_pages") for r in rounds]
    if not any(v for v in dirty + sent if isinstance(v, (int, float)) and v > 0):
        note = ("no precopy rounds (pure postcopy)" if report.get("mode") == "postcopy" else "no precopy rounds") \
            if not rounds else f"{len(rounds)} precopy round{'s' * (len(rounds) != 1)}, no pages dirty or sent"
        parts.append(note_panel(note, x=20, y=y_b, width=_PANEL_W, height=heights[1], title="(b) precopy rounds"))
    else:
        cats = [str(r.get("round", i)) for i, r in enumerate(rounds)]
        harvest = sum(r.get("harvest_ms") or 0 for r in rounds)
        parts.append(grouped_bar_chart(
            cats, [("dirty pages", dirty), ("sent pages", sent)], x=20, y=y_b, width=_PANEL_W, height=heights[1],
            title="(b) precopy rounds",
            subtitle=f"{len(rounds)} round{'s' * (len(rounds) != 1)}, harvest {harvest:.1f} ms in all"
                     " (round 0: every populated page)",
            x_label="precopy round", y_label="pages", y_log=auto_log(dirty + sent, 10.0),
            colors=[PALETTE[0], PALETTE[1]], value_labels=True, value_format=format_number))
    # (c) fault latency histogram
    y_c = y_b + heights[1] + gap
    hist = [b for b in (report.get("fault_latency_histogram") or []) if isinstance(b, dict)]
    lat = report.get("fault_latency_us") or {}
    sub_c = (f"{lat.get('count', 0):,} faults: p50 {_fmt(lat.get('p50'), ' µs')}, p99 {_fmt(lat.get('p99'), ' µs')},"
             f" max {_fmt(lat.get('max'), ' µs')}") if lat else None
    if not any(b.get("count") for b in hist):
        parts.append(note_panel("no faults recorded", x=20, y=y_c, width=_PANEL_W, height=heights[2],
                                title="(c) fault latency (fault read to wake)"))
    else:
        parts.append(histogram_chart([(b.get("from_us", 0), b.get("to_us", 0), b.get("count") or 0) for b in hist],
                                     x=20, y=y_c, width=_PANEL_W, height=heights[2],
                                     title="(c) fault latency (fault read to wake)", subtitle=sub_c,
                                     x_label="latency (µs, power-of-two buckets)", y_label="faults",
                                     color=PALETTE[3]))
    height = y_c + heights[2] + 14
    title = f"postcopy migration: {report.get('mode') or 'unknown mode'}, workload {report.get('workload') or 'n/a'}"
    return document(FIGURE_WIDTH, height, parts, title=title)
