"""Bar charts: grouped bars, single bars and histograms."""
from __future__ import annotations

from typing import Callable, Sequence
from xml.sax.saxutils import escape

from postcopy.svg.axes import _make_axis, _Scale, auto_log
from postcopy.svg.panel import _note, _panel, _thin, _wrap
from postcopy.svg.primitives import _INK, _MUTED, _TICK_SIZE, PALETTE, Style, _el, _finite, _text, text_width
from postcopy.svg.ticks import format_number, format_value

def grouped_bar_chart(categories: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]], *,
                      x: float = 0, y: float = 0, width: float = 860, height: float = 400, title: str = "",
                      subtitle: str | None = None, x_label: str = "", y_label: str = "",
                      y_log: bool | None = False, colors: Sequence[str] | None = None,
                      value_labels: bool = False, value_format: Callable[[float], str] | None = None,
                      edge_labels: Sequence[str] | None = None, legend: bool | None = None,
                      bar_titles: Sequence[Sequence[str | None]] | None = None,
                      empty_note: str = "no data") -> str:
    """Bars per category, one per series side by side; ``series`` is (label, one value
    per category). A bar is drawn only for a value > 0 (``rect`` class ``bar``), so a log
    axis works and empty buckets leave no mark. ``y_log`` None chooses log when values
    span more than 100x. ``edge_labels`` (len(categories) + 1) labels the boundaries
    between bars instead of their centres, as a histogram wants. ``value_labels`` prints
    each value above its bar where it fits."""
    colors = list(colors) if colors else list(PALETTE)
    series = [(label, [_finite(v) for v in vals]) for label, vals in series]
    values = [v for _, vals in series for v in vals if v is not None]
    if y_log is None:
        y_log = auto_log(values)
    # Value labels need headroom above the tallest bar.
    headroom = ([max(values) * (1.5 if y_log else 1.1)] if value_labels and values and max(values) > 0 else [])
    yaxis = _make_axis(values + headroom, y_log, include_zero=True)
    if not y_log and yaxis.hi <= 0:
        yaxis = _make_axis([1.0], False, include_zero=True)
    show_legend = len(series) > 1 if legend is None else legend
    legend_entries = [(label, Style(colors[i % len(colors)]), "swatch") for i, (label, _) in enumerate(series)] \
        if show_legend else []
    frame, back, front = _panel(x, y, width, height, title=title, subtitle=subtitle, legend=legend_entries,
                                xaxis=None, yaxis=yaxis, x_label=x_label, y_label=y_label)
    ys = _Scale(yaxis.lo, yaxis.hi, frame.bottom, frame.top, y_log)
    n = max(1, len(categories))
    band = frame.width / n
    inner = band * (0.9 if edge_labels is not None else 0.75)
    bar_w = inner / max(1, len(series))
    fmt = value_format or format_value
    data: list[str] = []
    for ci, cat in enumerate(categories):
        for si, (label, vals) in enumerate(series):
            v = vals[ci] if ci < len(vals) else None
            if v is None or v <= 0:
                if value_labels:  # tell a missing value from a zero one
                    bx = frame.left + ci * band + (band - inner) / 2 + (si + 0.5) * bar_w
                    data.append(_text(bx, frame.bottom - 4, "n/a" if v is None else "0", size=10,
                                      anchor="middle", fill=_MUTED, class_="value-label"))
                continue
            bx = frame.left + ci * band + (band - inner) / 2 + si * bar_w
            top = max(frame.top, ys(v))
            tip = bar_titles[si][ci] if bar_titles and bar_titles[si][ci] else f"{cat}: {label} {fmt(v)}"
            data.append(_el("rect", _el("title", escape(tip)), x=bx, y=top, width=max(bar_w - 1, 1.0),
                            height=frame.bottom - top, fill=colors[si % len(colors)], class_="bar",
                            data_series=label, data_category=cat, data_value=repr(float(v))))
            if value_labels:
                text = fmt(v)
                if text_width(text, 10) <= bar_w + 4:
                    data.append(_text(bx + bar_w / 2, top - 4, text, size=10, anchor="middle", class_="value-label"))
    # Category (or edge) labels along the x axis, thinned until they do not overlap.
    if edge_labels is not None:
        ticks = [(frame.left + i * band, lab) for i, lab in enumerate(edge_labels)]
    else:
        ticks = [(frame.left + (i + 0.5) * band, cat) for i, cat in enumerate(categories)]
    for px, lab in _thin(ticks, lambda v: v):
        front.append(_el("line", x1=px, y1=frame.bottom, x2=px, y2=frame.bottom + 4, stroke=_INK))
        front.append(_text(px, frame.bottom + 18, lab, size=_TICK_SIZE, anchor="middle", class_="tick-label"))
    if not any('class="bar"' in d for d in data):
        data.append(_note(frame, empty_note))
    return _wrap(x, y, back + data + front, "panel bar-chart")


def bar_chart(bars: Sequence[tuple[str, float | None]], *, color: str = PALETTE[0], y_log: bool | None = False,
              **kwargs) -> str:
    """One bar per (label, value); keywords as ``grouped_bar_chart`` (``y_log`` None:
    log when the values span more than 100x)."""
    return grouped_bar_chart([label for label, _ in bars], [("", [v for _, v in bars])], colors=[color],
                             y_log=y_log, legend=False, **kwargs)


def histogram_chart(buckets: Sequence[tuple[float, float, int]], *, y_log: bool | None = None,
                    color: str = PALETTE[0], **kwargs) -> str:
    """Histogram of (from, to, count) buckets in order, adjacent bars with their
    boundaries labelled (power-of-two latency buckets: 0, 2, 4, 8 ...). One ``rect`` per
    non-empty bucket."""
    def edge(v: float) -> str:  # exact bucket bounds read better than 16.4k
        return f"{v:.0f}" if float(v).is_integer() else format_number(v)

    cats = [f"{edge(lo)}-{edge(hi)}" for lo, hi, _ in buckets]
    edges = [edge(buckets[0][0])] + [edge(hi) for _, hi, _ in buckets] if buckets else None
    titles = [[f"{c}: {n} faults" for c, (_, _, n) in zip(cats, buckets)]]
    return grouped_bar_chart(cats, [("count", [n for _, _, n in buckets])], colors=[color], y_log=y_log,
                             edge_labels=edges, legend=False, bar_titles=titles, **kwargs)
