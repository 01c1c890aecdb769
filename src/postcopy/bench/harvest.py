"""What one dirty-log harvest costs, by backend, RAM size and number of dirty pages.

For each RAM size a guest is started (memfd RAM, one idle vCPU stepping every 100 us
so that stalls show as heartbeat gaps), every page is populated, and for each dirty
count N: clear the log, write exactly N distinct pages (the guest's ``touch`` command,
an affine permutation in C, so nothing else is written but the state page), harvest.
Measured in the same run:

* each backend this kernel has (``soft-dirty`` pauses the guest across read + clear:
  ``pause_ms``);
* the raw C loop of each backend (``native/harvest_bench.c``), its floor:
  ``c-pagemap-scan`` (the same PAGEMAP_SCAN loop) and ``c-soft-dirty`` (one read of the
  range's pagemap entries and clear_refs, the guest paused around it);
* ``pagemap-read``: a full read of the range's pagemap (:meth:`Pagemap.read`), the cost
  any bit-per-page scheme (soft-dirty included) starts from.

``worst_gap_ms`` is the longest the guest went without a step while harvests ran.
Targets (reported, not asserted): pagemap-scan with 100 dirty pages at 4 GiB within
1.2x of the C loop and at least 10x cheaper than the full pagemap read.

:func:`side_by_side` puts the two backends of one kernel next to each other (what
``scripts/kernel-matrix --bench`` prints); compare timings only inside one table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SIZES = (256 * MiB, 1 * GiB)
LARGE_SIZE = 4 * GiB  # with large=True: about 4 GiB of memory and ~10 s more
DEFAULT_DIRTY = (0, 100, 10_000, 100_000)
GUEST_RATE = 10_000  # idle steps per second: heartbeat resolution 0.1 ms


def harvest_table(sizes: Iterable[int] = DEFAULT_SIZES, dirty: Iterable[int] = DEFAULT_DIRTY,
                  backends: Iterable[str] | None = None, *, large: bool = False, repeats: int = 5,
                  progress: Callable[[str], None] | None = None) -> list[dict]:
    """Harvest cost rows (plain, JSON-able dicts), one per (method, RAM size, dirty
    count); dirty counts above the guest's page count are left out.

    ``backends`` defaults to every backend this kernel offers; ``large`` adds the
    4 GiB guest to ``sizes``. Keys: method, ram_bytes, dirty_pages, reported_pages,
    harvest_ms (median of ``repeats``), harvest_ms_min, pause_ms (median), worst_gap_ms,
    idle_gap_ms (the same guest's worst gap over 0.2 s without harvests: the noise
    floor), start_ms (arming the log), and on backend rows vs_c_loop (harvest / C loop) and
    read_speedup (full pagemap read / harvest) where both were measured.
    """
    from postcopy.kernel.dirtylog import available_backends

    usable = [name for name, reason in available_backends().items() if reason is None]
    chosen = list(usable if backends is None else [b for b in backends if b in usable])
    sizes = list(sizes) + ([LARGE_SIZE] if large and LARGE_SIZE not in sizes else [])
    say = progress or (lambda _msg: None)
    rows: list[dict] = []
    for size in sizes:
        with _BenchGuest(size) as guest:
            say(f"{size // MiB} MiB guest populated in {guest.populate_ms:.0f} ms")
            rows.extend(_size_rows(guest, chosen, list(dirty), repeats, say))
    return rows


def _size_rows(guest: "_BenchGuest", backends: list[str], dirty: list[int], repeats: int,
               say: Callable[[str], None]) -> list[dict]:
    from postcopy.kernel.dirtylog import open_dirty_log

    rows: list[dict] = []
    counts = [n for n in dirty if n <= guest.npages]
    read_ms = guest.full_read_ms(repeats) if counts else 0.0  # the same whatever is dirty
    guest.client.max_step_gap_ns()
    time.sleep(0.2)
    guest.idle_gap_ms = guest.client.max_step_gap_ns() / 1e6  # scheduling noise, no harvest
    for n in counts:
        rows.append(_row("pagemap-read", guest, n, [read_ms], [], 0, 0, 0.0))
    for name in backends:
        log = open_dirty_log(name, guest.client, guest.info)
        t0 = time.perf_counter()
        log.start()
        start_ms = (time.perf_counter() - t0) * 1e3
        try:
            for n in counts:
                times, pauses, gaps, reported = [], [], [], 0
                for rep in range(repeats):
                    log.harvest()  # clear: only the N pages (and the state page) from here
                    guest.touch(n, seed=rep)
                    guest.client.max_step_gap_ns()  # reset the gap window
                    reported = _pages(log.harvest())
                    time.sleep(0.002)  # let the first step after a pause land in the window
                    gaps.append(guest.client.max_step_gap_ns() / 1e6)
                    times.append(log.last_harvest_ms)
                    pauses.append(log.last_pause_ms)
                rows.append(_row(name, guest, n, times, pauses, reported, max(gaps), start_ms))
                say(f"{name} {guest.size // MiB} MiB, {n} dirty: {statistics.median(times):.3f} ms")
                rows.append(_C_LOOPS[name](guest, log, n, repeats))
        finally:
            log.stop()
    _ratios(rows)
    return rows


def _c_pagemap_scan_row(guest: "_BenchGuest", log, n: int, repeats: int) -> dict:
    """The same harvest by the C loop, while the pagemap-scan log is armed."""
    from postcopy._native import ffi, lib

    vec_len = 16384
    vec = ffi.new("struct pc_page_region[]", vec_len)
    regions, pages = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    fd = os.open(f"/proc/{guest.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    times, gaps = [], []
    try:
        for rep in range(repeats):
            log.harvest()
            guest.touch(n, seed=rep)
            guest.client.max_step_gap_ns()
            ns = lib.pc_bench_pagemap_harvest(fd, guest.base, guest.base + guest.size, vec, vec_len, regions, pages)
            if ns < 0:
                raise OSError(-ns, f"PAGEMAP_SCAN: {os.strerror(-ns)}")
            time.sleep(0.002)
            gaps.append(guest.client.max_step_gap_ns() / 1e6)
            times.append(ns / 1e6)
    finally:
        os.close(fd)
    return _row("c-pagemap-scan", guest, n, times, [], int(pages[0]), max(gaps), 0.0)


def _c_soft_dirty_row(guest: "_BenchGuest", log, n: int, repeats: int) -> dict:
    """The soft-dirty harvest by the C loop (pagemap read + clear_refs), the guest
    paused across it as the backend does: the pause is measured around the C call."""
    from postcopy._native import ffi, lib

    pages = ffi.new("uint64_t *")
    fd = os.open(f"/proc/{guest.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    times, pauses, gaps = [], [], []
    try:
        for rep in range(repeats):
            log.harvest()
            guest.touch(n, seed=rep)
            guest.client.max_step_gap_ns()
            t0 = time.perf_counter()
            reply = guest.client.pause()
            try:
                ns = lib.pc_bench_softdirty_harvest(fd, guest.pid, guest.base, guest.npages, pages)
            finally:
                guest.client.resume(stop_at=reply.get("stop_at"))
            pauses.append((time.perf_counter() - t0) * 1e3)
            if ns < 0:
                raise OSError(-ns, f"soft-dirty pagemap read + clear_refs: {os.strerror(-ns)}")
            time.sleep(0.002)
            gaps.append(guest.client.max_step_gap_ns() / 1e6)
            times.append(ns / 1e6)
    finally:
        os.close(fd)
    return _row("c-soft-dirty", guest, n, times, pauses, int(pages[0]), max(gaps), 0.0)


#: backend -> the row of its raw C loop, measured while the backend's log is armed
_C_LOOPS = {"pagemap-scan": _c_pagemap_scan_row, "soft-dirty": _c_soft_dirty_row}
C_LOOP = {"pagemap-scan": "c-pagemap-scan", "soft-dirty": "c-soft-dirty"}


def _row(method: str, guest: "_BenchGuest", n: int, times: list[float], pauses: list[float],
         reported: int, worst_gap_ms: float, start_ms: float) -> dict:
    return {
        "method": method,
        "ram_bytes": guest.size,
        "dirty_pages": n,
        "reported_pages": reported,
        "harvest_ms": round(statistics.median(times), 4),
        "harvest_ms_min": round(min(times), 4),
        "pause_ms": round(statistics.median(pauses), 4) if pauses else 0.0,
        "worst_gap_ms": round(worst_gap_ms, 3),
        "start_ms": round(start_ms, 2),
        "idle_gap_ms": round(guest.idle_gap_ms, 3),
        "repeats": len(times),
    }


def _ratios(rows: list[dict]) -> None:
    by = {(r["method"], r["ram_bytes"], r["dirty_pages"]): r for r in rows}
    for r in rows:
        if r["method"] not in C_LOOP:
            continue
        key = (r["ram_bytes"], r["dirty_pages"])
        c_loop, read = by.get((C_LOOP[r["method"]], *key)), by.get(("pagemap-read", *key))
        if c_loop and c_loop["harvest_ms"] > 0:
            r["vs_c_loop"] = round(r["harvest_ms"] / c_loop["harvest_ms"], 3)
        if read and r["harvest_ms"] > 0:
            r["read_speedup"] = round(read["harvest_ms"] / r["harvest_ms"], 2)


def _pages(runs) -> int:
    return sum(count for _, count in runs)


class _BenchGuest:
    """A memfd guest of ``size`` bytes, idle at GUEST_RATE steps/s, every page populated."""

    def __init__(self, size: int) -> None:
        from postcopy.guest import GuestClient, GuestParams, wait_for_control

        self.size = size
        self.idle_gap_ms = 0.0
        self._dir = tempfile.mkdtemp(prefix="postcopy-harvestbench-")
        sock = os.path.join(self._dir, "guest.sock")
        params = GuestParams(ram=size, threads=1, workload="idle", seed=1, steps=None, rate=GUEST_RATE)
        self.proc = subprocess.Popen(params.argv(control=sock), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        try:
            wait_for_control(sock, proc=self.proc)
            # Populating RAM page by page: ~2 min per GiB under software emulation.
            self.client = GuestClient(sock, timeout=120 + 240 * max(1, size // GiB))
            self.info = self.client.status()
            self.pid, self.base = self.info["pid"], self.info["ram_address"]
            self.page_size = self.info["page_size"]
            self.npages = size // self.page_size
            t0 = time.perf_counter()
            self.client.touch_spread(0, self.npages, self.npages)  # every page, once
            self.populate_ms = (time.perf_counter() - t0) * 1e3
        except BaseException:
            self.close()
            raise

    def touch(self, n: int, seed: int) -> None:
        if n:
            self.client.touch_spread(0, self.npages, n, seed=seed + 1)

    def full_read_ms(self, repeats: int) -> float:
        from postcopy.kernel.pagemap import Pagemap

        times = []
        with Pagemap(self.pid) as pagemap:
            for _ in range(repeats):
                t0 = time.perf_counter()
                pagemap.read(self.base, self.npages)
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            try:
                client.quit()
            except Exception:
                pass
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.communicate()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "_BenchGuest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (one line per row)."""
    cols = [("method", "method", "{}"), ("RAM", "ram_bytes", None), ("dirty", "dirty_pages", "{}"),
            ("reported", "reported_pages", "{}"), ("harvest ms", "harvest_ms", "{:.3f}"),
            ("min ms", "harvest_ms_min", "{:.3f}"), ("pause ms", "pause_ms", "{:.3f}"),
            ("worst gap ms", "worst_gap_ms", "{:.2f}"), ("idle gap ms", "idle_gap_ms", "{:.2f}"),
            ("vs C loop", "vs_c_loop", "{:.2f}x"),
            ("read/harvest", "read_speedup", "{:.1f}x")]
    cells = [[title for title, _, _ in cols]]
    for r in rows:
        line = []
        for _, key, fmt in cols:
            value = r.get(key)
            if key == "ram_bytes":
                line.append(_ram(value))
            elif value is None or (key in ("reported_pages", "pause_ms", "worst_gap_ms") and
                                   r["method"] == "pagemap-read"):
                line.append("-")
            else:
                line.append(fmt.format(value))
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _ram(value: int) -> str:
    return f"{value // GiB} GiB" if value % GiB == 0 else f"{value // MiB} MiB"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


_ABBREV = {"soft-dirty": "SD", "pagemap-scan": "PS"}
#: what the side-by-side table's columns mean
LEGEND = ("SD = soft-dirty, PS = pagemap-scan; per backend: harvest ms (median), guest pause ms (median), "
          "the guest's worst step gap ms during harvests, the raw C loop ms; SD/PS = harvest-time ratio; "
          "read ms = a full pagemap read; idle gap = worst step gap without harvests (noise floor)")


def side_by_side(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One line per (RAM, dirty count) with every backend's harvest ms, guest pause,
    worst step gap and raw C loop next to each other, the harvest-time ratio of
    soft-dirty to pagemap-scan when both ran, the full pagemap read and the idle gap.
    Returns (header, lines) of cells."""
    by = {(r["method"], r["ram_bytes"], r["dirty_pages"]): r for r in rows}
    backends = [b for b in C_LOOP if any(r["method"] == b for r in rows)]
    header = ["RAM", "dirty"]
    for b in backends:
        header += [f"{_ABBREV[b]} ms", f"{_ABBREV[b]} pause", f"{_ABBREV[b]} gap", f"{_ABBREV[b]} C ms"]
    both = len(backends) == 2
    if both:
        header.append("SD/PS")
    header += ["read ms", "idle gap"]
    lines = []
    keys = sorted({(r["ram_bytes"], r["dirty_pages"]) for r in rows})
    for size, n in keys:
        line = [_ram(size), str(n)]
        for b in backends:
            r, c = by.get((b, size, n)), by.get((C_LOOP[b], size, n))
            line += [_ms(r and r["harvest_ms"]), _ms(r and r["pause_ms"]),
                     "-" if r is None else f"{r['worst_gap_ms']:.2f}", _ms(c and c["harvest_ms"])]
        if both:
            sd, ps = by.get(("soft-dirty", size, n)), by.get(("pagemap-scan", size, n))
            line.append(f"{sd['harvest_ms'] / ps['harvest_ms']:.1f}x" if sd and ps and ps["harvest_ms"] > 0 else "-")
        read = by.get(("pagemap-read", size, n))
        any_row = next(r for r in rows if (r["ram_bytes"], r["dirty_pages"]) == (size, n))
        line += [_ms(read and read["harvest_ms"]), f"{any_row['idle_gap_ms']:.2f}"]
        lines.append(line)
    return header, lines


def format_side_by_side(rows: list[dict]) -> str:
    """:func:`side_by_side` as an aligned text table."""
    header, lines = side_by_side(rows)
    cells = [header, *lines]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    text = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def markdown(rows: list[dict], kernel: str) -> str:
    """The side-by-side table and every row, as Markdown."""
    header, lines = side_by_side(rows)
    out = [f"# Dirty-log harvest cost, kernel {kernel}", "",
           "Timings of one run; compare only inside this table (under emulation they are slow).", "",
           LEGEND + ".", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    out += ["", "## All rows", "", "```", format_table(rows), "```", ""]
    return "\n".join(out)


def _sizes(text: str) -> list[int]:
    from postcopy.units import parse_size

    return [parse_size(part) for part in text.split(",") if part]


def _counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part]
    if any(n < 0 for n in counts):
        raise ValueError("dirty page counts must be >= 0")
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m postcopy.bench.harvest [--sizes LIST] [--dirty LIST] [--repeats N]
    [--large] [--json FILE] [--markdown FILE]``: prints the side-by-side table, then
    every row."""
    import platform

    parser = argparse.ArgumentParser(prog="python -m postcopy.bench.harvest", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="guest RAM sizes, e.g. 256M,1G")
    parser.add_argument("--dirty", type=_counts, default=list(DEFAULT_DIRTY), help="dirty page counts, e.g. 0,100,10000")
    parser.add_argument("--large", action="store_true", help="add a 4 GiB guest")
    parser.add_argument("--repeats", type=int, default=5, help="harvests per figure (median)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON to FILE")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown to FILE")
    parser.add_argument("--show", metavar="FILE", help="measure nothing: print the side-by-side table of a "
                        "JSON file written by --json")
    args = parser.parse_args(argv)
    if args.show:
        return _show(args.show)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    rows = harvest_table(sizes=args.sizes, dirty=args.dirty, large=args.large, repeats=args.repeats,
                         progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    kernel = platform.release()
    print(f"kernel {kernel}: dirty-log harvest cost, backends side by side (ms; compare only inside this table)")
    print(LEGEND)
    print(format_side_by_side(rows))
    print()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kernel": kernel, "harvest": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, kernel))
    return 0


def _show(path: str) -> int:
    try:
        with open(path) as f:
            saved = json.load(f)
        rows = saved["harvest"]
        table = format_side_by_side(rows)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"harvest bench: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {saved.get('kernel', '?')}: dirty-log harvest cost, backends side by side "
          "(ms; compare only inside this table)")
    print(LEGEND)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
