"""Shared fixtures and skip helpers: a test that needs root or a kernel feature skips
with the feature's name as the reason."""
from __future__ import annotations

import os

import pytest


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_SYS_ADMIN for userfaultfd of kernel faults, netns, pagemap PFNs)")


def require_uffd() -> None:
    """Skip unless userfaultfd can be opened here."""
    require_root()
    from postcopy.uffd import Userfaultfd, UffdError

    try:
        Userfaultfd().close()
    except (UffdError, OSError) as exc:
        pytest.skip(f"needs userfaultfd (CONFIG_USERFAULTFD): {exc}")


def require_netns() -> None:
    """Skip unless network namespaces can be made here."""
    require_root()
    if not os.path.exists("/proc/self/ns/net"):
        pytest.skip("needs network namespaces (CONFIG_NET_NS)")
