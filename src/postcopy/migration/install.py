"""How the destination puts a received run of pages into the incoming guest's RAM.

One small strategy object per install path, chosen once when the migration starts:

``copy``     (default) one UFFDIO_COPY per gated piece: the kernel allocates, copies
             and maps, atomically refusing (EEXIST) a page that is already there.
``continue`` memfd RAM registered for missing AND minor faults: write the data into
             the memfd's page cache (pwritev at the page's offset), then one
             UFFDIO_CONTINUE maps the piece and wakes its waiters. Nothing in the kernel
             refuses the write of a page the guest already owns, so the page states are
             checked and the write, map and mark happen under the install gate.
``move``     anonymous RAM: write the run into an unregistered staging area in the
             guest's own address space (/proc/PID/mem), then UFFDIO_MOVE the pages
             from staging to their place (no copy for that step; it maps and wakes,
             and refuses an existing destination page with EEXIST). The staging pages
             are holes again afterwards, so the area is reused run after run. The
             kernel refuses cross-mm moves (fs/userfaultfd.c userfaultfd_move():
             ``mm != current->mm`` -> EINVAL), so the ioctl is issued by a mover thread
             inside the guest, one request/reply over a socketpair per gated piece.

A strategy sees only an :class:`InstallTarget`: the page table, the userfaultfd, the
install gate and where the guest's RAM is. Every path installs a run in gated pieces
(:meth:`CopyPath._install_gated`): pages the guest removed meanwhile are never filled.
"""
from __future__ import annotations

import errno
import os
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass

from postcopy.protocol import wire
from postcopy.kernel.uffd import (Feature, MappingChangedError, PageExistsError, UffdError, Userfaultfd,
                                  address_of)
from postcopy._native import ffi, lib
from postcopy.migration.pagetable import PRESENT, REMOVED, ZERO, IllegalTransition, PageTable

INSTALL_PATHS = ("copy", "continue", "move")
DEFAULT_STAGING_PAGES = 512  # two slots of one 1 MiB pushed run each (4 KiB pages)
# Pages per install while holding the install gate (bounds how long the fault server
# can wait for the gate behind a bulk install).
GATED_COPY_PAGES = 16
RETRY = -1  # an install met a changing mapping: try again after the events are read

CAUSE_NAMES = {
    wire.Cause.PRECOPY: "precopy",
    wire.Cause.RESENT: "resent",
    wire.Cause.DEMAND: "demand",
    wire.Cause.PUSHED: "pushed",
    wire.Cause.STATE: "pushed",
}
# Runs that may overwrite pages already in: precopy resends, before anything runs here.
OVERWRITE_CAUSES = frozenset({wire.Cause.PRECOPY, wire.Cause.RESENT})


class InstallError(RuntimeError):
    """A run could not be installed; the message says where and why."""


@dataclass
class InstallTarget:
    """What an install path may touch. Installs hold ``gate`` while the fault server
    reads uffd events: once it has read a REMOVE event and marked the range, no
    install that checked the range before can land after the kernel's zap."""

    table: PageTable
    uffd: Userfaultfd
    gate: "PageTable.gate"  # the table's C mutex (a context manager)
    base: int  # address of page 0 in the guest
    page_size: int
    ram_fd: int  # writes installed pages in place: the memfd, or the guest's /proc/PID/mem
    ram_fd_base: int  # ram_fd offset of page 0
    memfd: int | None
    stop: threading.Event  # set when the migration ends: errors are no longer retried

    def __post_init__(self) -> None:
        # The C install and fault loops work on the table's copy of these.
        lib.pc_dp_attach(self.table.native, self.uffd.fileno(), self.base, self.page_size, self.ram_fd,
                         self.ram_fd_base, -1 if self.memfd is None else self.memfd)

_BACKING = {"continue": "memfd", "move": "anon"}
_FEATURE = {"continue": Feature.MINOR_SHMEM, "move": Feature.MOVE}
_WHY = {"continue": "UFFDIO_CONTINUE resolves minor faults on pages already in a shmem page cache",
        "move": "UFFDIO_MOVE moves only private anonymous pages"}


def install_path_error(path: str, backing: str, features: Feature | None = None, prealloc: bool = False) -> str | None:
    """Why install path ``path`` cannot run on ``backing`` RAM with these userfaultfd
    ``features`` (default: what this kernel offers), with the guest's RAM populated
    first if ``prealloc`` (see postcopy.migration.prealloc), or None if it can."""
    if path not in INSTALL_PATHS:
        return f"unknown install path {path!r} (choose from {', '.join(INSTALL_PATHS)})"
    if prealloc and path != "continue":
        return (f"--prealloc needs --install continue, not {path}: the {path} path must find pages missing "
                f"(it allocates each page as it lands); continue receives into the populated memfd in place")
    if path == "copy":
        return None
    if backing != _BACKING[path]:
        return (f"install path {path!r} needs {_BACKING[path]} backing, not {backing}: {_WHY[path]}")
    if features is None:
        from postcopy.kernel.uffd import supported_features

        try:
            features = supported_features()
        except (UffdError, OSError) as exc:
            return f"install path {path!r}: no userfaultfd here ({exc})"
    if not features & _FEATURE[path]:
        return (f"install path {path!r} needs userfaultfd feature {_FEATURE[path].name} "
                f"(UFFD_FEATURE_{_FEATURE[path].name}), which this kernel does not offer")
    return None


def supported_paths(backing: str) -> list[str]:
    """Install paths this kernel offers for ``backing`` RAM."""
    return [p for p in INSTALL_PATHS if install_path_error(p, backing) is None]


def guest_options(path: str, staging_pages: int = DEFAULT_STAGING_PAGES) -> list[str]:
    """``postcopy guest --incoming`` options an install path needs."""
    if path == "continue":
        return ["--uffd-minor"]
    if path == "move":
        return ["--staging-pages", str(staging_pages)]
    return []


def make_install_path(path: str, target: InstallTarget, info: dict, fds: dict[str, int]) -> "CopyPath":
    """The strategy for ``path``, checked against the incoming guest's ``fds`` reply
    and descriptors (raises ValueError with the reason when the guest was not set up
    for it)."""
    error = install_path_error(path, info.get("backing", "memfd"), target.uffd.features)
    if error:
        raise ValueError(error)
    if path == "continue":
        if not info.get("uffd_minor"):
            raise ValueError("install path 'continue' needs an incoming guest whose RAM is registered for minor "
                             "faults (start it with postcopy guest --incoming --uffd-minor)")
        if target.memfd is None:
            raise ValueError("install path 'continue' needs the guest's memfd (it sent none)")
        return ContinuePath(target)
    if path == "move":
        if not info.get("staging_address") or not info.get("staging_pages") or "mover" not in fds:
            raise ValueError("install path 'move' needs an incoming guest with a staging area (start it with "
                             "postcopy guest --incoming --backing anon --staging-pages N)")
        return MovePath(target, info["staging_address"], info["staging_pages"], fds["mover"])
    return CopyPath(target)


class CopyPath:
    """UFFDIO_COPY straight from the received frame (the tested default). The whole
    gated loop runs in C without the GIL (``pc_dp_install_copy`` in native/dp_dest_io.c:
    the same steps as :meth:`_install_gated` with :meth:`_copy_piece`)."""

    name = "copy"

    def __init__(self, target: InstallTarget) -> None:
        self.target = target

    def install(self, first: int, npages: int, data, cause: wire.Cause) -> None:
        """Install the run [first, first+npages) whose bytes are ``data``."""
        table = self.target.table
        view = ffi.from_buffer(data)  # pins data for the call
        if len(view) < npages * self.target.page_size:
            raise InstallError(f"run of pages {first}+{npages} carries {len(view)} bytes, too few")
        overwrite = cause in OVERWRITE_CAUSES
        rc = lib.pc_dp_install_copy(table.native, first, npages, int(ffi.cast("uintptr_t", view)),
                                    table.cause_index(CAUSE_NAMES.get(cause, "pushed")), int(overwrite))
        if rc < 0:
            raise install_error(rc)

    def settle(self, addr: int) -> None:
        """A fault on a page that needs no data from the source (already installed, or
        a minor fault on a page the page cache holds): let its thread go on."""
        self.target.uffd.wake(addr, self.target.page_size)

    def close(self) -> None:
        """Release what the path holds (nothing for copy)."""

    def _install_gated(self, first: int, npages: int, data, cause: wire.Cause, src: int, piece) -> None:
        """Install a run in gated pieces of at most GATED_COPY_PAGES, each done by
        ``piece`` (the path's: :meth:`_copy_piece` for UFFDIO_COPY from ``src``).
        A page already there is skipped and its waiter woken (push and demand raced: the
        guest may have written it since), or, for a precopy resend before the
        switchover, overwritten in place. Pages the guest removed meanwhile are never
        filled."""
        target = self.target
        overwrite = cause in OVERWRITE_CAUSES
        done = retries = 0
        while done < npages:
            with target.gate:
                stop = min(npages, done + GATED_COPY_PAGES)
                removed = target.table.find(REMOVED, first + done, first + stop)
                if removed == first + done:  # skip removed pages
                    done += 1
                    continue
                if removed > 0:
                    stop = removed - first
                handled = piece(first, done, stop, src, data, cause, overwrite)
            if handled == RETRY:
                retries += 1
                if retries > 5000:
                    raise InstallError(f"page {first + done} stayed unmappable (the guest's mapping changed "
                                       f"and no event explained it)")
                time.sleep(0.0002)  # outside the gate: let the fault server read the event
                continue
            done += handled

    def _copy_piece(self, first: int, done: int, stop: int, src: int, data, cause: wire.Cause,
                    overwrite: bool) -> int:
        """One UFFDIO_COPY of pages [first+done, first+stop); returns pages handled."""
        ps = self.target.page_size
        return self._place_piece(first, done, stop, data, cause, overwrite,
                                 lambda dst, length: self.target.uffd.copy(dst, src + done * ps, length))

    def _place_piece(self, first: int, done: int, stop: int, data, cause: wire.Cause, overwrite: bool,
                     place) -> int:
        """Pages [first+done, first+stop) mapped by ``place(dst, length)`` (bytes
        placed; refuses as UFFDIO_COPY does: EEXIST for a page already there, EAGAIN
        while the mapping changes); returns pages handled or RETRY."""
        target = self.target
        ps = target.page_size
        dst = target.base + (first + done) * ps
        try:
            placed = place(dst, (stop - done) * ps) // ps
        except PageExistsError:
            if not overwrite:
                # The install that got there first woke the threads waiting then; a
                # thread that faulted after it may wait on us.
                target.uffd.wake(dst, ps)
                return 1
            return self._overwrite(first, done, stop, data, cause)
        except MappingChangedError:
            # An unmap or remove is under way (EAGAIN until its event is read; ENOENT
            # once the range is gone): retry once the fault server has read the event
            # and marked the range removed.
            if target.stop.is_set():
                raise
            return RETRY
        self._installed(first + done, placed, cause)
        return placed

    def _overwrite(self, first: int, done: int, stop: int, data, cause: wire.Cause) -> int:
        """A precopy resend of installed pages (before the switchover: nothing runs
        yet): write the run of PRESENT pages from first+done in place."""
        target = self.target
        ps = target.page_size
        span = target.table.run_of(PRESENT, first + done, first + stop)
        view = memoryview(data)[done * ps:(done + span) * ps]
        os.pwritev(target.ram_fd, [view], target.ram_fd_base + (first + done) * ps)
        self._installed(first + done, span, cause)
        return span

    def _installed(self, first: int, count: int, cause: wire.Cause) -> None:
        self.target.table.installed(first, count, CAUSE_NAMES.get(cause, "pushed"), time.monotonic_ns())


def install_error(rc: int) -> Exception:
    """The exception for a failed C install (``rc`` < 0), as the Python path raises."""
    message = ffi.string(lib.pc_dp_error()).decode(errors="replace")
    if rc == lib.PC_DP_STUCK:
        return InstallError(message)
    if rc == lib.PC_DP_ILLEGAL:
        return IllegalTransition(message)
    if rc in (-errno.EAGAIN, -errno.ENOENT):
        return MappingChangedError(-rc, "UFFDIO_COPY", message)
    if message.startswith("UFFDIO_"):
        return UffdError(-rc, "UFFDIO_COPY", message)
    return OSError(-rc, message)


class ContinuePath(CopyPath):
    """pwritev into the memfd's page cache, then UFFDIO_CONTINUE."""

    name = "continue"

    # Writable page states: MISSING/REQUESTED always; PRESENT/ZERO only for a precopy
    # resend before the switchover (nothing runs yet). REMOVED never.
    _BLOCKED = frozenset({PRESENT, ZERO, REMOVED})
    _BLOCKED_OVERWRITE = frozenset({REMOVED})

    def install(self, first: int, npages: int, data, cause: wire.Cause) -> None:
        self._install_gated(first, npages, data, cause, 0, self._piece)

    def _piece(self, first: int, done: int, stop: int, src: int, data, cause: wire.Cause,
               overwrite: bool) -> int:
        """Pages [first+done, first+stop) (none REMOVED), with the gate held."""
        agent = self.target
        ps = agent.page_size
        lo, hi = first + done, first + stop
        # Never write a page the guest may own: the kernel would not refuse it here.
        blocked = agent.table.first_of(self._BLOCKED_OVERWRITE if overwrite else self._BLOCKED, lo, hi)
        if blocked == 0:  # installed (by the other channel) or zero-filled: wake, skip
            agent.uffd.wake(agent.base + lo * ps, ps)
            return 1
        if blocked > 0:
            hi = lo + blocked
        view = memoryview(data)[done * ps:(hi - first) * ps]
        os.pwritev(agent.memfd, [view], lo * ps)
        addr, end = agent.base + lo * ps, agent.base + hi * ps
        while addr < end:
            try:
                addr += agent.uffd.continue_(addr, end - addr)
            except PageExistsError:  # mapped already (a resend): the cache write updated it
                agent.uffd.wake(addr, ps)
                addr += ps
            except MappingChangedError:
                if agent.stop.is_set():
                    raise
                # Pages written but not mapped stay MISSING: the guest cannot reach them
                # without a minor fault we answer, so rewriting them later is safe.
                mapped = (addr - agent.base) // ps - lo
                if mapped:
                    self._installed(lo, mapped, cause)
                    return mapped
                return RETRY
        self._installed(lo, hi - lo, cause)
        return hi - lo

    def settle(self, addr: int) -> None:
        """Minor fault on a page whose cache copy is the truth (ours, or the guest's
        own zero-filled page): map it; if it is mapped already, wake."""
        agent = self.target
        try:
            agent.uffd.continue_(addr, agent.page_size)
        except PageExistsError:
            agent.uffd.wake(addr, agent.page_size)
        except MappingChangedError:
            pass  # an event is pending; the thread faults again once it is read


class MovePath(CopyPath):
    """pwritev into the guest's staging area, then UFFDIO_MOVE into place."""

    name = "move"

    _REQUEST = struct.Struct("=QQQ")
    _REPLY = struct.Struct("=q")

    def __init__(self, target: InstallTarget, staging_address: int, staging_pages: int, mover_fd: int) -> None:
        super().__init__(target)
        self._mover = socket.socket(fileno=mover_fd)
        self._mover_lock = threading.Lock()
        # One slot per installing thread (main and urgent channel): demand installs
        # never wait for the pusher's staging.
        nslots = 2 if staging_pages >= 2 else 1
        self.slot_pages = staging_pages // nslots
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(nslots):
            self._slots.put(staging_address + i * self.slot_pages * target.page_size)

    def install(self, first: int, npages: int, data, cause: wire.Cause) -> None:
        agent = self.target
        ps = agent.page_size
        slot = self._slots.get()
        try:
            view = memoryview(data)
            for off in range(0, npages, self.slot_pages):
                n = min(self.slot_pages, npages - off)
                chunk = view[off * ps:(off + n) * ps]
                # Staging is private to this slot's holder: filled outside the gate.
                os.pwritev(agent.ram_fd, [chunk], slot)
                self._install_gated(first + off, n, chunk, cause, slot, self._piece)
        finally:
            self._slots.put(slot)

    def _piece(self, first: int, done: int, stop: int, src: int, data, cause: wire.Cause,
               overwrite: bool) -> int:
        """UFFDIO_MOVE pages [first+done, first+stop) from staging ``src``, gate held."""
        agent = self.target
        ps = agent.page_size
        try:
            return self._place_piece(first, done, stop, data, cause, overwrite,
                                     lambda dst, length: self._move(dst, src + done * ps, length))
        except UffdError as exc:
            if exc.errno == errno.ENOENT and not agent.stop.is_set():
                # The staging page is there (just written): the destination VMA is
                # changing under an unmap.
                return RETRY
            if exc.errno != errno.EBUSY:
                raise
            # EBUSY: the staging folio is shared or pinned (not exclusive anon); fall
            # back to copying this piece from the frame.
            return self._copy_piece(first, done, stop, address_of(data), data, cause, overwrite)

    def _move(self, dst: int, src: int, length: int) -> int:
        """UFFDIO_MOVE done by the guest's mover thread; bytes moved, or the exception
        :meth:`postcopy.kernel.uffd.Userfaultfd.move` would raise."""
        with self._mover_lock:  # the gate serializes pieces already; this keeps replies paired
            self._mover.sendall(self._REQUEST.pack(dst, src, length))
            reply = self._mover.recv(self._REPLY.size)
        if len(reply) != self._REPLY.size:
            raise UffdError(errno.ESRCH, "UFFDIO_MOVE", "the guest's mover thread is gone")
        n = self._REPLY.unpack(reply)[0]
        if n > 0:
            return n
        err = -n if n < 0 else errno.EINVAL
        if err == errno.EEXIST:
            raise PageExistsError(err, "UFFDIO_MOVE", f"0x{dst:x}: first page already mapped")
        if err == errno.EAGAIN:
            raise MappingChangedError(err, "UFFDIO_MOVE", f"0x{dst:x}: address space changing")
        raise UffdError(err, "UFFDIO_MOVE", f"0x{dst:x}+{length:#x} from 0x{src:x}")

    def close(self) -> None:
        self._mover.close()
