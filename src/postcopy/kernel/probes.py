"""Kernel feature probes: each one tries the feature for real (never the kernel
version) and returns a :class:`Probe` saying whether it works, what was seen, and what
its absence disables.  Used by ``postcopy doctor`` and by the dirty-log backend
detection (:func:`probe_soft_dirty`, :func:`probe_pagemap_scan`).

Probes are self-contained: whatever they map, open or create is gone when they return.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from dataclasses import asdict, dataclass
from typing import Callable

from postcopy.kernel import pagemap as _pm
from postcopy.kernel import uffd as _uffd
from postcopy._native import lib as _lib

PAGE_SIZE = mmap.PAGESIZE


@dataclass(frozen=True)
class Probe:
    """Outcome of one probe: ``disables`` says what is lost when ``ok`` is False."""

    name: str
    ok: bool
    detail: str
    disables: str

    def to_dict(self) -> dict:
        return asdict(self)


# -- privileges ------------------------------------------------------------------------

_CAPS = {
    # capability: (bit, what its absence disables)
    "CAP_SYS_ADMIN": (21, "network-namespace testbed and mounts; pagemap PFNs"),
    "CAP_NET_ADMIN": (12, "veth links, addresses and tbf shaping in the testbed"),
    "CAP_SYS_PTRACE": (19, "userfaultfd kernel-mode faults (a guest's read(2) into missing "
                           "RAM) and UFFD_FEATURE_EVENT_FORK; attaching to other users' guests"),
}


def _cap_eff() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def probe_root() -> Probe:
    """Effective uid 0."""
    euid = os.geteuid()
    return Probe("root", euid == 0, f"effective uid {euid}",
                 "tests and tools that need root (netns testbed, other users' /proc files)")


def probe_capability(cap: str) -> Probe:
    """One bit of CapEff in /proc/self/status."""
    bit, disables = _CAPS[cap]
    ok = bool(_cap_eff() >> bit & 1)
    return Probe(cap.lower(), ok, f"{cap} {'in' if ok else 'missing from'} the effective set", disables)


# -- userfaultfd -----------------------------------------------------------------------

_O_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
_UFFD_USER_MODE_ONLY = 1


def probe_uffd_syscall() -> Probe:
    """userfaultfd(2), for all faults, else for user-mode faults only."""
    disables = "userfaultfd via the syscall (postcopy falls back to /dev/userfaultfd)"
    fd = _lib.pc_uffd_open_syscall(_O_FLAGS)
    if fd >= 0:
        os.close(fd)
        return Probe("uffd_syscall", True, "userfaultfd(2) opens a descriptor for all faults", disables)
    first = -fd
    fd = _lib.pc_uffd_open_syscall(_O_FLAGS | _UFFD_USER_MODE_ONLY)
    if fd >= 0:
        os.close(fd)
        return Probe("uffd_syscall", True,
                     f"userfaultfd(2) only with UFFD_USER_MODE_ONLY ({os.strerror(first)} without): "
                     "a guest's system calls into missing RAM fail with EFAULT", disables)
    reason = "kernel built without CONFIG_USERFAULTFD" if first == errno.ENOSYS else os.strerror(first)
    return Probe("uffd_syscall", False, f"userfaultfd(2) failed: {reason}", disables)


def probe_uffd_dev() -> Probe:
    """/dev/userfaultfd + USERFAULTFD_IOC_NEW."""
    disables = "userfaultfd via /dev/userfaultfd (only needed when the syscall is refused)"
    fd = _lib.pc_uffd_open_dev(_O_FLAGS)
    if fd >= 0:
        os.close(fd)
        return Probe("uffd_dev", True, "/dev/userfaultfd USERFAULTFD_IOC_NEW opens a descriptor", disables)
    err = -fd
    reason = "no such device node" if err == errno.ENOENT else os.strerror(err)
    return Probe("uffd_dev", False, f"/dev/userfaultfd: {reason}", disables)


def probe_uffd_api() -> Probe:
    """A descriptor from whichever path works, and the UFFDIO_API handshake."""
    disables = "userfaultfd altogether: no postcopy, no pagemap-scan dirty log"
    try:
        with _uffd.Userfaultfd() as u:
            via = u.opened_via
        features = _uffd.supported_features()
    except OSError as exc:
        return Probe("uffd_api", False, str(exc), disables)
    return Probe("uffd_api", True, f"UFFDIO_API done on a descriptor from {via}; "
                 f"{bin(int(features)).count('1')} features offered (uffd_feature_* below)", disables)


_FEATURE_DISABLES = {
    "PAGEFAULT_FLAG_WP": "write-protect faults (UFFDIO_WRITEPROTECT tracking)",
    "EVENT_FORK": "following a forking guest (needs CAP_SYS_PTRACE to request)",
    "EVENT_REMAP": "following mremap of guest RAM during postcopy",
    "EVENT_REMOVE": "noticing guest discards (MADV_DONTNEED) during postcopy",
    "MISSING_HUGETLBFS": "postcopy of hugetlbfs-backed guest RAM",
    "MISSING_SHMEM": "postcopy of memfd/shmem guest RAM (anonymous RAM still works)",
    "EVENT_UNMAP": "noticing munmap of guest RAM during postcopy",
    "SIGBUS": "SIGBUS mode (faults without a handler thread)",
    "THREAD_ID": "per-thread fault attribution (which vCPU blocked)",
    "MINOR_HUGETLBFS": "minor-fault install on hugetlbfs",
    "MINOR_SHMEM": "minor-fault install (UFFDIO_CONTINUE) on memfd guest RAM",
    "EXACT_ADDRESS": "nothing: fault addresses are handled page-aligned",
    "WP_HUGETLBFS_SHMEM": "write-protect of memfd/hugetlbfs guest RAM (pagemap-scan on memfd guests)",
    "WP_UNPOPULATED": "write-protecting never-touched pages (pagemap-scan dirty log)",
    "POISON": "UFFDIO_POISON for pages lost beyond recovery",
    "WP_ASYNC": "pagemap-scan dirty log (async write-protect)",
    "MOVE": "UFFDIO_MOVE (install by moving pages instead of copying)",
}


def probe_uffd_features() -> list[Probe]:
    """One probe per UFFD_FEATURE_* bit: offered by UFFDIO_API or not."""
    try:
        offered = _uffd.supported_features()
        why = "not offered by UFFDIO_API"
    except OSError as exc:
        offered = _uffd.Feature(0)
        why = f"no userfaultfd: {exc}"
    return [Probe(f"uffd_feature_{f.name.lower()}", bool(offered & f),
                  f"UFFD_FEATURE_{f.name} {'offered' if offered & f else why}",
                  _FEATURE_DISABLES.get(f.name, f"UFFD_FEATURE_{f.name}"))
            for f in _uffd.Feature]


# -- dirty logging ---------------------------------------------------------------------

def _anon(npages: int) -> mmap.mmap:
    m = mmap.mmap(-1, npages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)  # one pagemap entry per written 4 KiB page
    return m


def probe_soft_dirty() -> Probe:
    """Soft-dirty tracking: write two pages, clear_refs 4, write the first again: bit 55
    of its pagemap entry must be set and that of the second clear."""
    disables = "soft-dirty dirty log unavailable: precopy uses pagemap-scan"
    m = _anon(2)
    try:
        m[0] = m[PAGE_SIZE] = 1  # populate both
        addr = _uffd.address_of(m)
        _pm.clear_refs("self", _pm.CLEAR_REFS_SOFT_DIRTY)
        m[0] = 2  # must set the soft-dirty bit again
        with _pm.Pagemap("self") as pagemap:
            written, untouched = pagemap.read(addr, 2)
    except OSError as exc:
        return Probe("soft_dirty", False, f"soft-dirty probe failed: {exc}", disables)
    finally:
        m.close()
    if not written & _pm.PM_PRESENT:
        return Probe("soft_dirty", False, "written page not present in pagemap", disables)
    if not written & _pm.PM_SOFT_DIRTY:
        return Probe("soft_dirty", False, "bit 55 never set after clear_refs 4 + write: kernel built "
                     "without CONFIG_MEM_SOFT_DIRTY", disables)
    if untouched & _pm.PM_SOFT_DIRTY:
        return Probe("soft_dirty", False, "bit 55 set on a page not written since clear_refs 4: "
                     "clearing does not work", disables)
    return Probe("soft_dirty", True, "bit 55 set by a write after clear_refs 4, clear on an "
                 "untouched page", disables)


def probe_pagemap_scan() -> Probe:
    """PAGEMAP_SCAN on a WP_ASYNC userfaultfd: write 3 of 16 protected pages, a
    WP_MATCHING scan for PAGE_IS_WRITTEN must return exactly those, a second none."""
    disables = "pagemap-scan dirty log unavailable: precopy uses soft-dirty"
    need = _uffd.Feature.WP_ASYNC | _uffd.Feature.WP_UNPOPULATED
    try:
        offered = _uffd.supported_features()
    except OSError as exc:
        return Probe("pagemap_scan", False, f"no userfaultfd: {exc}", disables)
    if need & ~offered:
        return Probe("pagemap_scan", False, f"UFFD_FEATURE_{_uffd._names(need & ~offered)} not offered "
                     "(async write-protect came in Linux 6.7)", disables)
    npages, written = 16, (5, 6, 7)
    m = _anon(npages)
    try:
        base = _uffd.address_of(m)
        length = npages * PAGE_SIZE
        with _uffd.Userfaultfd(need) as u, _pm.Pagemap("self") as pagemap:
            u.register(base, length, _uffd.Mode.WP)
            u.writeprotect(base, length, protect=True)
            for page in written:  # async WP: the kernel resolves these writes itself
                m[page * PAGE_SIZE] = 1
            kw = dict(flags=_pm.ScanFlag.WP_MATCHING | _pm.ScanFlag.CHECK_WPASYNC,
                      category_mask=_pm.Category.WRITTEN, return_mask=_pm.Category.WRITTEN)
            first = pagemap.scan(base, base + length, **kw)
            second = pagemap.scan(base, base + length, **kw)
            u.unregister(base, length)
    except OSError as exc:
        return Probe("pagemap_scan", False, f"PAGEMAP_SCAN probe failed: {exc}", disables)
    finally:
        m.close()
    expect = [(base + written[0] * PAGE_SIZE, base + (written[-1] + 1) * PAGE_SIZE, int(_pm.Category.WRITTEN))]
    if first != expect:
        return Probe("pagemap_scan", False, f"scan after writing pages {written} of {npages} returned "
                     f"{_rel(first, base)}, expected {_rel(expect, base)}", disables)
    if second:
        return Probe("pagemap_scan", False, f"second scan still reports {_rel(second, base)}: "
                     "WP_MATCHING did not re-protect", disables)
    return Probe("pagemap_scan", True, "PAGEMAP_SCAN with WP_MATCHING|CHECK_WPASYNC found exactly "
                 "the written pages and re-protected them", disables)


def _rel(regions, base: int) -> list[tuple[int, int]]:
    return [((s - base) // PAGE_SIZE, (e - base) // PAGE_SIZE) for s, e, _ in regions]


# -- other userfaultfd operations ------------------------------------------------------

def probe_uffdio_move() -> Probe:
    """UFFDIO_MOVE of one anonymous page into a missing-registered page."""
    disables = "UFFDIO_MOVE install (pages are copied with UFFDIO_COPY instead)"
    try:
        if not _uffd.supported_features() & _uffd.Feature.MOVE:
            return Probe("uffdio_move", False, "UFFD_FEATURE_MOVE not offered (came in Linux 6.8)", disables)
    except OSError as exc:
        return Probe("uffdio_move", False, f"no userfaultfd: {exc}", disables)
    src, dst = _anon(1), _anon(1)
    try:
        src[:8] = b"movedpg!"
        with _uffd.Userfaultfd(_uffd.Feature.MOVE) as u:
            d = _uffd.address_of(dst)
            u.register(d, PAGE_SIZE, _uffd.Mode.MISSING)
            moved = u.move(d, _uffd.address_of(src), PAGE_SIZE)
            u.unregister(d, PAGE_SIZE)
        ok = moved == PAGE_SIZE and dst[:8] == b"movedpg!" and src[:8] == bytes(8)
        detail = ("moved a page: destination has its content, source reads zeros" if ok
                  else f"moved {moved} bytes but contents are wrong")
    except OSError as exc:
        ok, detail = False, f"UFFDIO_MOVE failed: {exc}"
    finally:
        src.close()
        dst.close()
    return Probe("uffdio_move", ok, detail, disables)


def probe_minor_shmem() -> Probe:
    """Minor fault install on a memfd: UFFDIO_CONTINUE maps a page-cache page."""
    disables = "minor-fault install (UFFDIO_CONTINUE) for memfd guest RAM"
    try:
        if not _uffd.supported_features() & _uffd.Feature.MINOR_SHMEM:
            return Probe("minor_shmem", False, "UFFD_FEATURE_MINOR_SHMEM not offered", disables)
    except OSError as exc:
        return Probe("minor_shmem", False, f"no userfaultfd: {exc}", disables)
    fd = os.memfd_create("postcopy-probe-minor", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, PAGE_SIZE)
        view = mmap.mmap(fd, PAGE_SIZE)
        other = mmap.mmap(fd, PAGE_SIZE)
        try:
            other[:8] = b"pagecach"  # fills the page cache through the other mapping
            with _uffd.Userfaultfd(_uffd.Feature.MINOR_SHMEM) as u:
                a = _uffd.address_of(view)
                u.register(a, PAGE_SIZE, _uffd.Mode.MINOR)
                mapped = u.continue_(a, PAGE_SIZE)
                content = view[:8]  # mapped now: no fault
                u.unregister(a, PAGE_SIZE)
            ok = mapped == PAGE_SIZE and content == b"pagecach"
            detail = ("UFFDIO_CONTINUE mapped the page-cache page" if ok
                      else f"UFFDIO_CONTINUE mapped {mapped} bytes, content {content!r}")
        finally:
            view.close()
            other.close()
    except OSError as exc:
        ok, detail = False, f"UFFDIO_CONTINUE failed: {exc}"
    finally:
        os.close(fd)
    return Probe("minor_shmem", ok, detail, disables)


# -- KVM and network namespaces --------------------------------------------------------

_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)


def probe_kvm() -> Probe:
    """/dev/kvm opens and KVM_GET_API_VERSION is 12."""
    disables = "KVM-backed guests (the process guest is unaffected)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Probe("kvm", False, f"/dev/kvm: {exc.strerror}", disables)
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return Probe("kvm", False, f"KVM_GET_API_VERSION: {exc.strerror}", disables)
    finally:
        os.close(fd)
    return Probe("kvm", version == 12, f"KVM_GET_API_VERSION = {version}" + ("" if version == 12 else ", expected 12"),
                 disables)


def probe_kvm_dirty_logs() -> list[Probe]:
    """KVM's three dirty logs, each tried for real on a scratch VM whose guest writes
    known pages (native pc_kvm_probe): KVM_GET_DIRTY_LOG, manual protect with
    KVM_CLEAR_DIRTY_LOG, the dirty ring."""
    from postcopy.kernel.dirtylog.kvm import kvm_backend_reasons

    done = {"kvm-bitmap": "KVM_GET_DIRTY_LOG", "kvm-clear": "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 + KVM_CLEAR_DIRTY_LOG",
            "kvm-ring": "KVM_CAP_DIRTY_LOG_RING (KVM_DIRTY_LOG_PAGE_OFFSET rings, KVM_RESET_DIRTY_RINGS)"}
    return [Probe(f"kvm_dirty_{name[4:]}", reason is None,
                  reason or f"{done[name]}: a KVM guest's writes reported exactly, then cleared",
                  f"the {name} dirty log of KVM guests")
            for name, reason in kvm_backend_reasons(refresh=True).items()]


_CLONE_NEWNET = 0x40000000


def probe_netns() -> Probe:
    """unshare(CLONE_NEWNET) in a forked child; the namespace dies with the child."""
    disables = "the two-namespace testbed (veth link, shaping, link failures)"
    libc = ctypes.CDLL(None, use_errno=True)
    unshare = libc.unshare  # resolved before fork: the child only calls it
    pid = os.fork()
    if pid == 0:  # child: no Python-level cleanup, just the exit status
        code = 0
        try:
            if unshare(_CLONE_NEWNET) != 0:
                code = min(ctypes.get_errno(), 255) or 255
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return Probe("netns", True, "unshare(CLONE_NEWNET) works (in a child, nothing left behind)", disables)
    reason = os.strerror(code) if 0 < code < 255 else f"child exit status {code}"
    return Probe("netns", False, f"unshare(CLONE_NEWNET): {reason}", disables)


# -- all of them -----------------------------------------------------------------------

def _guard(name: str, fn: Callable[[], Probe | list[Probe]]) -> list[Probe]:
    try:
        result = fn()
    except Exception as exc:  # a probe bug must not hide the other results
        return [Probe(name, False, f"probe crashed: {exc!r}", "")]
    return result if isinstance(result, list) else [result]


def all_probes() -> list[Probe]:
    """Every probe, in a stable order."""
    steps: list[tuple[str, Callable]] = [
        ("root", probe_root),
        *[(cap.lower(), lambda cap=cap: probe_capability(cap)) for cap in _CAPS],
        ("uffd_syscall", probe_uffd_syscall),
        ("uffd_dev", probe_uffd_dev),
        ("uffd_api", probe_uffd_api),
        ("uffd_features", probe_uffd_features),
        ("soft_dirty", probe_soft_dirty),
        ("pagemap_scan", probe_pagemap_scan),
        ("uffdio_move", probe_uffdio_move),
        ("minor_shmem", probe_minor_shmem),
        ("kvm", probe_kvm),
        ("kvm_dirty_logs", probe_kvm_dirty_logs),
        ("netns", probe_netns),
    ]
    probes: list[Probe] = []
    for name, fn in steps:
        probes.extend(_guard(name, fn))
    return probes
