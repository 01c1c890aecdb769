"""Live progress of a migration, QMP-style: a status snapshot (the ``query-migrate``
analogue), status-change events written as JSON lines (``--events FILE``), and one
progress line on a terminal that updates in place.

The source agent owns one :class:`Progress`; its phases come in the order of
:data:`PHASES` (``failed`` may follow any of them).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO

# Status changes, in their legal order; "recovery" may repeat within "postcopy".
PHASES = ("setup", "precopy", "switchover", "postcopy", "done")
TERMINAL = ("done", "failed")
_NEXT = {
    None: {"setup"},
    "setup": {"precopy", "switchover", "failed"},
    "precopy": {"precopy", "switchover", "failed"},  # one event per precopy round
    "switchover": {"postcopy", "done", "failed"},
    "postcopy": {"recovery", "done", "failed"},
    "recovery": {"postcopy", "failed"},
}


def legal_order(phases: list[str]) -> bool:
    """Whether a sequence of event phases is one a migration can produce."""
    state = None
    for phase in phases:
        if phase not in _NEXT.get(state, set()):
            return False
        state = phase
    return True


class Progress:
    """The live figures of one migration; thread-safe. ``event(phase, **figures)``
    records a status change, ``update(**figures)`` just refreshes the figures."""

    def __init__(self, *, ram_bytes: int, events: IO[str] | None = None,
                 terminal: IO[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._events = events
        self._terminal = terminal
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._status: dict = {"phase": None, "ram_bytes": ram_bytes, "bytes_sent": 0, "round": 0,
                              "dirty_rate_pages_s": 0.0, "throughput_bytes_s": 0.0,
                              "expected_downtime_ms": None, "throttle_pct": 0, "setup_ms": None,
                              "remaining_bytes": ram_bytes, "eta_s": None}

    def status(self) -> dict:
        """A snapshot: phase, elapsed_ms and the latest figures."""
        with self._lock:
            return {**self._status, "elapsed_ms": (time.monotonic() - self._started) * 1e3}

    def event(self, phase: str, **figures) -> None:
        with self._lock:
            if phase not in _NEXT.get(self._status["phase"], set()) and phase != "failed":
                raise ValueError(f"progress: {phase!r} cannot follow {self._status['phase']!r}")
            self._status.update(figures, phase=phase)
            if phase != "setup" and self._status["setup_ms"] is None:
                self._status["setup_ms"] = (time.monotonic() - self._started) * 1e3
            snapshot = {**self._status, "elapsed_ms": (time.monotonic() - self._started) * 1e3}
            if self._events is not None:
                self._events.write(json.dumps({"event": phase, "time": time.time(), **snapshot}) + "\n")
                self._events.flush()
            self._draw(snapshot, force=True)

    def update(self, **figures) -> None:
        with self._lock:
            self._status.update(figures)
            sent, ram = self._status["bytes_sent"], self._status["ram_bytes"]
            rate = self._status["throughput_bytes_s"]
            if self._status["phase"] in ("precopy", "postcopy") and rate > 0:
                self._status["eta_s"] = max(0, ram - sent) / rate if self._status["phase"] == "postcopy" else None
            self._draw({**self._status, "elapsed_ms": (time.monotonic() - self._started) * 1e3})

    def _draw(self, s: dict, force: bool = False) -> None:
        if self._terminal is None:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self._terminal.write("\r\x1b[K" + format_line(s) + ("\n" if s["phase"] in TERMINAL else ""))
        self._terminal.flush()

    def close(self) -> None:
        with self._lock:
            if self._terminal is not None and self._status["phase"] not in TERMINAL:
                self._terminal.write("\n")
                self._terminal.flush()


def format_line(s: dict) -> str:
    """One line: phase, round, % of RAM sent, dirty rate, throughput, expected downtime, ETA."""
    pct = 100.0 * s["bytes_sent"] / s["ram_bytes"] if s["ram_bytes"] else 0.0
    parts = [f"{s['phase'] or '-'}"]
    if s["round"]:
        parts.append(f"round {s['round']}")
    parts.append(f"{pct:5.1f}% of RAM sent")
    if s["dirty_rate_pages_s"]:
        parts.append(f"dirty {s['dirty_rate_pages_s']:,.0f} pages/s")
    parts.append(f"{s['throughput_bytes_s'] / 1e6:,.0f} MB/s")
    if s["expected_downtime_ms"] is not None:
        parts.append(f"expected downtime {s['expected_downtime_ms']:.0f} ms")
    if s["throttle_pct"]:
        parts.append(f"throttle {s['throttle_pct']}%")
    if s["eta_s"] is not None:
        parts.append(f"ETA {s['eta_s']:.1f} s")
    return "postcopy: " + ", ".join(parts)


def terminal_or_none(stream: IO[str] = sys.stderr, force: bool = False) -> IO[str] | None:
    """The stream to draw the progress line on: only a terminal, unless forced."""
    return stream if force or stream.isatty() else None
