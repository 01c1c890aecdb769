/* harvest_bench: see harvest_bench.h */
#define _GNU_SOURCE
#include "harvest_bench.h"

#include <errno.h>
#include <sys/types.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int64_t pc_bench_pagemap_harvest(int fd, uint64_t start, uint64_t end, struct pc_page_region *vec,
                                 uint64_t vec_len, uint64_t *regions, uint64_t *pages)
{
    const uint64_t ps = (uint64_t)sysconf(_SC_PAGESIZE);
    struct pc_pm_scan_arg arg;
    uint64_t nreg = 0, npg = 0;
    const uint64_t t0 = now_ns();
    uint64_t pos = start;
    while (pos < end) {
        arg = (struct pc_pm_scan_arg){
            .size = sizeof(arg),
            .flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            .start = pos,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = vec_len,
            .category_mask = PAGE_IS_WRITTEN,
            .return_mask = PAGE_IS_WRITTEN,
        };
        long n = ioctl(fd, PAGEMAP_SCAN, &arg);
        if (n < 0)
            return -errno;
        for (long i = 0; i < n; i++)
            npg += (vec[i].end - vec[i].start) / ps;
        nreg += (uint64_t)n;
        if ((uint64_t)n < vec_len)
            break; /* the buffer did not fill: the walk reached end */
        /* walk_end can lag behind the last region after several bounce-buffer flushes */
        pos = arg.walk_end > vec[n - 1].end ? arg.walk_end : vec[n - 1].end;
    }
    const uint64_t t1 = now_ns();
    *regions = nreg;
    *pages = npg;
    return (int64_t)(t1 - t0);
}

int64_t pc_bench_softdirty_harvest(int fd, int pid, uint64_t start, uint64_t npages, uint64_t *pages)
{
    static __thread uint64_t buf[PC_SOFTDIRTY_CHUNK];
    const uint64_t ps = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t done = 0, npg = 0;
    const uint64_t t0 = now_ns();
    while (done < npages) {
        const uint64_t want = npages - done < PC_SOFTDIRTY_CHUNK ? npages - done : PC_SOFTDIRTY_CHUNK;
        const ssize_t got = pread(fd, buf, want * 8, (off_t)((start / ps + done) * 8));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got < 8)
            return -EIO; /* the pagemap ends inside the range */
        const uint64_t n = (uint64_t)got / 8;
        for (uint64_t i = 0; i < n; i++)
            npg += (buf[i] >> 55) & 1;
        done += n;
    }
    const int rc = pc_clear_refs(pid, 4);
    if (rc < 0)
        return rc;
    const uint64_t t1 = now_ns();
    *pages = npg;
    return (int64_t)(t1 - t0);
}
