"""Precopy rounds and their convergence policy (like QEMU's): round 0 sends every
populated page, each later round harvests the dirty log first and then sends what was
written, until the rest fits the downtime limit at the measured bandwidth, the dirty
set stops shrinking, or the round limit is reached."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

from postcopy import ranges


@dataclass
class ConvergencePolicy:
    downtime_limit_ms: float = 300.0
    max_rounds: int = 30
    stall_rounds: int = 3  # rounds without a new smallest dirty set before giving up

    def stop_reason(self, rounds: list["RoundStats"], page_size: int) -> str | None:
        """Why to stop after the rounds so far (None: do another round)."""
        last = rounds[-1]
        if last.round >= self.max_rounds:
            return f"round limit ({self.max_rounds})"
        if last.round > 0 and last.bytes_per_s > 0:
            expected_ms = last.dirty_pages * page_size / last.bytes_per_s * 1e3
            if expected_ms <= self.downtime_limit_ms:
                return f"converged: {last.dirty_pages} dirty pages fit the {self.downtime_limit_ms:g} ms limit"
        dirty = [r.dirty_pages for r in rounds if r.round > 0]
        if self.stall_rounds and len(dirty) > self.stall_rounds and min(dirty[-self.stall_rounds:]) >= min(dirty[:-self.stall_rounds]):
            return f"dirty set stopped shrinking ({dirty[-1]} pages)"
        return None


@dataclass
class RoundStats:
    round: int
    dirty_pages: int
    harvest_ms: float
    pause_ms: float
    sent_pages: int
    skipped_free: int
    round_ms: float
    bytes: int

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / (self.round_ms / 1e3) if self.round_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# send(runs, cause_is_resend) -> bytes sent; free() -> current free-page hint runs.
SendRuns = Callable[[ranges.Runs, bool], int]
FreeHint = Callable[[], ranges.Runs]


def run_rounds(*, populated: ranges.Runs, dirty_log, send: SendRuns, free_hint: FreeHint,
               policy: ConvergencePolicy, page_size: int) -> tuple[list[RoundStats], str]:
    """Run precopy rounds while the guest runs; returns the rounds and why they stopped.

    The dirty log must already be started, and the free-page hint is taken after that,
    so a hinted page the guest reuses later shows up dirty in a later round.
    """
    rounds: list[RoundStats] = []
    started = time.monotonic()
    free = free_hint()
    to_send = ranges.subtract(populated, free)
    sent_bytes = send(to_send, False)
    rounds.append(RoundStats(0, ranges.total(populated), 0.0, 0.0, ranges.total(to_send),
                             ranges.total(populated) - ranges.total(to_send),
                             (time.monotonic() - started) * 1e3, sent_bytes))
    while True:
        reason = policy.stop_reason(rounds, page_size)
        if reason:
            return rounds, reason
        started = time.monotonic()
        dirty = dirty_log.harvest()
        harvest_ms = dirty_log.last_harvest_ms
        free = free_hint()
        to_send = ranges.subtract(dirty, free)
        sent_bytes = send(to_send, True)
        rounds.append(RoundStats(len(rounds), ranges.total(dirty), harvest_ms, dirty_log.last_pause_ms,
                                 ranges.total(to_send), ranges.total(dirty) - ranges.total(to_send),
                                 (time.monotonic() - started) * 1e3, sent_bytes))
