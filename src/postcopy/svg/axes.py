"""Axes: value-to-pixel scales and tick choice for linear and log axes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from postcopy.svg.ticks import format_number, linear_ticks, log_ticks

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
