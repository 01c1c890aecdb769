"""Install paths besides UFFDIO_COPY: ``continue`` (memfd page cache + UFFDIO_CONTINUE
on minor faults; also with the destination's RAM allocated first, ``--prealloc``) and
``move`` (staging in the guest + UFFDIO_MOVE), each migrating a running guest verified
against the reference hash; and the refusals of combinations that cannot work."""
from __future__ import annotations

import subprocess
import sys

import pytest

from postcopy.testbed.demo import DemoError, DemoOptions, run_demo
from postcopy.guest import GuestParams
from postcopy.migration.install import install_path_error
from postcopy.kernel.uffd import Feature
from conftest import require_netns, require_uffd

BACKING = {"continue": "memfd", "move": "anon"}


def require_path(path: str) -> None:
    require_netns()
    require_uffd()
    error = install_path_error(path, BACKING[path])
    if error:
        pytest.skip(error)  # names the missing userfaultfd feature


def migrate(install: str, mode: str, port: int, prealloc: bool = False) -> dict:
    params = GuestParams(ram=16 << 20, threads=2, workload="random-write", seed=7, steps=300_000, rate=100_000,
                         backing=BACKING[install])
    # park_at: on a busy host the guest parks near its end rather than finish before the switchover.
    return run_demo(DemoOptions(params=params, migrate_after=0.2, port=port, mode=mode, install=install,
                                prealloc=prealloc, park_at=params.steps - 1000))


@pytest.mark.parametrize("variant", ["continue", "continue+prealloc", "move"])
@pytest.mark.parametrize("mode", ["postcopy", "hybrid"])
def test_install_path_migrates_verified(variant, mode):
    install, prealloc = variant.split("+")[0], variant.endswith("+prealloc")
    require_path(install)
    report = migrate(install, mode, port=7030, prealloc=prealloc)
    assert report["install"] == install
    assert report["dest"]["install"] == install
    # --prealloc: the guest's RAM was populated (before the pause); the pages it held as
    # zeros were never shown to the guest before their bytes arrived (the hash says so).
    assert (report["dest"]["prealloc_ms"] is not None) == prealloc
    received = report["dest"]["data_frames_received_in_c"]
    if install == "continue":  # received in C (native/dp_recv_cont.c): pushed runs, and demand runs
        assert received["main"] > 0 and (mode == "hybrid" or received["urgent"] > 0), received
    else:
        assert received == {}  # move: received in Python
    assert report["final_hash"] is not None
    assert report["final_hash"] == report["reference_hash"], report
    assert report["verified"] is True
    pages = report["pages"]
    if mode == "postcopy":
        # Every page accounted for exactly once, by exactly one cause.
        assert sum(pages.values()) == report["ram_bytes"] // 4096, pages
        assert pages["demand"] > 0  # faults were served through this path too
    else:
        assert pages["precopy"] > 0


def test_copy_is_the_default_and_reported():
    require_netns()
    require_uffd()
    params = GuestParams(ram=8 << 20, threads=1, workload="sequential", seed=3, steps=150_000, rate=50_000)
    report = run_demo(DemoOptions(params=params, migrate_after=0.2, port=7031, park_at=params.steps - 1000))
    assert report["install"] == "copy" and report["verified"] is True
    received = report["dest"]["data_frames_received_in_c"]
    assert received["main"] > 0 and received["urgent"] > 0, received  # pushed runs, and demand runs


@pytest.mark.parametrize("install, backing, needs", [("move", "memfd", "anon backing"),
                                                     ("continue", "anon", "memfd backing")])
def test_demo_refuses_wrong_backing_before_starting(install, backing, needs):
    params = GuestParams(ram=8 << 20, threads=1, workload="idle", seed=1, steps=10, backing=backing)
    with pytest.raises(DemoError, match=needs):
        run_demo(DemoOptions(params=params, install=install))


@pytest.mark.parametrize("install, backing", [("copy", "memfd"), ("move", "anon")])
def test_prealloc_is_refused_off_the_continue_path_before_starting(install, backing):
    params = GuestParams(ram=8 << 20, threads=1, workload="idle", seed=1, steps=10, backing=backing)
    with pytest.raises(DemoError, match=f"--prealloc needs --install continue, not {install}"):
        run_demo(DemoOptions(params=params, install=install, prealloc=True))
    assert install_path_error("continue", "memfd", Feature.MINOR_SHMEM, prealloc=True) is None


@pytest.mark.parametrize("install, feature", [("continue", "MINOR_SHMEM"), ("move", "MOVE")])
def test_kernel_without_the_feature_is_refused_by_name(install, feature):
    everything_but = Feature(sum(int(f) for f in Feature)) & ~Feature[feature]
    error = install_path_error(install, BACKING[install], everything_but)
    assert error is not None and f"UFFD_FEATURE_{feature}" in error
    assert install_path_error(install, BACKING[install], Feature[feature]) is None
    assert install_path_error("copy", "anon", Feature(0)) is None


def test_dest_cli_refuses_with_a_clear_error(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    proc = subprocess.run([sys.executable, "-m", "postcopy", "dest", "--listen", "127.0.0.1:1", "--key-file",
                           str(key), "--backing", "anon", "--install", "continue"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "install path 'continue' needs memfd backing" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "postcopy", "dest", "--listen", "127.0.0.1:1", "--key-file",
                           str(key), "--prealloc"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--prealloc needs --install continue, not copy" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--backing", "anon", "--uffd-minor"], "--uffd-minor (UFFDIO_CONTINUE install path) needs memfd backing"),
    (["--backing", "memfd", "--staging-pages", "16"], "--staging-pages (UFFDIO_MOVE install path) needs anon"),
])
def test_incoming_guest_refuses_mismatched_options(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "-m", "postcopy", "guest", "--incoming", "--ram", "1M",
                           "--control", str(tmp_path / "g.sock"), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
