#ifndef PC_FILE_OPS_H
#define PC_FILE_OPS_H
#include <stdint.h>

/* Punch a hole in a file (a guest's memfd): its pages are freed and unmapped from
 * every mapping, so a userfaultfd-registered shmem range faults them in as missing.
 * Returns 0 or -errno. */
int pc_punch_hole(int fd, uint64_t offset, uint64_t length);

/*
 * The data runs of a memfd of npages pages (first, count pairs into runs, at most
 * max_runs; returns how many, or -errno; -ENOSPC if they do not fit), in short system
 * calls only. The one-sweep way (SEEK_DATA, then SEEK_HOLE to the end of each data
 * extent) walks a whole extent in one call, ~9 ms per populated GiB, and a kernel
 * without preemption (PREEMPT_NONE) lets nothing else run on that CPU meanwhile, not
 * even a real-time demand server woken there (seen: an 18 ms stall of a 2 GiB guest's
 * first faults). Here mincore(2) over `map` (a shared mapping of the memfd: nothing
 * is faulted in), 64 MiB per call, finds the pages in the page cache or the swap cache;
 * each range it finds absent is asked with SEEK_DATA, which walks only that range's
 * empty slots: data inside it (pages swapped out) makes the rest of the range a data
 * run, which at worst sends some zero pages as data, never a data page as zero.
 */
int64_t pc_memfd_data_runs(int memfd, const void *map, uint64_t npages, uint32_t page_size, uint64_t *runs,
                           uint64_t max_runs);

/*
 * Allocate and map every page of [addr, addr + length) for writing
 * (MADV_POPULATE_WRITE, Linux 5.14; defined here for older headers). A call from
 * Python's mmap.madvise holds the GIL throughout: populating a 2 GiB guest here takes
 * 1-5 s, and the destination's watchdog keeper (a Python thread renewing the incoming
 * guest's 2 s watchdog every second) starved, so the guest stopped itself. cffi
 * releases the GIL around this call. Returns 0 or -errno.
 */
int pc_populate_write(void *addr, uint64_t length);

/*
 * After reading [offset, offset + len) of a shared file mapping of `size` bytes at
 * `map` (to tag it), drop those pages from this mapping again (from the process's RSS,
 * not from the file), with the neighbours the kernel's fault-around mapped on each
 * fault: windows of PC_FAULT_AROUND bytes (its default fault_around_bytes) aligned in
 * virtual addresses, while a mapping starts only page aligned (widened by offset into
 * the mapping instead, a run left up to 15 pages mapped at its edges).
 * pc_fault_around_span gives the byte range [*start, *end) of the mapping it drops.
 */
#define PC_FAULT_AROUND (64u << 10)
void pc_fault_around_span(uint64_t address, uint64_t size, uint64_t offset, uint64_t len, uint64_t *start,
                          uint64_t *end);
void pc_drop_mapped(const void *map, uint64_t size, uint64_t offset, uint64_t len);

#endif
