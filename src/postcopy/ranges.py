"""Arithmetic on sorted lists of page runs ``(first_page, npages)``."""
from __future__ import annotations

from typing import Iterable

Runs = list[tuple[int, int]]


def normalize(runs: Iterable[tuple[int, int]]) -> Runs:
    """Sort, drop empty runs and merge overlapping or touching ones."""
    out: Runs = []
    for first, count in sorted(r for r in runs if r[1] > 0):
        if out and first <= out[-1][0] + out[-1][1]:
            last_first, last_count = out[-1]
            out[-1] = (last_first, max(last_count, first + count - last_first))
        else:
            out.append((first, count))
    return out


def subtract(runs: Runs, remove: Runs) -> Runs:
    """Pages of ``runs`` that are not in ``remove`` (both normalized)."""
    out: Runs = []
    j = 0
    for first, count in runs:
        pos, end = first, first + count
        while j < len(remove) and remove[j][0] + remove[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(remove) and remove[k][0] < end:
            r_first, r_end = remove[k][0], remove[k][0] + remove[k][1]
            if r_first > pos:
                out.append((pos, r_first - pos))
            pos = max(pos, r_end)
            k += 1
        if pos < end:
            out.append((pos, end - pos))
    return out


def total(runs: Iterable[tuple[int, int]]) -> int:
    """Number of pages in the runs."""
    return sum(count for _, count in runs)


def split(runs: Iterable[tuple[int, int]], max_pages: int) -> Runs:
    """Cut runs longer than ``max_pages`` (one frame each)."""
    out: Runs = []
    for first, count in runs:
        while count > 0:
            n = min(count, max_pages)
            out.append((first, n))
            first += n
            count -= n
    return out
