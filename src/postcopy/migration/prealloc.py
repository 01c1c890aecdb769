"""The destination's guest RAM, allocated before any page moves (``postcopy dest
--prealloc``, like QEMU's ``-mem-prealloc``).

A page that lands in RAM the guest never had must first be allocated and zeroed; on a
virtual machine, one the host has not backed yet (never touched, or freed long enough
ago for the host to take it back) also costs a trip to the hypervisor. On the 2-CPU
test VM that first touch costs 0.6-2.6 s per GiB, several times the copy itself, and a
push that allocates as it lands pays it inside the postcopy window (see ``postcopy
bench``: the C floor of TCP bulk into fresh RAM). With ``--prealloc`` the destination
populates the incoming guest's memfd through its own shared mapping before it answers
the source's ReadyCheck (so before the source pauses its guest: none of it is downtime),
and the continue path then receives every page run straight into that mapping (one
copy, no allocation) and maps it into the guest with UFFDIO_CONTINUE.

The page cache then holds zeros for pages not received yet; they are never mapped for
the guest: a minor fault on a page the table says is missing is a request, as before.
"""
from __future__ import annotations

import errno
import mmap
import os
import time


class PreallocError(OSError):
    """The guest's RAM could not be populated."""


def map_guest_ram(memfd: int, size: int) -> mmap.mmap:
    """This agent's own shared mapping of the guest's memfd, at page granularity as the
    guest's (the continue path receives in place through it)."""
    ram = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    ram.madvise(mmap.MADV_NOHUGEPAGE)
    return ram


def populate(ram: mmap.mmap) -> float:
    """Allocate every page of ``ram`` (a shared mapping of the guest's memfd) and map it
    here, without holding the GIL (the agent's other threads, such as the incoming
    guest's watchdog keeper, go on); returns the seconds it took. Raises PreallocError
    with the reason."""
    from postcopy._native import ffi, lib

    started = time.monotonic()
    rc = lib.pc_populate_write(ffi.from_buffer(ram), len(ram))
    if rc == -errno.EINVAL:
        raise PreallocError(errno.EINVAL, "--prealloc needs MADV_POPULATE_WRITE (Linux 5.14 or newer)")
    if rc in (-errno.ENOMEM, -errno.EFAULT, -errno.ENOSPC):
        raise PreallocError(-rc, f"--prealloc: could not allocate the guest's {len(ram) >> 20} MiB of "
                                 f"RAM here: {os.strerror(-rc)}")
    if rc:
        raise OSError(-rc, f"--prealloc: populating the guest's RAM: {os.strerror(-rc)}")
    return time.monotonic() - started


def preallocated(memfd: int, size: int) -> tuple[mmap.mmap, float]:
    """The guest's RAM (``size`` bytes of ``memfd``) mapped here and populated, and the
    milliseconds populating took."""
    ram = map_guest_ram(memfd, size)
    try:
        return ram, populate(ram) * 1e3
    except BaseException:
        ram.close()
        raise
