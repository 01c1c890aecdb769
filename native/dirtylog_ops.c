/* dirtylog_ops: see dirtylog_ops.h */
#define _GNU_SOURCE
#include "dirtylog_ops.h"

#include <errno.h>
#include <stdlib.h>
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
