"""scripts/kernel-matrix: argument handling and the skip contract with .ci/run (exit 77
with a reason). Nothing here installs or boots anything."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
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
    assert "default: debian-6.1 debian-6.12" in r.stdout


def _reachable_by_everyone(path: str) -> bool:
    """Every directory from / down to path may be searched by others (o+x)."""
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in (p, *p.parents))


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
    if os.geteuid() != 0:  # as a user, the script sees a user already
        r = run()
    else:
        # Drop to nobody for the child, who may not be able to enter the checkout (root's
        # home is 0700): it runs a copy of the script from a directory anyone can reach.
        base = next((d for d in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm")
                     if os.path.isdir(d) and _reachable_by_everyone(d)), None)
        if base is None:
            pytest.skip("needs a temporary directory that the user nobody can reach, to run the script as nobody")
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            os.chmod(tmp, 0o755)
            copy = Path(tmp, "scripts", "kernel-matrix")
            copy.parent.mkdir(mode=0o755)
            shutil.copy(SCRIPT, copy)
            copy.chmod(0o755)
            r = subprocess.run([str(copy)], capture_output=True, text=True, timeout=30, cwd=tmp,
                               user=NOBODY, group=NOBODY, extra_groups=[])
    assert r.returncode == 77, r.stderr
    assert "SKIP: cannot boot a kernel on this machine: needs root" in r.stdout


def test_unknown_kernel_is_refused_before_installing_anything():
    r = run("not-a-kernel")
    assert r.returncode == 2
    assert "unknown kernel 'not-a-kernel'" in r.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_kernel_that_cannot_be_fetched_skips_with_77_and_the_reason(tmp_path):
    """Debian's archive unreachable (a closed port as mirror, an empty cache): exit 77
    naming the kernel and the apt failure, before any tool is installed."""
    if os.geteuid() != 0:
        pytest.skip("needs root: without it the script stops earlier, at the skip tested above")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("needs Debian's apt-get and dpkg: without them the script stops earlier, with 77")
    env = {**os.environ, "KM_MIRROR": f"http://127.0.0.1:{_closed_port()}", "KM_CACHE": str(tmp_path / "cache")}
    r = run("--out", str(tmp_path / "out"), "debian-6.12", env=env)
    assert r.returncode == 77, r.stdout + r.stderr
    assert "debian-6.12: cannot boot it here: cannot fetch Debian 13 6.12 standard kernel" in r.stdout
    assert "apt-get update of Debian's archive" in r.stdout
    assert "SKIP: cannot boot a kernel on this machine" in r.stdout
    assert not (tmp_path / "cache" / "kernels").exists() or not any((tmp_path / "cache" / "kernels").iterdir())
