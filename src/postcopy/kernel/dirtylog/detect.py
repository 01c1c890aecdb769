"""Which dirty-log backends work here: decided by trying them (the probes in
:mod:`postcopy.kernel.probes` exercise each feature on a scratch mapping), once per process.

Messages name the missing kernel feature, because that is what a user can act on.
"""
from __future__ import annotations

import threading

_lock = threading.Lock()
_cached: dict[str, str | None] | None = None

SOFT_DIRTY_MISSING = ("soft-dirty dirty log unavailable: this kernel lacks CONFIG_MEM_SOFT_DIRTY "
                      "(bit 55 never set after clear_refs)")
PAGEMAP_SCAN_MISSING = ("pagemap-scan dirty log unavailable: PAGEMAP_SCAN ioctl (Linux 6.7+) / "
                        "UFFD_FEATURE_WP_ASYNC missing")


def _soft_dirty_reason() -> str | None:
    from postcopy.kernel.probes import probe_soft_dirty

    probe = probe_soft_dirty()
    if probe.ok:
        return None
    if "CONFIG_MEM_SOFT_DIRTY" in probe.detail:
        return SOFT_DIRTY_MISSING
    return f"soft-dirty dirty log unavailable: {probe.detail} (needs CONFIG_MEM_SOFT_DIRTY and /proc/PID/clear_refs)"


def _pagemap_scan_reason() -> str | None:
    from postcopy.kernel.probes import probe_pagemap_scan

    probe = probe_pagemap_scan()
    return None if probe.ok else f"{PAGEMAP_SCAN_MISSING} ({probe.detail})"


def backend_reasons(*, refresh: bool = False) -> dict[str, str | None]:
    """Backend name -> None if the kernel offers it, else why not."""
    global _cached
    with _lock:
        if _cached is None or refresh:
            # Only a probe's verdict (the kernel refused the feature) means unavailable;
            # anything a probe raises (a broken build, an ImportError, a bug) propagates,
            # so it fails loudly instead of reading as a missing kernel feature.
            _cached = {"soft-dirty": _soft_dirty_reason(),
                       "pagemap-scan": _pagemap_scan_reason()}
        return dict(_cached)


def guest_reason(name: str, status: dict, info: dict) -> str | None:
    """Why backend ``name`` cannot track this guest (``status`` is its status reply,
    ``info`` its fds/status reply), or None. Kernel features first, then the guest."""
    reason = backend_reasons()[name]
    if reason is not None:
        return reason
    if name == "pagemap-scan":
        if status.get("uffd"):
            return ("pagemap-scan dirty log unavailable for this guest: its RAM is registered with a "
                    "missing-mode userfaultfd (an incoming guest), and a VMA takes only one userfaultfd "
                    "context; track the source guest instead")
        if info.get("backing", status.get("backing")) == "memfd":
            from postcopy.kernel.uffd import Feature, supported_features

            if not supported_features() & Feature.WP_HUGETLBFS_SHMEM:
                return ("pagemap-scan dirty log unavailable for memfd guest RAM: "
                        "UFFD_FEATURE_WP_HUGETLBFS_SHMEM missing (write-protect of shmem)")
    if status.get("state") == "incoming":
        return f"{name} dirty log: the guest is incoming (its RAM has not arrived): nothing to track"
    return None
