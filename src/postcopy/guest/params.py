"""What a guest is made of: workloads, RAM backings, boot parameters, and why a set of
them cannot make a guest (checked before any RAM is mapped)."""
from __future__ import annotations

import mmap
from dataclasses import dataclass

from postcopy._native import ffi, lib

WORKLOADS: dict[str, int] = {"idle": 0, "random-write": 1, "sequential": 2, "hotspot": 3}
WORKLOAD_NAMES = {v: k for k, v in WORKLOADS.items()}
BACKINGS = ("memfd", "anon")
MAX_THREADS: int = lib.PC_GUEST_MAX_THREADS
PAGE_SIZE: int = mmap.PAGESIZE
_UNLIMITED = (1 << 64) - 1

_CHECK_ERRORS = {
    lib.PC_GUEST_EBADMAGIC: "the state page holds no guest (bad magic)",
    lib.PC_GUEST_EVERSION: "the state page has another layout version",
    lib.PC_GUEST_ESIZE: "RAM size or page size differs from the state page's",
    lib.PC_GUEST_ETHREADS: f"thread count must be 1..{MAX_THREADS}",
    lib.PC_GUEST_EWORKLOAD: "unknown workload",
    lib.PC_GUEST_ELAYOUT: "RAM is too small for the layout (state page, shared slice, one page per thread)",
    lib.PC_GUEST_EPARAM: "bad parameter (working set must be in (0, 1], free fraction in [0, 1), rate >= 0)",
}


class GuestStateError(RuntimeError):
    """A request that the guest cannot honour in its current state (or with these
    arguments); reported to the control client as ``{"ok": false, "error": ...}``."""


@dataclass(frozen=True)
class BootParams:
    """What a fresh guest writes into its state page."""

    threads: int
    workload: str
    seed: int
    steps: int | None = None
    rate: float = 0.0
    working_set: float = 1.0
    free_fraction: float = 0.0


def layout_error(ram: int, threads: int, workload: str, working_set: float,
                 free_fraction: float = 0.0) -> str | None:
    """Why these parameters cannot make a guest, or None if they can."""
    if workload not in WORKLOADS:
        return f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})"
    if ram <= 0 or ram % PAGE_SIZE:
        return f"RAM size {ram} is not a positive multiple of the page size ({PAGE_SIZE})"
    if not 1 <= threads <= MAX_THREADS:
        return f"--threads must be 1..{MAX_THREADS}"
    if not 0.0 < working_set <= 1.0:
        return "--working-set must be a fraction in (0, 1]"
    if not 0.0 <= free_fraction < 1.0:
        return "--free-fraction must be a fraction in [0, 1)"
    info = ffi.new("struct pc_guest_info *")
    rc = lib.pc_guest_layout(ram, PAGE_SIZE, threads, WORKLOADS[workload], working_set, free_fraction, info)
    if rc == lib.PC_GUEST_ELAYOUT:
        shared = max(PAGE_SIZE, min(ram // 16, 1 << 20) // PAGE_SIZE * PAGE_SIZE)
        per_thread = 2 if free_fraction > 0 else 1
        need = PAGE_SIZE + shared + threads * per_thread * PAGE_SIZE
        return (f"RAM {ram} bytes is too small for {threads} thread(s): needs at least {need} "
                f"(state page, shared slice, {per_thread} page(s) per thread)")
    if rc:
        return _CHECK_ERRORS.get(rc, f"layout error {rc}")
    return None


def incoming_options_error(backing: str, *, incoming: bool, uffd_minor: bool, staging_pages: int) -> str | None:
    """Why these incoming-guest install options do not fit, or None. (Kernel features
    are checked when the userfaultfd is opened: its error names the missing one.)"""
    if (uffd_minor or staging_pages) and not incoming:
        return "--uffd-minor and --staging-pages only apply to an --incoming guest"
    if uffd_minor and backing != "memfd":
        return ("--uffd-minor (UFFDIO_CONTINUE install path) needs memfd backing: minor faults exist only "
                "for pages already in a shmem/hugetlbfs page cache (Feature.MINOR_SHMEM)")
    if staging_pages < 0:
        return "--staging-pages must be >= 0"
    if staging_pages and backing != "anon":
        return ("--staging-pages (UFFDIO_MOVE install path) needs anon backing: UFFDIO_MOVE moves only "
                "private anonymous pages")
    if uffd_minor and staging_pages:
        return "--uffd-minor and --staging-pages are two different install paths: pick one"
    return None
