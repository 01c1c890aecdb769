"""Report pictures as SVG 1.1, written with the standard library only.

Chart primitives (``line_chart``, ``stacked_area_chart``, ``bar_chart``,
``grouped_bar_chart``, ``histogram_chart``) each return one ``<g>`` fragment placed at
(x, y) with its own title, legend, axes, round-number ticks and axis labels; ``document``
wraps fragments into a standalone SVG. On top of them: ``migration_figure`` (one report
of ``postcopy demo --json``) and ``bench_figures`` (the result of ``postcopy bench``).

A series is ``(label, [(x, y), ...])``. Colours are the Okabe-Ito palette (safe for the
common colour-vision deficiencies); line series also differ by marker and dash so they
stay apart in greyscale. Drawn elements carry a ``class`` (``area``, ``area-edge``,
``line``, ``bar``, ``legend``, ``note``...) and data attributes in the namespace ``NS``
(``pc:series``, ``pc:points``, ``pc:value``...) so tests and scripts can find what was
drawn; ``document`` declares that namespace, so embed fragments through it. All text is
escaped; nothing external is referenced.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

from postcopy.report import PAGE_CAUSES
from postcopy.units import format_bytes

NS = "urn:x-postcopy:svg"  # namespace of the pc:* data attributes
Point = tuple[float, float]
Series = tuple[str, Sequence[Point]]

# Okabe & Ito (2008), "Color Universal Design".
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
CAUSE_COLOURS = {"precopy": "#0072B2", "resent": "#E69F00", "demand": "#D55E00",
                 "pushed": "#009E73", "zero": "#999999"}
MARKERS = ("circle", "square", "triangle", "diamond", "cross")
DASHES = ("", "6,3", "2,3", "8,3,2,3")
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
MAX_TIMELINE_POINTS = 1500  # beyond this the cumulative timeline is sampled (exact at samples)

_TITLE_SIZE = 15
_TEXT_SIZE = 12
_TICK_SIZE = 11
_GRID = "#dddddd"
_INK = "#222222"
_MUTED = "#666666"


@dataclass(frozen=True)
class Style:
    """How one series is drawn; ``dash`` is an SVG stroke-dasharray ("" = solid)."""
    color: str
    marker: str = "circle"
    dash: str = ""


def default_styles(n: int) -> list[Style]:
    """Palette colours, with markers and dashes cycling so neighbours never share both."""
    return [Style(PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)],
                  DASHES[(i // len(PALETTE)) % len(DASHES)]) for i in range(n)]


# ---------------------------------------------------------------- low-level SVG text

def _num(v: float) -> str:
    """Coordinate text: one decimal, no trailing zeros."""
    text = f"{v:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _el(tag: str, content: str | None = None, **attrs) -> str:
    """One element; attribute names take ``_`` for ``-`` (``class_`` for ``class``),
    and ``data_NAME`` becomes ``pc:NAME`` in the NS namespace (foreign-namespace
    attributes keep the document valid SVG 1.1, where HTML's data-* are not)."""
    parts = [tag]
    for key, value in attrs.items():
        if value is None:
            continue
        name = "class" if key == "class_" else f"pc:{key[5:]}" if key.startswith("data_") else key.replace("_", "-")
        if isinstance(value, float):
            value = _num(value)
        parts.append(f"{name}={quoteattr(str(value))}")
    head = " ".join(parts)
    return f"<{head}/>" if content is None else f"<{head}>{content}</{tag}>"


def _text(x: float, y: float, text: str, *, size: float = _TEXT_SIZE, anchor: str = "start",
          weight: str | None = None, fill: str = _INK, rotate: float | None = None,
          class_: str | None = None) -> str:
    transform = f"rotate({_num(rotate)} {_num(x)} {_num(y)})" if rotate else None
    return _el("text", escape(str(text)), x=float(x), y=float(y), font_size=size, text_anchor=anchor,
               font_weight=weight, fill=fill, transform=transform, class_=class_)


def text_width(text: str, size: float = _TEXT_SIZE) -> float:
    """Estimated rendered width of text in a sans font (average glyph ~0.6 em)."""
    return len(str(text)) * size * 0.6


def _finite(v) -> float | None:
    """The value as a float, or None when it is missing or not a finite number."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _points(pts: Iterable[Point]) -> str:
    return " ".join(f"{_num(x)},{_num(y)}" for x, y in pts)


def _marker(kind: str, x: float, y: float, color: str, r: float = 3.5) -> str:
    if kind == "square":
        return _el("rect", x=x - r, y=y - r, width=2 * r, height=2 * r, fill=color)
    if kind == "triangle":
        tri = [(x, y - r * 1.2), (x - r * 1.1, y + r * 0.8), (x + r * 1.1, y + r * 0.8)]
        return _el("polygon", points=_points(tri), fill=color)
    if kind == "diamond":
        return _el("polygon", points=_points([(x, y - r * 1.3), (x + r, y), (x, y + r * 1.3), (x - r, y)]), fill=color)
    if kind == "cross":
        return _el("path", d=f"M{_num(x - r)},{_num(y - r)}L{_num(x + r)},{_num(y + r)}"
                              f"M{_num(x - r)},{_num(y + r)}L{_num(x + r)},{_num(y - r)}",
                   stroke=color, stroke_width=2, fill="none")
    return _el("circle", cx=x, cy=y, r=r, fill=color)


# ---------------------------------------------------------------- scales and ticks

def format_number(v: float) -> str:
    """Compact tick text to three significant digits: 0, 0.02, 2.5, 500, 2000, 10k, 1.5M."""
    if v == 0:
        return "0"
    div, suffix = next(((d, s) for d, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(v) >= max(d, 1e4)),
                       (1.0, ""))
    text = f"{v / div:.3g}"
    return (f"{v / div:g}" if "e" in text else text) + suffix


def format_value(v: float) -> str:
    """A measured value to three significant digits: 0.5, 4.1, 61.5, 180, 12,300."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def format_size(n: float) -> str:
    """Binary size without a needless decimal: 256 MiB, 1 GiB, 1.5 GiB."""
    text = format_bytes(n)
    number, _, unit = text.partition(" ")
    return f"{number[:-2] if number.endswith('.0') else number} {unit}"


def nice_step(span: float, target: int = 5) -> float:
    """A step of 1, 2 or 5 times a power of ten giving about ``target`` intervals."""
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10 * mag


def linear_ticks(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float]]:
    """Round domain covering [lo, hi] and its major ticks."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        lo, hi = (lo - 1, hi + 1) if lo else (0.0, 1.0)
    step = nice_step(hi - lo, target)
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    count = int(round((end - start) / step))
    ticks = [round(start + i * step, 12) + 0.0 for i in range(count + 1)]
    return start, end, ticks


def log_ticks(lo: float, hi: float) -> tuple[float, float, list[float], list[float]]:
    """Decade domain covering [lo, hi] (both > 0), labelled ticks and unlabelled minors.
    Narrow ranges also label 2x and 5x; wide ones label every other decade or so."""
    d0 = math.floor(math.log10(lo) + 1e-9)
    d1 = math.ceil(math.log10(hi) - 1e-9)
    if d1 <= d0:  # one value: a decade either side if it sits on one, else its own decade
        d0, d1 = (d0 - 1, d1 + 1) if lo == hi == 10.0 ** d0 else (d0, d0 + 1)
    decades = d1 - d0
    every = max(1, math.ceil(decades / 8))
    major: list[float] = []
    minor: list[float] = []
    for d in range(d0, d1 + 1):
        base = 10.0 ** d
        if (d - d0) % every == 0:
            major.append(base)
        elif decades <= 12:
            minor.append(base)
        if d == d1:
            break
        for m in range(2, 10):
            if decades <= 2 and m in (2, 5):
                major.append(m * base)
            elif decades <= 8:
                minor.append(m * base)
    return 10.0 ** d0, 10.0 ** d1, major, minor


@dataclass
class _Scale:
    lo: float
    hi: float
    px0: float
    px1: float
    log: bool = False

    def __call__(self, v: float) -> float:
        if self.log:
            v, lo, hi = math.log10(v), math.log10(self.lo), math.log10(self.hi)
        else:
            lo, hi = self.lo, self.hi
        return self.px0 + (v - lo) / (hi - lo) * (self.px1 - self.px0)


@dataclass
class _Axis:
    lo: float
    hi: float
    major: list[float]
    minor: list[float]
    labels: list[str]
    log: bool


def _make_axis(values: Sequence[float], log: bool, *, include_zero: bool = False,
               lo: float | None = None, hi: float | None = None, target: int = 5) -> _Axis:
    """Axis covering the values (non-positive values are dropped on a log axis).
    ``include_zero`` is for quantities drawn from a baseline (areas, bars): a linear
    axis then starts at 0, a log axis at half the smallest value, off the decade grid,
    so the smallest bar (a histogram bucket of 1) stays visible."""
    vals = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
    if log:
        vmin = lo if lo and lo > 0 else (min(vals) if vals else 1.0)
        vmax = hi if hi and hi > 0 else (max(vals) if vals else 10.0)
        a, b, major, minor = log_ticks(vmin, max(vmin, vmax))
        if include_zero and vals and lo is None:
            a = min(vals) / 2
            major = [t for t in major if t >= a * (1 - 1e-9)]
            minor = [t for t in minor if t >= a * (1 - 1e-9)]
        return _Axis(a, b, major, minor, [format_number(t) for t in major], True)
    vmin = lo if lo is not None else (min(vals) if vals else 0.0)
    vmax = hi if hi is not None else (max(vals) if vals else 1.0)
    if include_zero:
        vmin, vmax = min(vmin, 0.0), max(vmax, 0.0)
    a, b, major = linear_ticks(vmin, vmax, target)
    step = major[1] - major[0] if len(major) > 1 else 1.0
    # One suffix and one number of decimals for the whole axis: never "5000" next to "10k".
    biggest = max(abs(a), abs(b))
    div, suffix = next(((d, s) for d, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if biggest >= max(d, 1e4)),
                       (1.0, ""))
    decimals = max(0, -math.floor(math.log10(step / div) + 1e-9))
    labels = ["0" if t == 0 else f"{t / div:.{decimals}f}{suffix}" for t in major]
    return _Axis(a, b, major, [], labels, False)


def auto_log(values: Iterable[float], ratio: float = 100.0) -> bool:
    """Whether positive values span more than ``ratio`` (then a log axis reads better)."""
    pos = [v for v in values if v is not None and v > 0]
    return bool(pos) and max(pos) / min(pos) > ratio


# ---------------------------------------------------------------- panel frame

@dataclass
class _Frame:
    """Plot rectangle inside a panel, after title, legend and tick labels took their room."""
    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top


def _legend_rows(entries: Sequence[tuple[str, Style, str]], width: float) -> list[list[tuple[float, tuple]]]:
    """Greedy wrap of legend entries into rows that fit ``width``."""
    rows: list[list[tuple[float, tuple]]] = [[]]
    x = 0.0
    for entry in entries:
        w = 34 + text_width(entry[0], _TEXT_SIZE) + 18
        if rows[-1] and x + w > width:
            rows.append([])
            x = 0.0
        rows[-1].append((x, entry))
        x += w
    return rows if rows[0] else []


def _draw_legend(rows, x0: float, y0: float) -> str:
    out = []
    for r, row in enumerate(rows):
        y = y0 + r * 18
        for x, (label, style, kind) in row:
            gx = x0 + x
            if kind == "line":
                out.append(_el("line", x1=gx, y1=y, x2=gx + 26, y2=y, stroke=style.color, stroke_width=2,
                               stroke_dasharray=style.dash or None))
                out.append(_marker(style.marker, gx + 13, y, style.color))
            else:
                out.append(_el("rect", x=gx + 7, y=y - 6, width=12, height=12, fill=style.color,
                               class_="legend-swatch"))
            out.append(_text(gx + 32, y + 4, label, class_="legend-label"))
    return _el("g", "".join(out), class_="legend") if out else ""


def _panel(x: float, y: float, width: float, height: float, *, title: str, subtitle: str | None,
           legend: Sequence[tuple[str, Style, str]], xaxis: _Axis | None, yaxis: _Axis,
           x_label: str, y_label: str, x_tick_labels_room: float = 18) -> tuple[_Frame, list[str], list[str]]:
    """Lay out a panel; returns the plot frame, the elements behind the data (grid) and
    those in front of it (axes, labels, title, legend)."""
    back: list[str] = []
    front: list[str] = [_text(0, 17, title, size=_TITLE_SIZE, weight="bold", class_="title")]
    if subtitle:
        front.append(_text(width, 17, subtitle, size=_TICK_SIZE, anchor="end", fill=_MUTED, class_="subtitle"))
    label_w = max((text_width(t, _TICK_SIZE) for t in yaxis.labels), default=10)
    left = 22 + label_w + 10
    right = width - 14
    rows = _legend_rows(legend, right - left)
    legend_top = 38
    top = legend_top + len(rows) * 18 + 6 if rows else 34
    bottom = height - 22 - x_tick_labels_room
    frame = _Frame(left, top, right, bottom)
    if rows:
        front.append(_draw_legend(rows, left, legend_top))
    ys = _Scale(yaxis.lo, yaxis.hi, bottom, top, yaxis.log)
    for t in yaxis.minor:
        back.append(_el("line", x1=left - 3, y1=ys(t), x2=left, y2=ys(t), stroke=_INK))
    for t, lab in zip(yaxis.major, yaxis.labels):
        py = ys(t)
        back.append(_el("line", x1=left, y1=py, x2=right, y2=py, stroke=_GRID))
        front.append(_el("line", x1=left - 5, y1=py, x2=left, y2=py, stroke=_INK))
        front.append(_text(left - 8, py + 4, lab, size=_TICK_SIZE, anchor="end", class_="tick-label"))
    front.append(_text(12, (top + bottom) / 2, y_label, anchor="middle", rotate=-90, class_="axis-label"))
    front.append(_text((left + right) / 2, height - 6, x_label, anchor="middle", class_="axis-label"))
    front.append(_el("path", d=f"M{_num(left)},{_num(top)}V{_num(bottom)}H{_num(right)}", stroke=_INK,
                     fill="none", class_="axis"))
    if xaxis is not None:
        xs = _Scale(xaxis.lo, xaxis.hi, left, right, xaxis.log)
        for t in xaxis.minor:
            front.append(_el("line", x1=xs(t), y1=bottom, x2=xs(t), y2=bottom + 3, stroke=_INK))
        for t, lab in _thin(list(zip(xaxis.major, xaxis.labels)), xs):
            px = xs(t)
            back.append(_el("line", x1=px, y1=top, x2=px, y2=bottom, stroke=_GRID))
            front.append(_el("line", x1=px, y1=bottom, x2=px, y2=bottom + 5, stroke=_INK))
            front.append(_text(px, bottom + 18, lab, size=_TICK_SIZE, anchor="middle", class_="tick-label"))
    return frame, back, front


def _thin(ticks: list[tuple[float, str]], pos: Callable[[float], float]) -> list[tuple[float, str]]:
    """Drop every other tick label until neighbours no longer overlap."""
    every = 1
    while every < len(ticks):
        kept = ticks[::every]
        if all(pos(b[0]) - pos(a[0]) >= (text_width(a[1], _TICK_SIZE) + text_width(b[1], _TICK_SIZE)) / 2 + 6
               for a, b in zip(kept, kept[1:])):
            return kept
        every += 1
    return ticks[:1]


def _wrap(x: float, y: float, body: list[str], class_: str) -> str:
    return _el("g", "".join(body), transform=f"translate({_num(x)},{_num(y)})", class_=class_)


def _note(frame: _Frame, text: str) -> str:
    return _text((frame.left + frame.right) / 2, (frame.top + frame.bottom) / 2, text, size=14,
                 anchor="middle", fill=_MUTED, class_="note")


def note_panel(text: str, *, x: float = 0, y: float = 0, width: float = 860, height: float = 280,
               title: str = "") -> str:
    """An empty panel that says why there is no chart (e.g. "no precopy rounds")."""
    body = [_text(0, 17, title, size=_TITLE_SIZE, weight="bold", class_="title"),
            _el("rect", x=0.5, y=30.5, width=width - 1, height=height - 31, fill="none", stroke=_GRID),
            _text(width / 2, (height + 30) / 2, text, size=14, anchor="middle", fill=_MUTED, class_="note")]
    return _wrap(x, y, body, "panel")


# ---------------------------------------------------------------- line charts

def line_chart(series: Sequence[Series], *, x: float = 0, y: float = 0, width: float = 860,
               height: float = 400, title: str = "", subtitle: str | None = None, x_label: str = "",
               y_label: str = "", x_log: bool = False, y_log: bool = False,
               styles: Sequence[Style] | None = None, markers: bool | None = None,
               vlines: Sequence[tuple[float, str]] = (), empty_note: str = "no data") -> str:
    """Lines through (x, y) points, one per series, sorted by x. Points that a log axis
    cannot show (<= 0) are left out. ``markers`` None: markers when a series has <= 60
    points. ``vlines``: vertical (x, label) markers."""
    styles = list(styles) if styles else default_styles(len(series))
    drawn: list[tuple[str, list[Point], Style]] = []
    hidden = 0
    for (label, pts), style in zip(series, styles):
        valid = [(fx, fy) for fx, fy in ((_finite(px), _finite(py)) for px, py in pts)
                 if fx is not None and fy is not None]
        keep = sorted((px, py) for px, py in valid if (px > 0 or not x_log) and (py > 0 or not y_log))
        hidden += len(valid) - len(keep)
        if keep:
            drawn.append((label, keep, style))
    if hidden:  # say so rather than silently drop measurements
        note = f"{hidden} point{'s' * (hidden != 1)} <= 0 not shown (log axis)"
        subtitle = f"{subtitle}; {note}" if subtitle else note
    xs_all = [p[0] for _, pts, _ in drawn for p in pts] + [v for v, _ in vlines]
    ys_all = [p[1] for _, pts, _ in drawn for p in pts]
    xaxis = _make_axis(xs_all, x_log, target=8)
    yaxis = _make_axis(ys_all, y_log, include_zero=not y_log)
    legend = [(label, style, "line") for label, _, style in drawn]
    frame, back, front = _panel(x, y, width, height, title=title, subtitle=subtitle, legend=legend,
                                xaxis=xaxis, yaxis=yaxis, x_label=x_label, y_label=y_label)
    xs = _Scale(xaxis.lo, xaxis.hi, frame.left, frame.right, x_log)
    ys = _Scale(yaxis.lo, yaxis.hi, frame.bottom, frame.top, y_log)
    data: list[str] = []
    for label, pts, style in drawn:
        scaled = [(xs(px), ys(py)) for px, py in pts]
        parts = [_el("polyline", points=_points(scaled), fill="none", stroke=style.color, stroke_width=2,
                     stroke_dasharray=style.dash or None, stroke_linejoin="round", class_="line")]
        if markers or (markers is None and len(pts) <= 60):
            parts.extend(_marker(style.marker, sx, sy, style.color) for sx, sy in scaled)
        data.append(_el("g", "".join(parts), class_="series", data_series=label, data_points=len(pts)))
    data.extend(_vlines(vlines, xs, frame))
    if not drawn:
        data.append(_note(frame, empty_note))
    return _wrap(x, y, back + data + front, "panel line-chart")


def _vlines(vlines: Sequence[tuple[float, str]], xs: _Scale, frame: _Frame) -> list[str]:
    out = []
    for vx, label in vlines:
        px = xs(vx)
        anchor = "end" if px > frame.left + frame.width * 0.75 else "start"
        out.append(_el("g", _el("line", x1=px, y1=frame.top, x2=px, y2=frame.bottom, stroke=_INK,
                                stroke_width=1.5, stroke_dasharray="5,4")
                       + _label(px + (-5 if anchor == "end" else 5), frame.top + 14, label, anchor),
                       class_="vline", data_x=float(vx)))
    return out


def _label(x: float, y: float, text: str, anchor: str, fill: str = _INK) -> str:
    """Reference-line label on a light backing so data under it cannot make it unreadable."""
    w = text_width(text, _TICK_SIZE)
    left = x - w if anchor == "end" else x
    return (_el("rect", x=left - 2, y=y - _TICK_SIZE, width=w + 4, height=_TICK_SIZE + 4, fill="#ffffff",
                fill_opacity=0.8, class_="label-backing")
            + _text(x, y, text, size=_TICK_SIZE, anchor=anchor, fill=fill))


def cumulative(values: Iterable[float]) -> list[float]:
    """Running totals."""
    out, total = [], 0.0
    for v in values:
        total += v or 0
        out.append(total)
    return out


def stacked_area_chart(series: Sequence[Series], *, x: float = 0, y: float = 0, width: float = 860,
                       height: float = 400, title: str = "", subtitle: str | None = None,
                       x_label: str = "", y_label: str = "", colors: Sequence[str] | None = None,
                       vlines: Sequence[tuple[float, str]] = (), hlines: Sequence[tuple[float, str]] = (),
                       empty_note: str = "no data") -> str:
    """Layers stacked bottom-up in series order; all series share the same x values
    (the first series' x). Each layer is a filled ``polygon`` (class ``area``) and a
    ``polyline`` along its top edge (class ``area-edge``, one point per x value).
    ``vlines``/``hlines``: dashed (value, label) reference lines."""
    colors = list(colors) if colors else list(PALETTE)
    layers = [(label, [(float(px), _finite(py) or 0.0) for px, py in pts]) for label, pts in series]
    layers = [(label, pts) for label, pts in layers if pts]
    if layers:
        xs_ref = [px for px, _ in layers[0][1]]
        for label, pts in layers:
            if [px for px, _ in pts] != xs_ref:
                raise ValueError(f"stacked series {label!r} has different x values from {layers[0][0]!r}")
    top_totals = [sum(pts[i][1] for _, pts in layers) for i in range(len(layers[0][1]))] if layers else []
    has_data = any(v > 0 for v in top_totals)
    xaxis = _make_axis([p[0] for _, pts in layers for p in pts] + [v for v, _ in vlines], False, target=8)
    yaxis = _make_axis(top_totals + [v for v, _ in hlines], False, include_zero=True)
    legend = [(label, Style(colors[i % len(colors)]), "swatch") for i, (label, _) in enumerate(layers)]
    frame, back, front = _panel(x, y, width, height, title=title, subtitle=subtitle, legend=legend,
                                xaxis=xaxis, yaxis=yaxis, x_label=x_label, y_label=y_label)
    xs = _Scale(xaxis.lo, xaxis.hi, frame.left, frame.right)
    ys = _Scale(yaxis.lo, yaxis.hi, frame.bottom, frame.top)
    data: list[str] = []
    base = [0.0] * len(top_totals)
    for i, (label, pts) in enumerate(layers):
        upper = [b + py for b, (_, py) in zip(base, pts)]
        top_line = [(xs(px), ys(u)) for (px, _), u in zip(pts, upper)]
        bottom_line = [(xs(px), ys(b)) for (px, _), b in zip(pts, base)]
        color = colors[i % len(colors)]
        data.append(_el("g", _el("polygon", points=_points(top_line + bottom_line[::-1]), fill=color,
                                 fill_opacity=0.85, class_="area")
                        + _el("polyline", points=_points(top_line), fill="none", stroke=color, stroke_width=1.5,
                              class_="area-edge"),
                        class_="series", data_series=label, data_points=len(pts)))
        base = upper
    data.extend(_vlines(vlines, xs, frame))
    for vy, label in hlines:
        py = ys(vy)
        data.append(_el("g", _el("line", x1=frame.left, y1=py, x2=frame.right, y2=py, stroke=_MUTED,
                                 stroke_width=1, stroke_dasharray="3,3")
                        + _label(frame.right - 6, py - 5, label, "end", fill=_MUTED),
                        class_="hline", data_y=float(vy)))
    if not has_data:
        data.append(_note(frame, empty_note))
    return _wrap(x, y, back + data + front, "panel stacked-area-chart")


# ---------------------------------------------------------------- bar charts

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


# ---------------------------------------------------------------- documents

def document(width: float, height: float, parts: Sequence[str], title: str = "") -> str:
    """A standalone SVG 1.1 document with a white background."""
    head = (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:pc="{NS}" version="1.1"'
            f' width="{_num(width)}" height="{_num(height)}" viewBox="0 0 {_num(width)} {_num(height)}"'
            f' font-family={quoteattr(FONT)} font-size="{_TEXT_SIZE}">\n')
    body = [_el("title", escape(title))] if title else []
    body.append(_el("rect", x=0, y=0, width=float(width), height=float(height), fill="#ffffff", class_="background"))
    body.extend(parts)
    return head + "\n".join(body) + "\n</svg>\n"


def write_svg(path: str, svg_text: str) -> None:
    """Write an SVG document (UTF-8), replacing the file atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(svg_text)
    os.replace(tmp, path)


def write_figures(directory: str, figures: dict[str, str]) -> list[str]:
    """Write each figure as DIRECTORY/NAME.svg (creating the directory); returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, text in figures.items():
        path = os.path.join(directory, f"{name}.svg")
        write_svg(path, text)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- migration figure

FIGURE_WIDTH = 900
_PANEL_W = FIGURE_WIDTH - 40


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


# ---------------------------------------------------------------- benchmark figures

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
