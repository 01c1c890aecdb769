"""``postcopy doctor`` and the probes behind it."""
from __future__ import annotations

import json
import mmap
import os

import pytest

from conftest import require_root
from postcopy.kernel import doctor
from postcopy.kernel import probes
from postcopy.cli import main
from postcopy.kernel.probes import Probe
from postcopy.kernel.uffd import Feature, UffdError, address_of, supported_features


def run_json(capsys) -> tuple[int, dict]:
    rc = main(["doctor", "--json"])
    return rc, json.loads(capsys.readouterr().out)


def kernel_has_soft_dirty() -> bool:
    """Independent evidence: with CONFIG_MEM_SOFT_DIRTY every new mapping carries
    VM_SOFTDIRTY, shown as "sd" in its smaps VmFlags."""
    m = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        addr = address_of(m)
        inside = False
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line
                    lo, hi = (int(x, 16) for x in first.split("-"))
                    inside = lo <= addr < hi
                elif inside and first == "VmFlags:":
                    return "sd" in line.split()[1:]
    finally:
        m.close()
    raise AssertionError("new mapping not found in /proc/self/smaps")


def children() -> set[int]:
    """Pids of this process's children (alive or zombie)."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == me:
                found.add(int(entry))
    return found


def test_json_lists_every_probe_with_its_fields(capsys):
    rc, report = run_json(capsys)
    assert set(report) == {"probes", "kernel"}
    assert report["kernel"] == os.uname().release
    names = [p["name"] for p in report["probes"]]
    assert len(names) == len(set(names))
    for p in report["probes"]:
        assert set(p) == {"name", "ok", "detail", "disables"}
        assert isinstance(p["ok"], bool) and p["detail"]
    for name in ("root", "uffd_syscall", "uffd_dev", "uffd_api", "soft_dirty", "pagemap_scan",
                 "uffdio_move", "minor_shmem", "kvm", "netns", "cap_sys_ptrace"):
        assert name in names
    assert {f"uffd_feature_{f.name.lower()}" for f in Feature} <= set(names)
    by_name = {p["name"]: p for p in report["probes"]}
    assert rc == (0 if by_name["uffd_api"]["ok"] else 1)


def test_soft_dirty_reported_missing_here(capsys):
    if kernel_has_soft_dirty():
        pytest.skip("this kernel has CONFIG_MEM_SOFT_DIRTY: the soft-dirty probe passes here")
    _, report = run_json(capsys)
    soft = next(p for p in report["probes"] if p["name"] == "soft_dirty")
    assert soft["ok"] is False
    assert "CONFIG_MEM_SOFT_DIRTY" in soft["detail"]
    assert "pagemap-scan" in soft["disables"]


def test_soft_dirty_probe_agrees_with_the_kernel():
    assert probes.probe_soft_dirty().ok == kernel_has_soft_dirty()


def test_pagemap_scan_reported_working_here(capsys):
    require_root()
    try:
        if not supported_features() & Feature.WP_ASYNC:
            pytest.skip("kernel lacks UFFD_FEATURE_WP_ASYNC: no PAGEMAP_SCAN write tracking")
    except UffdError as exc:
        pytest.skip(f"needs userfaultfd: {exc}")
    _, report = run_json(capsys)
    scan = next(p for p in report["probes"] if p["name"] == "pagemap_scan")
    assert scan["ok"] is True, scan["detail"]


def test_feature_probes_match_negotiation():
    try:
        offered = supported_features()
    except UffdError as exc:
        pytest.skip(f"needs userfaultfd: {exc}")
    result = {p.name: p.ok for p in probes.probe_uffd_features()}
    assert result == {f"uffd_feature_{f.name.lower()}": bool(offered & f) for f in Feature}


def test_text_output_marks_failures_with_what_they_disable(monkeypatch, capsys):
    fake = [Probe("uffd_api", True, "works", "userfaultfd altogether"),
            Probe("soft_dirty", False, "bit 55 never set", "soft-dirty dirty log unavailable"),
            Probe("pagemap_scan", True, "found them", "pagemap-scan dirty log unavailable")]
    monkeypatch.setattr(doctor, "all_probes", lambda: fake)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"postcopy doctor: Linux {os.uname().release}"
    assert out[1].split()[:2] == ["OK", "uffd_api"]
    assert out[2].split()[:2] == ["NO", "soft_dirty"]
    assert out[3].strip() == "-> soft-dirty dirty log unavailable"
    assert "precopy dirty log: pagemap-scan" in out


def test_exit_status_1_only_when_userfaultfd_is_unusable(monkeypatch, capsys):
    fake = [Probe("uffd_api", False, "userfaultfd: Operation not permitted", "userfaultfd altogether"),
            Probe("kvm", True, "KVM_GET_API_VERSION = 12", "")]
    monkeypatch.setattr(doctor, "all_probes", lambda: fake)
    assert main(["doctor", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["probes"][0]["ok"] is False


def test_a_crashing_probe_is_reported_not_raised():
    def boom() -> Probe:
        raise RuntimeError("no such thing")

    (result,) = probes._guard("boom", boom)
    assert result.name == "boom" and not result.ok and "no such thing" in result.detail


def test_netns_probe_leaves_no_child_behind():
    require_root()
    before = children()
    result = probes.probe_netns()
    assert result.name == "netns"
    assert children() <= before  # the probe's child was reaped
    if not result.ok:
        pytest.skip(f"network namespaces unavailable: {result.detail}")
