/*
 * dirtylog_ops: the kernel-facing loops of the dirty logs.
 *
 * pc_wp_harvest: the pagemap-scan harvest. PAGEMAP_SCAN with PM_SCAN_WP_MATCHING |
 * PM_SCAN_CHECK_WPASYNC over a range, continued after a full output buffer, reduced
 * to runs of page indexes so that Python only unpacks one flat array (a per-region
 * Python loop costs more than the ioctl once thousands of pages are dirty).
 *
 * pc_softdirty_scan: the pagemap pass of the soft-dirty dirty log.
 *
 * One read of the guest's pagemap range (in fixed-size chunks) reduced in C to runs of
 * soft-dirty pages and, optionally, runs of "absent" pages (neither present nor
 * soft-dirty). Both come from the same read because the harvest keeps the guest
 * paused across read + clear_refs: a second pass would double the pause.
 *
 * Why absent pages matter (memfd RAM): a shared page that is reclaimed to swap loses
 * its PTE, and with it the soft-dirty bit, while the page keeps the data written since
 * the last harvest. The caller reports every absent page that still has data in the
 * memfd (SEEK_DATA) as dirty: extra reports, never a lost write.
 */
#ifndef PC_DIRTYLOG_OPS_H
#define PC_DIRTYLOG_OPS_H

#include <stdint.h>

#include "pagemap_ops.h"

/*
 * Harvests written pages of [start, end) (page aligned) from a pagemap fd whose range
 * is registered for async uffd-wp: reports them and write-protects them again, in one
 * walk per ioctl. runs receives (first page index relative to base, count), sorted and
 * merged, 2 * max_runs slots; vec (vec_len regions) is scratch. Stops when runs is
 * full: *next is where to continue (>= end when the range is done).
 * Returns the number of runs or -errno.
 */
int64_t pc_wp_harvest(int pagemap_fd, uint64_t start, uint64_t end, uint64_t base,
                      struct pc_page_region *vec, uint64_t vec_len, uint64_t *runs,
                      uint64_t max_runs, uint64_t *next);

/* Entries read per pread() by pc_softdirty_scan. */
#define PC_SOFTDIRTY_CHUNK 8192

/*
 * Scans npages pagemap entries from page-aligned addr. dirty receives runs (first page
 * index relative to addr, count) of entries with the soft-dirty bit: 2 * dirty_cap
 * slots. If absent_cap > 0, absent receives runs of entries with neither the present
 * nor the soft-dirty bit (2 * absent_cap slots) and *n_absent their number.
 * Stops before a run that would not fit: *pages_done says where to continue (npages
 * when the whole range was scanned; a run may continue in the next call).
 * Returns the number of dirty runs or -errno.
 */
int64_t pc_softdirty_scan(int pagemap_fd, uint64_t addr, uint64_t npages, uint64_t *dirty,
                          uint64_t dirty_cap, uint64_t *absent, uint64_t absent_cap,
                          uint64_t *n_absent, uint64_t *pages_done);

#endif /* PC_DIRTYLOG_OPS_H */
