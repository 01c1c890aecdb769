/* guest_vm: the guest's "virtual machine": RAM layout, vCPU step loop, RAM hash.
 *
 * All guest state lives in guest RAM. Page 0 is the state page: a header (struct
 * pc_guest_hdr) and one 64-byte record per vCPU (struct pc_vcpu_state). Then a
 * read-only shared slice filled once at boot, then one private slice per vCPU. A step of
 * vCPU t advances t's RNG, reads one word of the shared slice and writes one word of
 * t's own slice, so the RAM after K steps per vCPU depends only on the parameters in
 * the header, never on timing or interleaving.
 *
 * Free pages (free_fraction > 0): the last pages of each slice hold the vCPU's page
 * table, perm[ws_pages] (uint32): perm[0, used) are the working-set pages in use,
 * perm[used, ws) the free ones (initially the tail of the working set). A step picks
 * an index in [0, used) and writes page perm[index]. Every free_period steps the vCPU
 * swaps a random in-use entry with a random free one and zero-fills the page it takes
 * back (a free page's content is undefined: a migration may skip it). The hash counts
 * free pages as zero pages. With free_fraction 0 all free fields are 0 and the layout,
 * the state page and the hash are those of a guest without the feature.
 */
#ifndef PC_GUEST_VM_H
#define PC_GUEST_VM_H

#include <stdint.h>

#define PC_GUEST_MAGIC 0x3154534555474350ULL /* "PCGUEST1" little endian */
#define PC_GUEST_VERSION 1
#define PC_GUEST_MAX_THREADS 56
#define PC_GUEST_VCPU_OFFSET 512 /* vCPU records start here in the state page */
#define PC_GUEST_SHARED_MAX (1ULL << 20)

enum pc_workload {
    PC_WL_IDLE = 0,
    PC_WL_RANDOM_WRITE = 1,
    PC_WL_SEQUENTIAL = 2,
    PC_WL_HOTSPOT = 3,
};

/* pc_vcpu_run results */
#define PC_VCPU_LIMIT 0  /* reached the step limit it was given */
#define PC_VCPU_PAUSED 1 /* saw the pause flag; parked at a step boundary */

/* pc_guest_check / pc_guest_boot errors (negative) */
#define PC_GUEST_EBADMAGIC (-1)
#define PC_GUEST_EVERSION (-2)
#define PC_GUEST_ESIZE (-3)
#define PC_GUEST_ETHREADS (-4)
#define PC_GUEST_EWORKLOAD (-5)
#define PC_GUEST_ELAYOUT (-6)
#define PC_GUEST_EPARAM (-7)

/* Header at offset 0 of the state page (stored in guest RAM). */
struct pc_guest_hdr {
    uint64_t magic;
    uint32_t version;
    uint32_t page_size;
    uint64_t ram_size;
    uint32_t threads;
    uint32_t workload;
    uint64_t seed;
    uint64_t steps_target; /* per vCPU; 0 = unlimited */
    double rate;           /* steps/s per vCPU as given; 0 = unlimited (idle: 1000) */
    double working_set;    /* fraction (0, 1] of each private slice that is written */
    /* Layout, derived from the above at boot and checked on load. */
    uint64_t shared_off, shared_len;
    uint64_t slice_off, slice_len; /* vCPU t's slice: slice_off + t * slice_len */
    uint64_t ws_pages;             /* pages of each slice in the working set */
    uint64_t hot_pages;            /* hotspot: the hot part of the working set */
    /* Free pages; all zero without --free-fraction (see above). */
    double free_fraction;
    uint64_t free_pages;  /* per vCPU: working-set pages free at any time */
    uint64_t used_pages;  /* per vCPU: ws_pages - free_pages */
    uint64_t perm_off;    /* offset of perm[] inside each slice */
    uint64_t free_period; /* steps between two free/reuse swaps */
};

/* One per vCPU in the state page, 64 bytes so vCPUs never share a cache line. */
struct pc_vcpu_state {
    uint64_t steps_done;
    uint64_t rng[4];      /* xoshiro256** */
    uint64_t heartbeat_ns; /* CLOCK_MONOTONIC after the latest step; not hashed */
    uint64_t reserved[2];
};

/* Process-local per-vCPU bookkeeping (NOT in guest RAM), written by the vCPU thread so
 * that status queries never touch guest RAM (which may be missing under userfaultfd). */
struct pc_vcpu_local {
    uint64_t steps_done;    /* mirror of the RAM counter */
    uint64_t first_step_ns; /* first step completed in the latest pc_vcpu_run; 0 = none */
    uint64_t last_step_ns;  /* latest step completed; 0 = none */
    uint64_t max_gap_ns;    /* longest time between two steps (across pauses) since reset */
    uint64_t pad[4];
};

/* Process-local pacing a vCPU reads every step (NOT guest state: not in RAM, not hashed,
 * not migrated). throttle_pct 1..99: after every PC_THROTTLE_SLICE_NS of running the
 * vCPU parks 10 ms * pct / (100 - pct) (QEMU's auto-converge); cap_interval_ns: at
 * least this long between two steps (a run-time rate cap; 0 = none). */
#define PC_THROTTLE_SLICE_NS 10000000ULL
struct pc_vcpu_pace {
    uint32_t throttle_pct;
    uint32_t pad;
    uint64_t cap_interval_ns;
};

/* Plain copy of the header plus nothing else; filled by pc_guest_check. */
struct pc_guest_info {
    uint64_t ram_size, page_size, seed, steps_target;
    uint32_t threads, workload;
    double rate, working_set;
    uint64_t shared_off, shared_len, slice_off, slice_len, ws_pages, hot_pages;
    double free_fraction;
    uint64_t free_pages, used_pages, perm_off, free_period;
};

#define PC_GUEST_FREE_PERIOD 256

/* Compute the layout for these parameters; 0 or a negative PC_GUEST_E* code.
 * free_fraction in [0, 1): the part of each working set that is free at any time. */
int pc_guest_layout(uint64_t ram_size, uint64_t page_size, uint32_t threads, uint32_t workload,
                    double working_set, double free_fraction, struct pc_guest_info *out);
/* Write a fresh state page, shared slice and page tables into (zeroed) RAM; 0 or
 * PC_GUEST_E*. */
int pc_guest_boot(void *ram, uint64_t ram_size, uint64_t page_size, uint32_t threads,
                  uint32_t workload, uint64_t seed, uint64_t steps_target, double rate,
                  double working_set, double free_fraction);
/* Validate the state page against the mapping and copy it to *out (reads guest RAM). */
int pc_guest_check(const void *ram, uint64_t ram_size, uint64_t page_size,
                   struct pc_guest_info *out);
/* Run vCPU tid until its steps_done reaches limit (PC_VCPU_LIMIT) or *pause_flag is
 * set (PC_VCPU_PAUSED). Call with a checked RAM. */
int pc_vcpu_run(void *ram, uint64_t ram_size, int tid, volatile int *pause_flag,
                uint64_t limit, struct pc_vcpu_local *local, const struct pc_vcpu_pace *pacing);
/* Copy the per-vCPU step counters out of guest RAM into local[] (reads guest RAM). */
void pc_guest_load_locals(const void *ram, struct pc_vcpu_local *local, int threads);

/* 64-bit hash of the whole RAM, timing fields (heartbeats, rate) excluded. Pages known to read as zero are
 * not touched: memfd >= 0 uses SEEK_DATA/SEEK_HOLE, otherwise /proc/self/pagemap
 * (not present and not swapped). */
uint64_t pc_guest_hash(const void *ram, uint64_t ram_size, uint64_t page_size, int memfd);

/* mmap guest RAM: MAP_SHARED of fd, or private anonymous when fd < 0. NULL + errno. */
void *pc_guest_map(uint64_t size, int fd);
/* Make [off, off+len) read as missing/zero: MADV_DONTNEED, then for memfd
 * fallocate(PUNCH_HOLE). 0 or -errno. */
int pc_guest_discard(void *ram, uint64_t off, uint64_t len, int memfd);

/* Free pages right now, as sorted, merged runs (first page, count) in runs[2 * max_runs].
 * Returns the number of runs (more than max_runs: call again with that much room),
 * or -errno. Reads the page tables in guest RAM while vCPUs may run: a page seen free
 * may be taken back right after, but is zero-filled only after it left the table. */
int64_t pc_guest_free_runs(const void *ram, uint64_t ram_size, uint64_t page_size,
                           uint64_t *runs, uint64_t max_runs);
/* A write to each page that leaves its content unchanged (atomic OR of 0 into its
 * first word): dirties the page for any dirty log, populates it if it was not.
 * pages[] are page indexes below ram_size / page_size; 0 or -EINVAL. */
int pc_guest_touch(void *ram, uint64_t ram_size, uint64_t page_size, const uint64_t *pages,
                   uint64_t n);
/* The same for n distinct pseudo-random pages of [first, first + count), chosen from
 * seed (an affine permutation: no memory, no repeats; n == count goes in order);
 * 0 or -EINVAL. */
int pc_guest_touch_spread(void *ram, uint64_t ram_size, uint64_t page_size, uint64_t first,
                          uint64_t count, uint64_t n, uint64_t seed);
/* Longest step gap of any vCPU since the last call (and reset them to 0). */
uint64_t pc_vcpu_take_max_gap(struct pc_vcpu_local *local, int threads);

struct pc_vcpu_local *pc_vcpu_locals_new(int n);
void pc_vcpu_locals_free(struct pc_vcpu_local *p);
uint64_t pc_monotonic_ns(void);

#endif /* PC_GUEST_VM_H */
