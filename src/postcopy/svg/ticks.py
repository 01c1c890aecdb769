"""Round-number ticks and compact tick and value text."""
from __future__ import annotations

import math

from postcopy.units import format_bytes

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
