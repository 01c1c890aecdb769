"""A chart panel: title, legend, grid, axes and tick labels around a plot frame."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from postcopy.svg.axes import _Axis, _Scale
from postcopy.svg.primitives import (_GRID, _INK, _MUTED, _TEXT_SIZE, _TICK_SIZE, _TITLE_SIZE, Style, _el,
                                     _marker, _num, _text, text_width)

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
