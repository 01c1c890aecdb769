"""SVG building blocks: palette and series styles, escaped elements and text, markers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

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
