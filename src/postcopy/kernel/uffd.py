"""Pythonic userfaultfd over the native layer (``native/uffd_ops.c``).

One :class:`Userfaultfd` per descriptor: open + ``UFFDIO_API`` feature negotiation,
register ranges, install pages (``copy``, ``zeropage``, ``continue_``, ``move``,
``poison``), wake waiters, write-protect, and read fault events in batches.

Kernel semantics the API keeps visible rather than hiding:

* A filling ioctl may do part of its range: ``copy`` returns the bytes it installed,
  possibly fewer than asked (the kernel stopped at a page that already exists, or a
  non-cooperative event is pending).  The caller continues at ``dst + n``; if the page
  there exists it gets :class:`PageExistsError`.
* :class:`PageExistsError` (EEXIST at the first page) means the copy installed nothing,
  so it woke nobody: a thread faulting on that page still waits until :meth:`wake`.
* :class:`MappingChangedError` (ENOENT, or EAGAIN with nothing done) means the range is
  no longer registered or the address space is changing (fork, mremap, munmap,
  madvise): read the pending events before retrying.

Every native call releases the GIL and returns ``-errno`` instead of touching a shared
``errno``, so one object can be used from a fault-server thread and a pusher thread at
once.  Python code must not touch registered, missing memory itself while a Python
handler needs the GIL (a deadlock): use the ``pc_mem_*`` helpers or another process.
"""
from __future__ import annotations

import enum
import errno as _errno
import math
import mmap
import os
import time
from dataclasses import dataclass

from postcopy.kernel.fdowner import FdOwner
from postcopy._native import ffi as _ffi, lib as _lib

PAGE_SIZE: int = mmap.PAGESIZE
_PAGE_MASK = ~(PAGE_SIZE - 1)
_NULL = _ffi.NULL

# ioctl mode bits (include/uapi/linux/userfaultfd.h); ABI, stable across kernels.
_COPY_DONTWAKE = 1 << 0
_COPY_WP = 1 << 1
_ZEROPAGE_DONTWAKE = 1 << 0
_WP_MODE_WP = 1 << 0
_WP_MODE_DONTWAKE = 1 << 1
_CONTINUE_DONTWAKE = 1 << 0
_MOVE_DONTWAKE = 1 << 0
_MOVE_ALLOW_SRC_HOLES = 1 << 1
_POISON_DONTWAKE = 1 << 0

_FLAG_WRITE = 1 << 0
_FLAG_WP = 1 << 1
_FLAG_MINOR = 1 << 2

_O_NONBLOCK = os.O_NONBLOCK


class UffdError(OSError):
    """A userfaultfd operation failed; ``errno`` is the kernel's, ``op`` names the call."""

    def __init__(self, err: int, op: str, detail: str = "") -> None:
        message = f"{op}: {os.strerror(err)}" + (f" ({detail})" if detail else "")
        super().__init__(err, message)
        self.op = op


class PageExistsError(UffdError):
    """EEXIST at the first page: nothing was installed and nobody was woken."""


class MappingChangedError(UffdError):
    """ENOENT, or EAGAIN with nothing done: the mapping went away or is changing."""


class Feature(enum.IntFlag):
    """``UFFD_FEATURE_*`` bits negotiated by ``UFFDIO_API``."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


class Mode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class EventKind(enum.Enum):
    """``UFFD_EVENT_*``."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


_KINDS = {kind.value: kind for kind in EventKind}


@dataclass(frozen=True, slots=True)
class Event:
    """One message read from the userfaultfd.

    * PAGEFAULT: ``address`` is the faulting page, page-aligned here (unless
      ``Feature.EXACT_ADDRESS`` was negotiated), ``end`` is 0; ``write``/``wp``/``minor``
      decode ``flags``; ``thread_id`` is set with ``Feature.THREAD_ID``, else 0.
    * REMOVE / UNMAP: ``[address, end)`` is the range zapped (madvise DONTNEED/REMOVE)
      or unmapped.
    * REMAP (mremap): ``address`` is the old start, ``end`` the new start and
      ``length`` the length moved.
    * FORK: ``fd`` is the child's new userfaultfd, now open in this process.
    """

    kind: EventKind
    address: int
    end: int
    flags: int
    thread_id: int
    write: bool
    wp: bool
    minor: bool
    length: int = 0
    fd: int = -1


def address_of(buffer) -> int:
    """Address of the first byte of a buffer (bytes, bytearray, mmap, memoryview...).

    Read-only buffers are accepted.  The address stays valid only while ``buffer`` is
    alive and not resized or closed: keep a reference for as long as you use it.
    """
    return int(_ffi.cast("uintptr_t", _ffi.from_buffer(buffer)))


_supported: Feature | None = None


def supported_features() -> Feature:
    """Features this kernel offers (probed once with a throwaway descriptor, cached).

    Raises :class:`UffdError` if no userfaultfd can be opened at all.
    """
    global _supported
    if _supported is None:
        fd = _open(nonblock=True)[0]
        try:
            out = _ffi.new("uint64_t *")
            rc = _lib.pc_uffd_api(fd, 0, out, _NULL)
            if rc < 0:
                raise UffdError(-rc, "UFFDIO_API")
            _supported = Feature(out[0] & _known_bits())
        finally:
            os.close(fd)
    return _supported


def _known_bits() -> int:
    return sum(int(f) for f in Feature)


def _names(features: Feature) -> str:
    return ", ".join(f.name for f in Feature if f & features) or "none"


_VIA = {
    _lib.PC_UFFD_VIA_SYSCALL: "userfaultfd(2)",
    _lib.PC_UFFD_VIA_DEV: "/dev/userfaultfd",
    _lib.PC_UFFD_VIA_SYSCALL_USER_ONLY: "userfaultfd(2) with UFFD_USER_MODE_ONLY",
}


def _open(nonblock: bool) -> tuple[int, str]:
    how = _ffi.new("int *")
    fd = _lib.pc_uffd_open(1 if nonblock else 0, how)
    if fd < 0:
        hint = ""
        if -fd == _errno.EPERM:
            hint = "needs CAP_SYS_PTRACE, access to /dev/userfaultfd or vm.unprivileged_userfaultfd=1"
        elif -fd == _errno.ENOSYS:
            hint = "kernel built without CONFIG_USERFAULTFD"
        raise UffdError(-fd, "userfaultfd", hint)
    return fd, _VIA.get(how[0], "userfaultfd(2)")


class Userfaultfd(FdOwner):
    """A userfaultfd descriptor with its negotiated features.

    ``features`` are required (missing ones raise :class:`UffdError` naming them),
    ``optional`` ones are taken when the kernel offers them.  ``nonblock`` opens with
    O_NONBLOCK, which :meth:`read_events` needs for timeouts (the kernel answers poll
    on a blocking userfaultfd with POLLERR).
    """

    _EVBUF = 64  # events per pooled buffer; larger reads get their own buffer

    def __init__(self, features: Feature = Feature(0), *, optional: Feature = Feature(0),
                 nonblock: bool = True) -> None:
        self._fd = -1
        features = Feature(features)
        supported = supported_features()
        missing = features & ~supported
        if missing:
            raise UffdError(_errno.EOPNOTSUPP, "UFFDIO_API",
                            f"kernel lacks required userfaultfd feature(s): {_names(missing)}")
        want = features | (Feature(optional) & supported)
        fd, via = _open(nonblock)
        out = _ffi.new("uint64_t[2]")
        rc = _lib.pc_uffd_api(fd, int(want), out, out + 1)
        if rc == -_errno.EPERM and (want & Feature.EVENT_FORK) and not (features & Feature.EVENT_FORK):
            # EVENT_FORK needs CAP_SYS_PTRACE; UFFDIO_API is one-shot, so start over.
            os.close(fd)
            want &= ~Feature.EVENT_FORK
            fd, via = _open(nonblock)
            rc = _lib.pc_uffd_api(fd, int(want), out, out + 1)
        if rc < 0:
            os.close(fd)
            detail = f"requested {_names(want)}"
            if -rc == _errno.EPERM and want & Feature.EVENT_FORK:
                detail += "; EVENT_FORK needs CAP_SYS_PTRACE"
            raise UffdError(-rc, "UFFDIO_API", detail)
        if want & Feature.WP_ASYNC:
            want |= Feature.WP_UNPOPULATED  # the kernel implies it
        self._init(fd, want, nonblock, via, int(out[1]))

    def _init(self, fd: int, features: Feature, nonblock: bool, via: str, ioctls: int) -> None:
        self._fd = fd
        self.features: Feature = features
        self.nonblock = nonblock
        self.opened_via = via
        self.api_ioctls = ioctls
        self._align = _PAGE_MASK if not features & Feature.EXACT_ADDRESS else -1
        self._pool: list = []

    @classmethod
    def from_fd(cls, fd: int, features: Feature) -> "Userfaultfd":
        """Wrap a descriptor received over SCM_RIGHTS; its creator did UFFDIO_API with
        ``features``.  The object owns ``fd`` from now on (``close`` closes it)."""
        import fcntl

        self = cls.__new__(cls)
        nonblock = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & _O_NONBLOCK)
        self._init(fd, Feature(features), nonblock, "received descriptor", 0)
        return self

    # -- descriptor ------------------------------------------------------------------
    def fileno(self) -> int:
        """The descriptor number (for select/poll or SCM_RIGHTS)."""
        if self._fd < 0:
            raise ValueError("userfaultfd is closed")
        return self._fd


    @property
    def user_mode_only(self) -> bool:
        """True when opened with UFFD_USER_MODE_ONLY (no CAP_SYS_PTRACE): faults the
        kernel takes on the process's behalf (read(2) into missing RAM) get EFAULT."""
        return self.opened_via == _VIA[_lib.PC_UFFD_VIA_SYSCALL_USER_ONLY]





    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Userfaultfd {state} features={_names(self.features)}>"

    # -- ranges ----------------------------------------------------------------------
    def register(self, addr: int, length: int, mode: Mode) -> int:
        """UFFDIO_REGISTER; returns the bitmask of ioctls usable on the range
        (bit ``_UFFDIO_COPY`` = 3, ``_UFFDIO_MOVE`` = 5, ...)."""
        out = _ffi.new("uint64_t *")
        rc = _lib.pc_uffd_register(self._fd, addr, length, int(mode), out)
        if rc < 0:
            raise UffdError(-rc, "UFFDIO_REGISTER", f"0x{addr:x}+{length:#x} mode {Mode(mode).name}")
        return int(out[0])

    def unregister(self, addr: int, length: int) -> None:
        """UFFDIO_UNREGISTER, then UFFDIO_WAKE over the range: no thread stays asleep
        on a fault in it. The kernel's own wake comes before it clears the range, and a
        fault taken under a per-VMA lock can queue in between: seen here as a vCPU asleep
        in handle_userfault for good on an unregistered range (a zero page touched as the
        last pages came in). Woken, it faults again as an ordinary page fault."""
        rc = _lib.pc_uffd_unregister(self._fd, addr, length)
        if rc < 0:
            raise UffdError(-rc, "UFFDIO_UNREGISTER", f"0x{addr:x}+{length:#x}")
        self.wake(addr, length)

    def wake(self, addr: int, length: int) -> None:
        """UFFDIO_WAKE: release threads waiting on faults in the range."""
        rc = _lib.pc_uffd_wake(self._fd, addr, length)
        if rc < 0:
            raise UffdError(-rc, "UFFDIO_WAKE", f"0x{addr:x}+{length:#x}")

    def writeprotect(self, addr: int, length: int, *, protect: bool, wake: bool = True) -> None:
        """UFFDIO_WRITEPROTECT.  Unprotecting wakes the range's waiters unless
        ``wake=False``; protecting never wakes anyone (the kernel rejects DONTWAKE there)."""
        mode = _WP_MODE_WP if protect else (0 if wake else _WP_MODE_DONTWAKE)
        rc = _lib.pc_uffd_writeprotect(self._fd, addr, length, mode)
        if rc < 0:
            raise UffdError(-rc, "UFFDIO_WRITEPROTECT", f"0x{addr:x}+{length:#x} protect={protect}")

    # -- filling ioctls: bytes done (maybe partial) or an exception --------------------
    def copy(self, dst: int, src, length: int, *, wake: bool = True, wp: bool = False) -> int:
        """UFFDIO_COPY ``length`` bytes from ``src`` (an address or a buffer) to ``dst``.

        Returns the bytes installed, which may be fewer than ``length``: continue at
        ``dst + n`` (you will see :class:`PageExistsError` there if that page exists).
        Only installed pages are woken.
        """
        mode = (0 if wake else _COPY_DONTWAKE) | (_COPY_WP if wp else 0)
        if src.__class__ is int:
            n = _lib.pc_uffd_copy(self._fd, dst, src, length, mode, _NULL)
        else:
            view = _ffi.from_buffer(src)  # pins src for the call
            if len(view) < length:
                raise ValueError(f"copy source holds {len(view)} bytes, {length} requested")
            n = _lib.pc_uffd_copy(self._fd, dst, int(_ffi.cast("uintptr_t", view)), length, mode, _NULL)
        if n > 0:
            return n
        raise _fill_error("UFFDIO_COPY", n, dst, length)

    def zeropage(self, addr: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map zero pages; same contract as :meth:`copy`."""
        n = _lib.pc_uffd_zeropage(self._fd, addr, length, 0 if wake else _ZEROPAGE_DONTWAKE, _NULL)
        if n > 0:
            return n
        raise _fill_error("UFFDIO_ZEROPAGE", n, addr, length)

    def continue_(self, addr: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_CONTINUE (minor faults): map the page-cache pages already in the
        shmem/hugetlbfs file; same contract as :meth:`copy`."""
        n = _lib.pc_uffd_continue(self._fd, addr, length, 0 if wake else _CONTINUE_DONTWAKE, _NULL)
        if n > 0:
            return n
        raise _fill_error("UFFDIO_CONTINUE", n, addr, length)

    def move(self, dst: int, src: int, length: int, *, wake: bool = True,
             allow_src_holes: bool = False) -> int:
        """UFFDIO_MOVE (Feature.MOVE): move anonymous pages from ``src`` to ``dst``
        without copying.  ``src`` must be exclusive anonymous memory of the same
        process; unmapped source pages fail with ENOENT unless ``allow_src_holes``."""
        mode = (0 if wake else _MOVE_DONTWAKE) | (_MOVE_ALLOW_SRC_HOLES if allow_src_holes else 0)
        n = _lib.pc_uffd_move(self._fd, dst, src, length, mode, _NULL)
        if n > 0:
            return n
        if n == -_errno.ENOENT:
            raise UffdError(_errno.ENOENT, "UFFDIO_MOVE",
                            f"0x{src:x}+{length:#x}: source page missing or mapping gone"
                            " (allow_src_holes=True skips holes)")
        raise _fill_error("UFFDIO_MOVE", n, dst, length)

    def poison(self, addr: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_POISON (Feature.POISON): mark pages as lost; a later access gets
        SIGBUS as for a hardware memory error.  Same contract as :meth:`copy`."""
        n = _lib.pc_uffd_poison(self._fd, addr, length, 0 if wake else _POISON_DONTWAKE, _NULL)
        if n > 0:
            return n
        raise _fill_error("UFFDIO_POISON", n, addr, length)

    # -- events ----------------------------------------------------------------------
    def read_events(self, max_events: int = 64, timeout: float | None = 0.0) -> list[Event]:
        """Read up to ``max_events`` messages with one read(2).

        ``timeout`` in seconds: 0 returns at once, None waits without limit; ``[]``
        when nothing arrived in time.  A blocking descriptor (``nonblock=False``) only
        supports ``timeout=None``.
        """
        if max_events <= 0:
            raise ValueError("max_events must be positive")
        if timeout is None:
            timeout_ms = -1 if self.nonblock else 0
            deadline = None
        elif not self.nonblock:
            raise ValueError("a blocking userfaultfd cannot wait with a timeout "
                             "(the kernel reports POLLERR); use nonblock=True or timeout=None")
        elif timeout > 0:
            timeout_ms = math.ceil(timeout * 1000)
            deadline = time.monotonic() + timeout
        else:
            timeout_ms, deadline = 0, 0.0  # EINTR cannot happen without a wait
        maxn = min(max_events, _lib.PC_UFFD_MAX_EVENTS_PER_READ)
        pool = self._pool
        buf = pool.pop() if (maxn <= self._EVBUF and pool) else None
        if buf is None:
            buf = _ffi.new("struct pc_uffd_event[]", max(maxn, self._EVBUF))
        try:
            while True:
                n = _lib.pc_uffd_read_events(self._fd, buf, maxn, timeout_ms)
                if n >= 0:
                    break
                if n != -_errno.EINTR:
                    raise UffdError(-n, "read(userfaultfd)")
                # A signal: its Python handler runs when we return to the eval loop
                # (KeyboardInterrupt included); otherwise wait for what is left.
                if deadline is not None:
                    left = deadline - time.monotonic() if deadline else 0.0
                    if left <= 0:
                        return []
                    timeout_ms = math.ceil(left * 1000)
            return self._events(buf, n)
        finally:
            if len(buf) == self._EVBUF:
                pool.append(buf)

    def _events(self, buf, n: int) -> list[Event]:
        out = []
        align = self._align
        for i in range(n):
            m = buf[i]
            kind = m.kind
            if kind == 0x12:
                f = m.flags
                out.append(Event(EventKind.PAGEFAULT, m.address & align, 0, f, m.ptid,
                                 bool(f & _FLAG_WRITE), bool(f & _FLAG_WP), bool(f & _FLAG_MINOR)))
            elif kind == 0x14:
                out.append(Event(EventKind.REMAP, m.address, m.end, 0, 0, False, False, False,
                                 length=m.len))
            elif kind == 0x13:
                out.append(Event(EventKind.FORK, 0, 0, 0, 0, False, False, False, fd=m.fd))
            elif kind in _KINDS:
                out.append(Event(_KINDS[kind], m.address, m.end, 0, 0, False, False, False))
        return out


def _fill_error(op: str, n: int, addr: int, length: int) -> UffdError:
    """Exception for a filling ioctl that did nothing (n = -errno)."""
    err = -n if n < 0 else _errno.EINVAL
    where = f"0x{addr:x}+{length:#x}"
    if err == _errno.EEXIST:
        return PageExistsError(err, op, f"{where}: first page already mapped; its waiter is not woken")
    if err in (_errno.ENOENT, _errno.EAGAIN):
        return MappingChangedError(err, op, f"{where}: range unregistered or address space changing")
    if err == _errno.ESRCH:
        return UffdError(err, op, f"{where}: the registered process has exited")
    return UffdError(err, op, where)
