"""Parsing of human-written sizes and rates for the command line."""
from __future__ import annotations

import argparse
import re

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)(bit|bps|B)?(?:/s)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``4096``, ``64K``, ``256M``, ``2GiB`` into bytes (binary units)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G/T suffix")
    return int(match.group(1)) * _SUFFIX[match.group(2).upper()]


def parse_rate(text: str) -> int:
    """Parse a link rate into bits per second: ``100mbit``, ``1gbit``, ``50MB`` (bytes)."""
    match = _RATE_RE.match(str(text))
    if not match:
        raise ValueError(f"rate {text!r} is not like 100mbit, 1gbit or 50MB")
    value = float(match.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[match.group(2).upper()]
    unit = (match.group(3) or "bit").lower()
    return int(value * 8 if unit == "b" and match.group(3) == "B" else value)


def size_arg(text: str) -> int:
    """argparse type for sizes: a bad size is a usage error (exit code 2)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def rate_arg(text: str) -> int:
    """argparse type for link rates in bits per second."""
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def positive_int_arg(text: str) -> int:
    """argparse type: an integer of at least 1 (0x prefixes allowed)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def positive_float_arg(text: str) -> float:
    """argparse type: a number greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def nonneg_float_arg(text: str) -> float:
    """argparse type: a number of at least 0 (not nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def port_arg(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def seed_arg(text: str) -> int:
    """argparse type: an RNG seed, 0 .. 2**64-1 (0x prefixes allowed)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError("seed must fit in 64 bits (0 .. 2**64-1)")
    return value


def positive_rate_arg(text: str) -> int:
    """argparse type for a link rate that must be above 0 bits per second."""
    value = rate_arg(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"rate {text!r} must be above 0 (leave the option out for no limit)")
    return value


def format_num(value: float | None, fmt: str = "{:.2f}") -> str:
    """``value`` in ``fmt``, or "n/a" for a figure that was not measured."""
    return "n/a" if value is None else fmt.format(value)
