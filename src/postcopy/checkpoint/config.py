"""What a checkpoint run is asked to do, how it fails, and the bound on dirty pages per
epoch that the step budget guarantees (see :mod:`postcopy.checkpoint.primary`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

try:  # the guest's free-page swap period (pages written besides the step's own)
    from postcopy._native import lib as _lib

    FREE_PERIOD = int(_lib.PC_GUEST_FREE_PERIOD)
except (ImportError, AttributeError):  # pragma: no cover - the native helper is built at install
    FREE_PERIOD = 256

FREE_SWAP_PAGES = 3  # a free/reuse swap writes two page-table entries and zero-fills a page


class CheckpointError(RuntimeError):
    """Checkpointing could not start (guest, dirty log, standby); the message says why."""


@dataclass
class CheckpointConfig:
    """What ``postcopy checkpoint`` does; see :mod:`postcopy.checkpoint.primary`."""

    guest_control: str
    endpoint: tuple[str, int]
    key: bytes
    max_dirty: int = 256  # bound on pages dirtied per epoch
    epochs: int | None = None  # stop after this many epochs (None: no limit)
    seconds: float | None = None  # stop after this long in the epoch loop
    interval_ms: float | None = None  # also end an epoch after this long
    max_unacked: int = 4  # epochs sent but not yet acknowledged before the guest may run on
    # Send an epoch while the guest runs the next (its pages copied into a buffer first)
    # instead of while it is parked. None: with the native loop only. On 2 cores it pays
    # in C (the copy is ~15 µs per 64 pages, the send ~150 µs leaves the pause: measured
    # 1.2-1.4x the checkpoints/s at 64 pages) but not in Python, whose copy and
    # competition with the running guest cost more than they hide.
    overlap: bool | None = None
    dirty_log: str = "auto"
    # pagemap-scan without an interval: epochs through the guest's doorbell (shared
    # memory) instead of a control request each; False keeps the request (A/B, tests).
    doorbell: bool = True
    # With the doorbell and memfd RAM, the epochs after the first run in C
    # (native/ckpt_primary.c); False keeps them in Python (A/B, tests).
    native_loop: bool = True
    run_pages: int = 256  # pages per frame of the initial sync
    connect_timeout: float = 15.0
    ack_timeout: float = 30.0  # how long to wait for the standby's acknowledgements at the end
    heartbeat: float = 1.0  # seconds between Pings to the standby while an epoch runs long
    # Fault injection for tests: after this many epochs, send half of the next one and
    # drop the connection (the standby must keep the previous epoch).
    cut_mid_epoch: int | None = None
    on_commit: Callable[[int, list[int]], None] | None = None  # (epoch, steps) per ack


def steps_per_epoch(max_dirty: int, threads: int, free_fraction: float = 0.0) -> int:
    """Steps per vCPU per epoch such that an epoch dirties at most ``max_dirty`` pages:
    the state page, one page per step and vCPU, and with free pages up to
    FREE_SWAP_PAGES more every FREE_PERIOD steps. At least 1 (a bound below
    ``threads + 1`` cannot be met: :func:`bound_problem` says so)."""
    room = (max_dirty - 1) // max(1, threads)
    steps = max(1, room)
    if free_fraction > 0:
        while steps > 1 and steps + FREE_SWAP_PAGES * math.ceil(steps / FREE_PERIOD) > room:
            steps -= 1
    return steps


def bound_problem(max_dirty: int, threads: int, free_fraction: float = 0.0) -> str | None:
    """Why ``max_dirty`` cannot be guaranteed for this guest, or None."""
    worst = 1 + threads * (1 + (FREE_SWAP_PAGES if free_fraction > 0 else 0))
    if max_dirty < worst:
        return (f"--max-dirty {max_dirty} is below what one step of {threads} vCPU(s) can dirty "
                f"({worst} pages with the state page)")
    return None


class GuestLost(Exception):
    """The guest went away (or its RAM could not be read) during checkpointing."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause
