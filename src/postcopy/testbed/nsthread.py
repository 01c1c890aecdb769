"""Entering network namespaces per thread: the setns/unshare syscalls, and running a
function in a short-lived helper thread that joins a namespace (the kernel keeps the
network namespace per thread, so the caller's thread never moves)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    _check(_c().setns(fd, _CLONE_NEWNET), "setns(CLONE_NEWNET)")


def unshare_net() -> None:
    """Give the calling thread a fresh network namespace (per thread, allowed when threaded)."""
    _check(_c().unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")


def ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def in_thread(fn: Callable[[], T], nsfd: int | None = None, patience: float = 10.0) -> T:
    """Run ``fn`` in a fresh thread, first joining the namespace ``nsfd`` if given.

    The thread dies afterwards, taking its namespace membership with it: nothing to undo.
    Python delivers signals to the main thread only, so ``fn`` itself is never cut short
    by Ctrl-C; the caller sees the KeyboardInterrupt once ``fn`` is done (or after
    ``patience`` seconds), so whatever ``fn`` made is recorded and can be cleaned up.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def body() -> None:
        try:
            if nsfd is not None:
                setns(nsfd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    # Waiting on our own Event, not Thread.join(): on 3.11 an interrupted join() can mark
    # a still-running thread as stopped (the bpo-45274 fix), and we would stop waiting.
    thread = threading.Thread(target=body, name="postcopy-netns", daemon=True)
    pending: BaseException | None = None
    deadline = None
    try:
        thread.start()  # waits for the thread to run: interruptible too
    except KeyboardInterrupt as exc:
        pending, deadline = exc, time.monotonic() + patience
    while not done.is_set():
        try:
            done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt as exc:
            pending, deadline = exc, time.monotonic() + patience
        if deadline is not None and time.monotonic() >= deadline:
            break
    if pending is not None:
        raise pending
    if "error" in box:
        raise box["error"]
    return box["value"]
