"""What this host's memory allows, read from /proc/meminfo."""
from __future__ import annotations

from postcopy.units import format_bytes


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return values


def ram_fit_error(ram: int, copies: int = 1) -> str | None:
    """Why ``copies`` guests of ``ram`` bytes cannot all be populated on this host (their
    RAM plus swap), or None. A guest larger than that fails late, when its pages fill
    (or when userfaultfd needs page tables for all of it), so refuse it up front."""
    info = meminfo()
    limit = info.get("MemTotal", 0) + info.get("SwapTotal", 0)
    if ram * copies <= limit:
        return None
    if copies == 1:
        return (f"a guest of {format_bytes(ram)} needs more than this host's memory and swap "
                f"({format_bytes(limit)})")
    return (f"{copies} guests of {format_bytes(ram)} (source and destination on this host) need "
            f"{format_bytes(ram * copies)}, more than this host's memory and swap ({format_bytes(limit)})")


def peak_rss_kib() -> int:
    """This process's peak resident set size since its exec, in KiB (VmHWM: the high
    water mark of its own address space). Not getrusage's ru_maxrss, which Linux carries
    across fork and exec: an agent started by a large parent would report the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise OSError("/proc/self/status has no VmHWM")
