"""Standalone SVG documents and writing them to files."""
from __future__ import annotations

import os
from typing import Sequence
from xml.sax.saxutils import escape, quoteattr

from postcopy.svg.primitives import _TEXT_SIZE, FONT, NS, _el, _num

FIGURE_WIDTH = 900  # every report figure has this width
_PANEL_W = FIGURE_WIDTH - 40


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
