"""The figures of a ``postcopy bench`` result."""
from __future__ import annotations

from postcopy.svg.bars import bar_chart, grouped_bar_chart
from postcopy.svg.document import _PANEL_W, FIGURE_WIDTH, document
from postcopy.svg.lines import line_chart
from postcopy.svg.primitives import DASHES, MARKERS, PALETTE, Style
from postcopy.svg.ticks import format_size

_BENCH_H = 520


def _harvest_figures(rows: list[dict]) -> dict[str, str]:
    rows = [r for r in rows if isinstance(r, dict) and r.get("backend")]
    if not rows:
        return {}
    kernels = sorted({str(r.get("kernel", "")) for r in rows})
    backends = sorted({(str(r["backend"]), str(r.get("kernel", ""))) for r in rows})
    rams = sorted({int(r.get("ram_bytes") or 0) for r in rows})

    def backend_label(b: tuple[str, str]) -> str:
        return f"{b[0]} ({b[1]})" if len(kernels) > 1 else b[0]

    figures: dict[str, str] = {}
    series, styles = [], []
    for bi, b in enumerate(backends):
        for ri, ram in enumerate(rams):
            pts = [(r.get("dirty_pages"), r.get("harvest_ms")) for r in rows
                   if (str(r["backend"]), str(r.get("kernel", ""))) == b and int(r.get("ram_bytes") or 0) == ram]
            if pts:
                series.append((f"{backend_label(b)}, {format_size(ram)}", pts))
                styles.append(Style(PALETTE[bi % len(PALETTE)], MARKERS[ri % len(MARKERS)], DASHES[ri % len(DASHES)]))
    kernel_note = f"kernel {kernels[0]}" if len(kernels) == 1 and kernels[0] else None
    figures["harvest-vs-dirty"] = document(FIGURE_WIDTH, _BENCH_H, [line_chart(
        series, x=20, y=14, width=_PANEL_W, height=_BENCH_H - 24, title="Dirty-log harvest time vs dirty pages",
        subtitle=kernel_note, x_label="dirty pages in the harvest", y_label="harvest time (ms)",
        x_log=True, y_log=True, styles=styles)], title="harvest time vs dirty pages")
    stall_series = []
    for ram in rams:
        vals = []
        for b in backends:
            gaps = [r.get("worst_gap_ms") for r in rows if (str(r["backend"]), str(r.get("kernel", ""))) == b
                    and int(r.get("ram_bytes") or 0) == ram and r.get("worst_gap_ms") is not None]
            vals.append(max(gaps) if gaps else None)
        stall_series.append((format_size(ram), vals))
    if any(v is not None for _, vals in stall_series for v in vals):
        figures["harvest-stall"] = document(FIGURE_WIDTH, _BENCH_H, [grouped_bar_chart(
            [backend_label(b) for b in backends], stall_series, x=20, y=14, width=_PANEL_W, height=_BENCH_H - 24,
            title="Guest stall during harvest", subtitle="worst step gap, max over dirty-set sizes",
            x_label="dirty-log backend", y_label="worst guest step gap (ms)", y_log=None, value_labels=True,
            legend=True)], title="guest stall during harvest")
    return figures


def _latency_figure(result: dict) -> str | None:
    base = result.get("baselines") or {}
    post = result.get("postcopy") or {}
    rows = [("TCP 4 KiB RTT", base.get("tcp_rtt_4k_us")), ("uffd round trip", base.get("uffd_roundtrip_us")),
            ("fault, no pusher", post.get("fault_us_without_pusher")),
            ("fault, pusher on", post.get("fault_us_with_pusher"))]
    rows = [(name, s) for name, s in rows if isinstance(s, dict) and (s.get("p50") or s.get("p99"))]
    if not rows:
        return None
    cats = [name for name, _ in rows]
    series = [(p, [s.get(p) for _, s in rows]) for p in ("p50", "p99")]
    return document(FIGURE_WIDTH, _BENCH_H, [grouped_bar_chart(
        cats, series, x=20, y=14, width=_PANEL_W, height=_BENCH_H - 24,
        title="Demand-fault latency vs same-run baselines", subtitle=_kernel_note(result),
        x_label="", y_label="latency (µs)", y_log=None, value_labels=True, legend=True)],
        title="fault latency vs baselines")


def _throughput_figure(result: dict) -> str | None:
    base = result.get("baselines") or {}
    post = result.get("postcopy") or {}
    bars = [("raw TCP bulk", base.get("tcp_bulk_bytes_per_s")), ("postcopy pusher", post.get("push_bytes_per_s"))]
    bars = [(name, v / 1e9) for name, v in bars if isinstance(v, (int, float)) and v > 0]
    if not bars:
        return None
    return document(FIGURE_WIDTH, 420, [bar_chart(
        bars, x=20, y=14, width=_PANEL_W, height=396, title="Bulk throughput over the same veth",
        subtitle=_kernel_note(result), y_label="throughput (GB/s)", value_labels=True,
        value_format=lambda v: f"{v:.2f}")], title="throughput vs raw TCP")


def _kernel_note(result: dict) -> str | None:
    if not result.get("kernel"):
        return None
    cpus = f", {result['cpus']} CPUs" if result.get("cpus") else ""
    return f"kernel {result['kernel']}{cpus}"


def bench_figures(result: dict | None) -> dict[str, str]:
    """SVG documents for a ``postcopy bench`` result, by file stem: "harvest-vs-dirty"
    and "harvest-stall" (from result["harvest"] rows), "fault-latency" (baselines and
    postcopy p50/p99), "throughput" (push vs raw TCP). Figures without data are left out."""
    result = result or {}
    figures = _harvest_figures(list(result.get("harvest") or []))
    latency = _latency_figure(result)
    if latency:
        figures["fault-latency"] = latency
    throughput = _throughput_figure(result)
    if throughput:
        figures["throughput"] = throughput
    return figures
