"""Line charts and stacked area charts, with dashed reference lines."""
from __future__ import annotations

from typing import Iterable, Sequence

from postcopy.svg.axes import _make_axis, _Scale
from postcopy.svg.panel import _Frame, _note, _panel, _wrap
from postcopy.svg.primitives import (_INK, _MUTED, _TICK_SIZE, PALETTE, Point, Series, Style, _el, _finite,
                                     _marker, _points, _text, default_styles, text_width)

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
