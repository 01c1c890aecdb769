"""The populated pages of a memfd guest's RAM (native/file_ops.c pc_memfd_data_runs):
mincore and SEEK_DATA in short calls give exactly the runs a page-by-page SEEK_DATA
gives, across the 64 MiB chunks mincore is asked in, and say when they do not fit."""
from __future__ import annotations

import errno
import mmap
import os
import random

import pytest

from postcopy._native import ffi, lib

PS = mmap.PAGESIZE
CHUNK_PAGES = 16384  # MINCORE_CHUNK_PAGES


def _truth(fd: int, npages: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for page in range(npages):
        try:
            data = os.lseek(fd, page * PS, os.SEEK_DATA) == page * PS
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            data = False
        if data and runs and sum(runs[-1]) == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif data:
            runs.append((page, 1))
    return runs


def _runs(fd: int, view: mmap.mmap, npages: int, max_runs: int) -> list[tuple[int, int]] | int:
    out = ffi.new("uint64_t[]", 2 * max_runs)
    n = lib.pc_memfd_data_runs(fd, ffi.from_buffer(view), npages, PS, out, max_runs)
    return n if n < 0 else [(out[2 * i], out[2 * i + 1]) for i in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_runs_match_a_page_by_page_seek_across_chunks(seed):
    rng = random.Random(seed)
    npages = 2 * CHUNK_PAGES + 77  # three mincore calls, the last one short
    fd = os.memfd_create("memfd-runs-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, npages * PS)
        pages = set(rng.sample(range(npages), 300)) | {0, CHUNK_PAGES - 1, CHUNK_PAGES, npages - 1}
        pages |= set(range(CHUNK_PAGES - 10, CHUNK_PAGES + 10))  # a run across a chunk boundary
        for page in pages:
            os.pwrite(fd, b"\x01", page * PS + rng.randrange(PS))
        if seed % 2:  # a hole punched back into a run
            os.pwrite(fd, b"\x00" * PS, 0)
            lib.pc_punch_hole(fd, (CHUNK_PAGES - 5) * PS, 3 * PS)
        view = mmap.mmap(fd, npages * PS, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            truth = _truth(fd, npages)
            assert _runs(fd, view, npages, npages // 2 + 1) == truth
            assert _runs(fd, view, npages, len(truth) - 1) == -errno.ENOSPC
        finally:
            view.close()
    finally:
        os.close(fd)


def test_an_empty_memfd_has_no_runs():
    fd = os.memfd_create("memfd-runs-empty", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 64 * PS)
        with mmap.mmap(fd, 64 * PS, mmap.MAP_SHARED, mmap.PROT_READ) as view:
            assert _runs(fd, view, 64, 33) == []
    finally:
        os.close(fd)
