"""Precopy rounds and their convergence policy (like QEMU's): round 0 sends every
populated page, each later round harvests the dirty log first and then sends what was
written, until the rest fits the downtime limit at the measured bandwidth, the dirty
set stops shrinking, or the round limit is reached.

Two policies make a guest that dirties memory faster than the link converge, both
acting on the guest's vCPUs (QEMU's names):

- auto-converge: when a round's dirty pages exceed ``throttle_trigger`` of what the
  round before it sent, twice in a row, the vCPUs are throttled (parked that percent of
  the time): ``throttle_initial`` %, then ``throttle_increment`` more each time, at most
  ``throttle_max`` %. While the throttle can still rise, a stalled dirty set does not end
  precopy.
- dirty limit: each vCPU's step rate is capped so that it dirties at most
  ``dirty_limit`` pages/s, from the pages-per-step ratio measured in each round.

The source lifts both at the switchover.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from postcopy import ranges


@dataclass
class ConvergencePolicy:
    downtime_limit_ms: float = 300.0
    max_rounds: int = 30
    stall_rounds: int = 3  # rounds without a new smallest dirty set before giving up
    auto_converge: bool = False
    throttle_initial: int = 20  # percent of vCPU time parked (QEMU's cpu-throttle-initial)
    throttle_increment: int = 10  # QEMU's cpu-throttle-increment
    throttle_max: int = 99  # QEMU's max-cpu-throttle
    throttle_trigger: float = 0.5  # QEMU's throttle-trigger-threshold (dirty / sent per round)
    dirty_limit: float = 0.0  # pages/s per vCPU (0: no limit)

    def expected_downtime_ms(self, last: "RoundStats", page_size: int) -> float | None:
        """Time to send the last round's dirty pages at its measured bandwidth."""
        if last.round == 0 or last.bytes_per_s <= 0:
            return None
        return last.dirty_pages * page_size / last.bytes_per_s * 1e3

    def stop_reason(self, rounds: list["RoundStats"], page_size: int) -> str | None:
        """Why to stop after the rounds so far (None: do another round)."""
        last = rounds[-1]
        if last.round >= self.max_rounds:
            return f"round limit ({self.max_rounds})"
        expected_ms = self.expected_downtime_ms(last, page_size)
        if expected_ms is not None and expected_ms <= self.downtime_limit_ms:
            return f"converged: {last.dirty_pages} dirty pages fit the {self.downtime_limit_ms:g} ms limit"
        if self.auto_converge and last.throttle_pct < self.throttle_max:
            return None  # the throttle can still rise: keep going
        dirty = [r.dirty_pages for r in rounds if r.round > 0]
        if self.stall_rounds and len(dirty) > self.stall_rounds and min(dirty[-self.stall_rounds:]) >= min(dirty[:-self.stall_rounds]):
            suffix = f" at {last.throttle_pct}% throttle" if last.throttle_pct else ""
            return f"dirty set stopped shrinking ({dirty[-1]} pages){suffix}"
        return None

    def next_throttle(self, rounds: list["RoundStats"]) -> int:
        """The vCPU throttle (percent) for the next round: QEMU's trigger, counted over
        the last two rounds, each dirtying more than ``throttle_trigger`` of what the
        round before it sent."""
        current = rounds[-1].throttle_pct
        if not self.auto_converge or len(rounds) < 3:
            return current
        high = all(r.dirty_pages > self.throttle_trigger * prev.sent_pages
                   for prev, r in zip(rounds[-3:-1], rounds[-2:]))
        already_raised = rounds[-2].throttle_pct != current  # raised after the round before: wait two
        if not high or already_raised:
            return current
        return self.throttle_initial if current == 0 else min(self.throttle_max, current + self.throttle_increment)

    def next_rate_cap(self, last: "RoundStats") -> float:
        """Steps/s per vCPU so that each dirties at most ``dirty_limit`` pages/s (0: no
        cap), from the pages-per-step ratio the last round measured."""
        if self.dirty_limit <= 0 or last.round == 0 or last.steps <= 0 or last.dirty_pages <= 0:
            return last.rate_cap
        pages_per_step = last.dirty_pages / last.steps
        return max(1.0, self.dirty_limit / pages_per_step)


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
    throttle_pct: int = 0  # vCPU throttle during this round
    rate_cap: float = 0.0  # steps/s per vCPU during this round (dirty limit; 0: none)
    steps: int = 0  # guest steps (all vCPUs) between this harvest and the one before
    dirty_rate: float = 0.0  # pages/s dirtied between this harvest and the one before

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / (self.round_ms / 1e3) if self.round_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# send(runs, cause_is_resend) -> bytes sent; free() -> current free-page hint runs.
SendRuns = Callable[[ranges.Runs, bool], int]
FreeHint = Callable[[], ranges.Runs]


@dataclass
class GuestControls:
    """How rounds act on and read the guest (all optional: the defaults do nothing)."""

    steps: Callable[[], int] = lambda: 0  # total steps of all vCPUs so far
    throttle: Callable[[int], None] = lambda percent: None
    rate_cap: Callable[[float], None] = lambda steps_per_s: None  # 0 lifts the cap
    on_round: Callable[["RoundStats"], None] = lambda stats: None
    applied: dict = field(default_factory=lambda: {"throttle": 0, "rate_cap": 0.0})

    def apply(self, policy: ConvergencePolicy, rounds: list[RoundStats]) -> None:
        """Set the throttle and rate cap the policy wants for the next round."""
        throttle = policy.next_throttle(rounds)
        if throttle != self.applied["throttle"]:
            self.throttle(throttle)
            self.applied["throttle"] = throttle
        cap = policy.next_rate_cap(rounds[-1])
        if cap != self.applied["rate_cap"]:
            self.rate_cap(cap)
            self.applied["rate_cap"] = cap

    def lift(self) -> None:
        """Undo every throttle (at the switchover, or when precopy fails)."""
        if self.applied["throttle"]:
            self.throttle(0)
        if self.applied["rate_cap"]:
            self.rate_cap(0.0)
        self.applied.update(throttle=0, rate_cap=0.0)


def run_rounds(*, populated: ranges.Runs, dirty_log, send: SendRuns, free_hint: FreeHint,
               policy: ConvergencePolicy, page_size: int,
               guest: GuestControls | None = None) -> tuple[list[RoundStats], str]:
    """Run precopy rounds while the guest runs; returns the rounds and why they stopped.

    The dirty log must already be started, and the free-page hint is taken after that,
    so a hinted page the guest reuses later shows up dirty in a later round. The
    throttles the policy sets stay in force when this returns: the caller lifts them
    (``guest.lift()``) once the guest is paused.
    """
    guest = guest or GuestControls()
    rounds: list[RoundStats] = []
    started = last_harvest = time.monotonic()
    last_steps = guest.steps()
    free = free_hint()
    to_send = ranges.subtract(populated, free)
    sent_bytes = send(to_send, False)
    rounds.append(RoundStats(0, ranges.total(populated), 0.0, 0.0, ranges.total(to_send),
                             ranges.total(populated) - ranges.total(to_send),
                             (time.monotonic() - started) * 1e3, sent_bytes))
    guest.on_round(rounds[-1])
    while True:
        reason = policy.stop_reason(rounds, page_size)
        if reason:
            return rounds, reason
        guest.apply(policy, rounds)
        started = time.monotonic()
        dirty = dirty_log.harvest()
        steps = guest.steps()
        interval = max(started - last_harvest, 1e-9)
        harvest_ms = dirty_log.last_harvest_ms
        free = free_hint()
        to_send = ranges.subtract(dirty, free)
        sent_bytes = send(to_send, True)
        rounds.append(RoundStats(len(rounds), ranges.total(dirty), harvest_ms, dirty_log.last_pause_ms,
                                 ranges.total(to_send), ranges.total(dirty) - ranges.total(to_send),
                                 (time.monotonic() - started) * 1e3, sent_bytes,
                                 throttle_pct=guest.applied["throttle"], rate_cap=guest.applied["rate_cap"],
                                 steps=max(0, steps - last_steps), dirty_rate=ranges.total(dirty) / interval))
        last_harvest, last_steps = started, steps
        guest.on_round(rounds[-1])
