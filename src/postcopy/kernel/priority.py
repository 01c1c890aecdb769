"""Scheduling priority for the threads on the demand-fault path.

A faulting vCPU waits on exactly these threads (the destination's fault server and
urgent receiver, the source's urgent server), while the pusher, the bulk installer and
the running vCPUs compete for the same CPUs. Giving the demand path a real-time
priority keeps a fault from queueing behind bulk work on a busy host."""
from __future__ import annotations

import os

URGENT_RT_PRIORITY = 10
# Bulk threads (pusher, bulk installer) get a lower real-time priority: above the vCPUs,
# so a bulk thread holding the GIL is not preempted by a vCPU while an urgent thread of
# the same process waits for that GIL (priority inversion through the GIL), and below
# the urgent threads, which preempt them.
BULK_RT_PRIORITY = 5


def _fifo(priority: int) -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (PermissionError, OSError, AttributeError):
        return False


def make_current_thread_urgent() -> bool:
    """SCHED_FIFO for the calling thread when allowed (root/CAP_SYS_NICE); returns
    whether it took effect. These threads block on I/O, so they cannot starve the host."""
    return _fifo(URGENT_RT_PRIORITY)


def make_current_thread_bulk() -> bool:
    """SCHED_FIFO below the urgent threads for a bulk thread (it blocks on its socket
    whenever the link is the bottleneck; the kernel's RT throttling bounds the rest)."""
    return _fifo(BULK_RT_PRIORITY)


def make_current_thread_normal() -> None:
    """Back to SCHED_OTHER (after the bulk phase)."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (PermissionError, OSError, AttributeError):
        pass
