"""Dirty-log detection: only a probe's verdict means "unavailable"; a probe that
raises (a broken build, a bug) is an error, never a silent skip."""
from __future__ import annotations

import pytest

from postcopy.kernel import probes
from postcopy.kernel.dirtylog import detect


def test_probe_exception_propagates(monkeypatch):
    def broken():
        raise ImportError("No module named postcopy._native")

    monkeypatch.setattr(probes, "probe_soft_dirty", broken)
    try:
        with pytest.raises(ImportError, match="_native"):
            detect.backend_reasons(refresh=True)
    finally:
        monkeypatch.undo()
        detect.backend_reasons(refresh=True)


def test_probe_refusal_means_unavailable(monkeypatch):
    refused = probes.Probe("soft_dirty", False, "bit 55 never set: kernel built without CONFIG_MEM_SOFT_DIRTY", "")
    monkeypatch.setattr(probes, "probe_soft_dirty", lambda: refused)
    try:
        reasons = detect.backend_reasons(refresh=True)
        assert reasons["soft-dirty"] == detect.SOFT_DIRTY_MISSING
    finally:
        monkeypatch.undo()
        detect.backend_reasons(refresh=True)
