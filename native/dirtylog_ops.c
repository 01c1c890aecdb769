/* dirtylog_ops: see dirtylog_ops.h */
#define _GNU_SOURCE
#include "dirtylog_ops.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define SD_PRESENT (1ULL << 63)
#define SD_SOFT_DIRTY (1ULL << 55)

/* A run being collected: start page and whether one is open. */
struct run_acc {
    uint64_t *out;
    uint64_t cap, n, start;
    int open;
};

static inline void run_close(struct run_acc *r, uint64_t end)
{
    if (r->open) {
        r->out[2 * r->n] = r->start;
        r->out[2 * r->n + 1] = end - r->start;
        r->n++;
        r->open = 0;
    }
}

int64_t pc_softdirty_scan(int pagemap_fd, uint64_t addr, uint64_t npages, uint64_t *dirty,
                          uint64_t dirty_cap, uint64_t *absent, uint64_t absent_cap,
                          uint64_t *n_absent, uint64_t *pages_done)
{
    static __thread uint64_t buf[PC_SOFTDIRTY_CHUNK];
    struct run_acc d = {dirty, dirty_cap, 0, 0, 0};
    struct run_acc a = {absent, absent_cap, 0, 0, 0};
    const long ps = sysconf(_SC_PAGESIZE);
    uint64_t pg = 0;
    *n_absent = 0;
    while (pg < npages) {
        uint64_t want = npages - pg < PC_SOFTDIRTY_CHUNK ? npages - pg : PC_SOFTDIRTY_CHUNK;
        ssize_t got = pread(pagemap_fd, buf, want * 8, (off_t)((addr / (uint64_t)ps + pg) * 8));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got < 8)
            break; /* past the end of the address space */
        const uint64_t n = (uint64_t)got / 8;
        for (uint64_t i = 0; i < n; i++, pg++) {
            const uint64_t e = buf[i];
            const int is_dirty = (e & SD_SOFT_DIRTY) != 0;
            const int is_absent = absent_cap && !is_dirty && !(e & SD_PRESENT);
            if (is_dirty && !d.open) {
                if (d.n == d.cap)
                    goto stop;
                d.open = 1;
                d.start = pg;
            } else if (!is_dirty) {
                run_close(&d, pg);
            }
            if (is_absent && !a.open) {
                if (a.n == a.cap)
                    goto stop;
                a.open = 1;
                a.start = pg;
            } else if (!is_absent) {
                run_close(&a, pg);
            }
        }
    }
stop:
    run_close(&d, pg);
    run_close(&a, pg);
    *n_absent = a.n;
    *pages_done = pg;
    return (int64_t)d.n;
}

int64_t pc_wp_harvest(int pagemap_fd, uint64_t start, uint64_t end, uint64_t base,
                      struct pc_page_region *vec, uint64_t vec_len, uint64_t *runs,
                      uint64_t max_runs, uint64_t *next)
{
    const int shift = __builtin_ctzll((uint64_t)sysconf(_SC_PAGESIZE));
    uint64_t n = 0, pos = start;
    while (pos < end && n < max_runs && vec_len) {
        /* never more regions than runs left: each region is at most one new run */
        const uint64_t room = max_runs - n < vec_len ? max_runs - n : vec_len;
        struct pc_pm_scan_arg arg = {
            .size = sizeof(arg),
            .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            .start = pos,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = room,
            .category_mask = PAGE_IS_WRITTEN,
            .return_mask = PAGE_IS_WRITTEN,
        };
        long got = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        for (long i = 0; i < got; i++) {
            const uint64_t first = (vec[i].start - base) >> shift, count = (vec[i].end - vec[i].start) >> shift;
            if (n && runs[2 * n - 2] + runs[2 * n - 1] == first) {
                runs[2 * n - 1] += count; /* split by a buffer boundary */
            } else {
                runs[2 * n] = first;
                runs[2 * n + 1] = count;
                n++;
            }
        }
        if ((uint64_t)got < room) {
            pos = end; /* the buffer did not fill: the walk reached end */
            break;
        }
        /* Full buffer: go on. walk_end can lag behind the last region after several
         * bounce-buffer flushes, so never restart before that region's end. */
        pos = arg.walk_end > vec[got - 1].end ? arg.walk_end : vec[got - 1].end;
    }
    *next = pos;
    return (int64_t)n;
}
