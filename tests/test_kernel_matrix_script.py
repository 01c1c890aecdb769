"""scripts/kernel-matrix: argument handling and the skip contract with .ci/run (exit 77
with a reason). Nothing here installs or boots anything."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "kernel-matrix"
NOBODY = 65534


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=30, **kw)


def test_help_names_the_marker_selection_and_exits_zero():
    r = run("--help")
    assert r.returncode == 0
    assert 'pytest -m "softdirty or precopy"' in r.stdout
    assert "--exec CMD" in r.stdout and "--bench" in r.stdout


def test_unknown_option_is_a_usage_error():
    r = run("--no-such-option")
    assert r.returncode == 2
    assert "unknown option --no-such-option" in r.stderr


def test_bad_numbers_are_usage_errors():
    for args, word in ((("--timeout", "soon"), "--timeout"), (("--cpus", "0"), "--cpus"),
                       (("--memory", "lots"), "--memory"), (("--workers", "-1"), "--workers")):
        r = run(*args)
        assert r.returncode == 2, args
        assert word in r.stderr


def test_without_root_it_skips_with_77_and_names_why():
    # As root, drop to nobody for the child; as a user, the script sees a user already.
    kw = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
    r = run(**kw)
    assert r.returncode == 77
    assert "SKIP: cannot boot a kernel on this machine: needs root" in r.stdout


def test_unknown_kernel_is_refused_before_installing_anything():
    if os.geteuid() != 0:
        pytest.skip("needs root: without it the script stops earlier, at the skip tested above")
    r = run("not-a-kernel")
    assert r.returncode == 2
    assert "unknown kernel 'not-a-kernel'" in r.stderr
