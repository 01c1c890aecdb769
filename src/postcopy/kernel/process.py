"""Small facts about processes, by asking the kernel, and tying a child's life to its parent's."""
from __future__ import annotations

import os


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid exists (ours or not; a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGKILL when its parent dies (PR_SET_PDEATHSIG),
    and exits at once if the parent died before that was set. (The agent forks from
    its main thread, which lives as long as the agent: the signal follows the thread.)"""
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    pr_set_pdeathsig = 1

    def child() -> None:
        if prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return child
