#define _GNU_SOURCE
#include "file_ops.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

int pc_punch_hole(int fd, uint64_t offset, uint64_t length)
{
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length))
        return -errno;
    return 0;
}

#define MINCORE_CHUNK_PAGES (16384u) /* 64 MiB of 4 KiB pages per call: a short one */

struct run_list {
    uint64_t *runs, n, max;
};

/* Adds [first, first + count) as data, joined to the last run when adjacent. */
static int add_run(struct run_list *l, uint64_t first, uint64_t count)
{
    if (l->n && l->runs[2 * (l->n - 1)] + l->runs[2 * (l->n - 1) + 1] == first) {
        l->runs[2 * (l->n - 1) + 1] += count;
        return 0;
    }
    if (l->n == l->max)
        return -ENOSPC;
    l->runs[2 * l->n] = first;
    l->runs[2 * l->n + 1] = count;
    l->n++;
    return 0;
}

/* Pages [a, b) are not in the page cache: any data among them was swapped out. */
static int absent_range(int memfd, uint64_t a, uint64_t b, uint32_t ps, struct run_list *l)
{
    off_t data = lseek(memfd, (off_t)(a * ps), SEEK_DATA);
    if (data < 0)
        return errno == ENXIO ? 0 : -errno; /* no data after a */
    uint64_t first = (uint64_t)data / ps;
    return first < b ? add_run(l, first, b - first) : 0;
}

int64_t pc_memfd_data_runs(int memfd, const void *map, uint64_t npages, uint32_t page_size, uint64_t *runs,
                           uint64_t max_runs)
{
    unsigned char *vec = malloc(MINCORE_CHUNK_PAGES);
    if (!vec)
        return -ENOMEM;
    struct run_list l = {.runs = runs, .max = max_runs};
    uint64_t absent_from = 0; /* start of the absent range being walked (when in_absent) */
    int in_absent = 0, rc = 0;
    for (uint64_t base = 0; base < npages && !rc; base += MINCORE_CHUNK_PAGES) {
        uint64_t n = npages - base < MINCORE_CHUNK_PAGES ? npages - base : MINCORE_CHUNK_PAGES;
        if (mincore((char *)map + base * page_size, n * page_size, vec)) {
            rc = -errno;
            break;
        }
        for (uint64_t i = 0; i < n && !rc; i++) {
            uint64_t page = base + i;
            if (vec[i] & 1) {
                if (in_absent)
                    rc = absent_range(memfd, absent_from, page, page_size, &l);
                in_absent = 0;
                if (!rc)
                    rc = add_run(&l, page, 1);
            } else if (!in_absent) {
                in_absent = 1;
                absent_from = page;
            }
        }
    }
    if (!rc && in_absent)
        rc = absent_range(memfd, absent_from, npages, page_size, &l);
    free(vec);
    return rc ? rc : (int64_t)l.n;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

int pc_populate_write(void *addr, uint64_t length)
{
    return madvise(addr, length, MADV_POPULATE_WRITE) == 0 ? 0 : -errno;
}

void pc_fault_around_span(uint64_t address, uint64_t size, uint64_t offset, uint64_t len, uint64_t *start,
                          uint64_t *end)
{
    uint64_t lo = (address + offset) / PC_FAULT_AROUND * PC_FAULT_AROUND;
    uint64_t hi = (address + offset + len + PC_FAULT_AROUND - 1) / PC_FAULT_AROUND * PC_FAULT_AROUND;
    *start = lo < address ? 0 : lo - address;
    *end = hi - address > size ? size : hi - address;
}

void pc_drop_mapped(const void *map, uint64_t size, uint64_t offset, uint64_t len)
{
    uint64_t start, end;
    pc_fault_around_span((uint64_t)(uintptr_t)map, size, offset, len, &start, &end);
    madvise((void *)((uintptr_t)map + start), end - start, MADV_DONTNEED);
}
