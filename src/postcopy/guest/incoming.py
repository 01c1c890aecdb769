"""An incoming guest's RAM: its missing-mode userfaultfd, the staging area of the
UFFDIO_MOVE install path with the thread that moves pages out of it, and whether the
RAM is still registered (pages may still arrive)."""
from __future__ import annotations

import mmap
import socket
import struct
import threading

from postcopy._native import ffi, lib


def open_incoming_uffd(address: int, size: int, *, shmem: bool, minor: bool, move: bool):
    """A userfaultfd with the RAM registered: missing mode, plus minor mode for the
    UFFDIO_CONTINUE install path (``minor``); ``move`` requires UFFDIO_MOVE."""
    from postcopy.kernel.uffd import Feature, Mode, Userfaultfd

    required = Feature.MISSING_SHMEM if shmem else Feature(0)
    mode = Mode.MISSING
    if minor:  # UFFDIO_CONTINUE install path: minor faults on the memfd
        required |= Feature.MINOR_SHMEM
        mode |= Mode.MINOR
    if move:  # UFFDIO_MOVE install path
        required |= Feature.MOVE
    optional = Feature.THREAD_ID | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
    uffd = Userfaultfd(features=required, optional=optional)
    uffd.register(address, size, mode)
    return uffd


class StagingArea:
    """Staging area for the destination's UFFDIO_MOVE install path: private anonymous
    memory in this process (a move never leaves one mm), deliberately NOT registered;
    the agent fills it through /proc/PID/mem and asks a mover thread here to move pages
    out (``peer`` is the agent's end of that socketpair, handed out by ``fds``)."""

    def __init__(self, uffd, ram_address: int, ram_size: int, pages: int, page_size: int):
        self.pages = pages
        self._map = mmap.mmap(-1, pages * page_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # Base pages only: a THP here would be split by every partial move.
        self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self.address = int(ffi.cast("uintptr_t", ffi.from_buffer(self._map)))
        # The kernel refuses cross-mm moves (userfaultfd_move: mm != current->mm ->
        # EINVAL), so the agent cannot issue UFFDIO_MOVE itself: a mover thread of this
        # process does, on requests over a socketpair.
        mine, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        bounds = (ram_address, ram_address + ram_size, self.address, self.address + pages * page_size)
        threading.Thread(target=_serve_moves, args=(mine, uffd.fileno(), bounds), name="uffd-mover",
                         daemon=True).start()


def _serve_moves(sock: socket.socket, fd: int, bounds: tuple[int, int, int, int]) -> None:
    """Serve UFFDIO_MOVE requests ``(dst, src, len)`` (3 x u64) from staging into
    RAM; each reply is the ioctl's result as an i64 (bytes moved, or -errno)."""
    ram_lo, ram_hi, st_lo, st_hi = bounds
    request, reply = struct.Struct("=QQQ"), struct.Struct("=q")
    with sock:
        while True:
            try:
                msg = sock.recv(request.size)
            except OSError:
                return
            if len(msg) != request.size:
                return  # the agent closed its end
            dst, src, length = request.unpack(msg)
            if not (ram_lo <= dst and dst + length <= ram_hi and st_lo <= src and src + length <= st_hi):
                result = -22  # EINVAL: only staging -> RAM
            else:
                result = lib.pc_uffd_move(fd, dst, src, length, 0, ffi.NULL)
            try:
                sock.send(reply.pack(result))
            except OSError:
                return


def uffd_registered(address: int, size: int) -> bool:
    """Whether any mapping in [address, address + size) is registered with a
    userfaultfd in missing or minor mode (VmFlags ``um`` / ``ui`` in /proc/self/smaps)."""
    end = address + size
    overlaps = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                overlaps = lo < end and address < hi
            elif overlaps and head == "VmFlags:":
                flags = line.split()[1:]
                if "um" in flags or "ui" in flags:
                    return True
    return False
