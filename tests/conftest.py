"""Shared fixtures and skip helpers: a test that needs root or a kernel feature skips
with the feature's name as the reason."""
from __future__ import annotations

import os
import subprocess

import pytest

import postcopy
# A broken build is an error, never a skip: every test needs the native helper.
import postcopy._native  # noqa: F401
from postcopy.guest import GuestParams, wait_for_control

# The suite tests the installed package (scripts/setup-venv installs it, not editable);
# the src/ layout keeps the checkout off sys.path, and this makes sure of it.
_TREE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if os.path.abspath(postcopy.__file__).startswith(_TREE + os.sep) and not os.environ.get("POSTCOPY_TEST_TREE"):
    raise pytest.UsageError(f"postcopy was imported from the checkout ({postcopy.__file__}), not the installed "
                            "package: run scripts/test (or set POSTCOPY_TEST_TREE=1 for an editable install)")


# Under scripts/kernel-matrix everything runs in software emulation, 5-40x slower
# (starting Python alone takes seconds): rate-limited guests run this much longer
# there, so they are still running when the (slow) agents attach.
SLOWDOWN = 10 if os.environ.get("POSTCOPY_KERNEL_MATRIX") else 1


def pid_gone(pid: int) -> bool:
    """True if ``pid`` is dead: gone, or a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_SYS_ADMIN for userfaultfd of kernel faults, netns, pagemap PFNs)")


def require_uffd() -> None:
    """Skip unless userfaultfd can be opened here."""
    require_root()
    from postcopy.kernel.uffd import Userfaultfd, UffdError

    try:
        Userfaultfd().close()
    except (UffdError, OSError) as exc:
        pytest.skip(f"needs userfaultfd (CONFIG_USERFAULTFD): {exc}")


def require_netns() -> None:
    """Skip unless network namespaces can be made here."""
    require_root()
    if not os.path.exists("/proc/self/ns/net"):
        pytest.skip("needs network namespaces (CONFIG_NET_NS)")


@pytest.fixture
def launch(tmp_path):
    """Start guests with a control socket in tmp_path; all are killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(params: GuestParams, name: str = "g", **kw) -> tuple[subprocess.Popen, str]:
        sock = str(tmp_path / f"{name}.sock")
        proc = subprocess.Popen(params.argv(control=sock, **kw), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        wait_for_control(sock, proc=proc)  # the one start timeout: Python starts slowly under emulation
        return proc, sock

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def bed():
    """A fresh two-namespace testbed (needs root, netns and userfaultfd)."""
    require_netns()
    require_uffd()
    from postcopy.testbed.netns import Testbed

    with Testbed() as testbed:
        yield testbed
