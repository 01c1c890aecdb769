/*
 * pagemap_ops: /proc/PID/pagemap access for dirty logging and "which pages exist".
 *
 *  - pc_pagemap_read: raw 64-bit entries for a page range.
 *  - pc_pagemap_runs: the same range reduced in C to runs of pages whose entry has
 *    any bit of a mask set (or none, with invert), so Python never loops per page.
 *  - pc_pagemap_scan: one PAGEMAP_SCAN ioctl (Linux 6.7+).
 *  - pc_clear_refs: write /proc/PID/clear_refs (4 clears soft-dirty bits).
 *
 * PAGEMAP_SCAN's uapi (struct pm_scan_arg, page_region, PAGE_IS_*, PM_SCAN_*) is newer
 * than the build host's headers: defined here with pc_ names and #ifndef guards.
 */
#ifndef PC_PAGEMAP_OPS_H
#define PC_PAGEMAP_OPS_H

#include <stdint.h>
#include <sys/ioctl.h>

/* pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst) */
#define PC_PM_PRESENT (1ULL << 63)
#define PC_PM_SWAP (1ULL << 62)
#define PC_PM_FILE (1ULL << 61)
#define PC_PM_UFFD_WP (1ULL << 57)
#define PC_PM_EXCLUSIVE (1ULL << 56)
#define PC_PM_SOFT_DIRTY (1ULL << 55)

#ifndef PAGE_IS_WPALLOWED
#define PAGE_IS_WPALLOWED (1 << 0)
#endif
#ifndef PAGE_IS_WRITTEN
#define PAGE_IS_WRITTEN (1 << 1)
#endif
#ifndef PAGE_IS_FILE
#define PAGE_IS_FILE (1 << 2)
#endif
#ifndef PAGE_IS_PRESENT
#define PAGE_IS_PRESENT (1 << 3)
#endif
#ifndef PAGE_IS_SWAPPED
#define PAGE_IS_SWAPPED (1 << 4)
#endif
#ifndef PAGE_IS_PFNZERO
#define PAGE_IS_PFNZERO (1 << 5)
#endif
#ifndef PAGE_IS_HUGE
#define PAGE_IS_HUGE (1 << 6)
#endif
#ifndef PAGE_IS_SOFT_DIRTY
#define PAGE_IS_SOFT_DIRTY (1 << 7)
#endif
#ifndef PAGE_IS_GUARD
#define PAGE_IS_GUARD (1 << 8)
#endif
#ifndef PM_SCAN_WP_MATCHING
#define PM_SCAN_WP_MATCHING (1 << 0)
#endif
#ifndef PM_SCAN_CHECK_WPASYNC
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#endif

/* Layout of struct page_region / struct pm_scan_arg (include/uapi/linux/fs.h). */
struct pc_page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

struct pc_pm_scan_arg {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
};

#ifndef PAGEMAP_IOCTL_MAGIC
#define PAGEMAP_IOCTL_MAGIC 'f'
#endif
#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN _IOWR(PAGEMAP_IOCTL_MAGIC, 16, struct pc_pm_scan_arg)
#endif

/* Entries read per pread() by pc_pagemap_runs (bounded memory for any range). */
#define PC_PAGEMAP_CHUNK 8192

/* Reads npages entries from addr (page-aligned); returns entries read or -errno. */
int64_t pc_pagemap_read(int fd, uint64_t addr, uint64_t npages, uint64_t *out);

/*
 * Runs of pages in [addr, addr + npages pages) whose entry has any bit of mask set
 * ((entry & mask) == 0 instead when invert).  runs receives (first page index relative
 * to addr, count) pairs: 2 * max_runs slots.  Stops before opening run max_runs + 1:
 * *pages_done tells where to continue (npages when the whole range was scanned).
 * Returns the number of runs or -errno.
 */
int64_t pc_pagemap_runs(int fd, uint64_t addr, uint64_t npages, uint64_t mask, int invert,
			uint64_t *runs, uint64_t max_runs, uint64_t *pages_done);

/* One PAGEMAP_SCAN ioctl: number of regions written to arg->vec, or -errno. */
int64_t pc_pagemap_scan(int fd, struct pc_pm_scan_arg *arg);

/* Writes value to /proc/PID/clear_refs (pid 0: self); 0 or -errno. */
int pc_clear_refs(int pid, int value);

#endif /* PC_PAGEMAP_OPS_H */
