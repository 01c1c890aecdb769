/*
 * dirtylog_ops: the pagemap pass of the soft-dirty dirty log.
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
