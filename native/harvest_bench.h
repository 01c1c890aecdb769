/*
 * harvest_bench: the C baseline of a pagemap-scan dirty-log harvest. The same
 * PAGEMAP_SCAN ioctl loop the Python backend runs (WP_MATCHING | CHECK_WPASYNC, pages
 * in category PAGE_IS_WRITTEN, continue after a full output buffer), with nothing on
 * top: what the Python harvest costs beyond this is its own overhead. Likewise for
 * soft-dirty: one read of the range's pagemap entries (bit 55 counted) and the clear
 * (clear_refs 4), the floor for the soft-dirty backend (the caller pauses the guest).
 */
#ifndef PC_HARVEST_BENCH_H
#define PC_HARVEST_BENCH_H

#include <stdint.h>

#include "dirtylog_ops.h"
#include "pagemap_ops.h"

/*
 * Harvests [start, end) of the pagemap open as fd into vec (vec_len regions per ioctl,
 * reused). *regions and *pages receive what was reported. Returns the wall time in
 * nanoseconds, or -errno.
 */
int64_t pc_bench_pagemap_harvest(int fd, uint64_t start, uint64_t end, struct pc_page_region *vec,
                                 uint64_t vec_len, uint64_t *regions, uint64_t *pages);

/*
 * Reads npages pagemap entries from page-aligned start (PC_SOFTDIRTY_CHUNK entries per
 * pread), counts the soft-dirty ones into *pages, then writes 4 to /proc/pid/clear_refs.
 * Returns the wall time of read + clear in nanoseconds, or -errno.
 */
int64_t pc_bench_softdirty_harvest(int fd, int pid, uint64_t start, uint64_t npages, uint64_t *pages);

#endif /* PC_HARVEST_BENCH_H */
