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

from postcopy.svg.axes import auto_log
from postcopy.svg.bars import bar_chart, grouped_bar_chart, histogram_chart
from postcopy.svg.benchmark import bench_figures
from postcopy.svg.document import FIGURE_WIDTH, document, write_figures, write_svg
from postcopy.svg.lines import cumulative, line_chart, stacked_area_chart
from postcopy.svg.migration import migration_figure, timeline_series
from postcopy.svg.panel import note_panel
from postcopy.svg.primitives import (CAUSE_COLOURS, DASHES, FONT, MARKERS, MAX_TIMELINE_POINTS, NS, PALETTE, Point,
                                     Series, Style, default_styles, text_width)
from postcopy.svg.ticks import format_number, format_size, format_value, linear_ticks, log_ticks, nice_step

__all__ = [
    "CAUSE_COLOURS", "DASHES", "FIGURE_WIDTH", "FONT", "MARKERS", "MAX_TIMELINE_POINTS", "NS", "PALETTE", "Point",
    "Series", "Style", "auto_log", "bar_chart", "bench_figures", "cumulative", "default_styles", "document",
    "format_number", "format_size", "format_value", "grouped_bar_chart", "histogram_chart", "line_chart",
    "linear_ticks", "log_ticks", "migration_figure", "nice_step", "note_panel", "stacked_area_chart",
    "text_width", "timeline_series", "write_figures", "write_svg",
]
