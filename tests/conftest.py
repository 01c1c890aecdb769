"""Shared fixtures and skip helpers: a test that needs root or a kernel feature skips
with the feature's name as the reason."""
from __future__ import annotations

import os

import pytest


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_SYS_ADMIN for userfaultfd of kernel faults, netns, pagemap PFNs)")
