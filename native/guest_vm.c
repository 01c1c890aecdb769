/* guest_vm: RAM layout, vCPU step loop and RAM hash of the postcopy guest.
 * See guest_vm.h for the layout; the Python side (postcopy/guest/runtime.py) holds
 * the policy (threads, pause/resume, control socket). */
#define _GNU_SOURCE
#include "guest_vm.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef MADV_NOHUGEPAGE
#define MADV_NOHUGEPAGE 15
#endif

#define PM_PRESENT (1ULL << 63)
#define PM_SWAP (1ULL << 62)

_Static_assert(sizeof(struct pc_guest_hdr) <= PC_GUEST_VCPU_OFFSET, "header overlaps vCPU records");
_Static_assert(sizeof(struct pc_vcpu_state) == 64, "vCPU record is one cache line");
_Static_assert(PC_GUEST_VCPU_OFFSET + PC_GUEST_MAX_THREADS * 64 <= 4096, "state page overflow");
_Static_assert(sizeof(struct pc_vcpu_local) == 64, "local record is one cache line");

static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* Uniform-enough index in [0, n) from the high bits of r, without a division. */
static inline uint64_t mulhi(uint64_t r, uint64_t n) { return (uint64_t)(((unsigned __int128)r * n) >> 64); }

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline struct pc_vcpu_state *vcpu_state(void *ram, int tid)
{
    return (struct pc_vcpu_state *)((char *)ram + PC_GUEST_VCPU_OFFSET) + tid;
}

uint64_t pc_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int pc_guest_layout(uint64_t ram_size, uint64_t page_size, uint32_t threads, uint32_t workload,
                    double working_set, double free_fraction, struct pc_guest_info *out)
{
    if (page_size < 64 || (page_size & (page_size - 1)) || ram_size % page_size)
        return PC_GUEST_ESIZE;
    if (threads < 1 || threads > PC_GUEST_MAX_THREADS)
        return PC_GUEST_ETHREADS;
    if (workload > PC_WL_HOTSPOT)
        return PC_GUEST_EWORKLOAD;
    if (!(working_set > 0.0 && working_set <= 1.0))
        return PC_GUEST_EPARAM;
    if (!(free_fraction >= 0.0 && free_fraction < 1.0))
        return PC_GUEST_EPARAM;
    uint64_t shared = ram_size / 16;
    if (shared > PC_GUEST_SHARED_MAX)
        shared = PC_GUEST_SHARED_MAX;
    shared -= shared % page_size;
    if (shared < page_size)
        shared = page_size;
    if (ram_size < page_size + shared + threads * page_size)
        return PC_GUEST_ELAYOUT;
    uint64_t slice_pages = (ram_size - page_size - shared) / page_size / threads;
    /* With free pages, the slice ends with perm[] (4 bytes per working-set page, sized
     * for a working set of the whole slice so the layout needs no iteration). */
    uint64_t perm_pages = free_fraction > 0.0 ? (4 * slice_pages + page_size - 1) / page_size : 0;
    if (perm_pages >= slice_pages)
        return PC_GUEST_ELAYOUT;
    uint64_t usable = slice_pages - perm_pages;
    uint64_t ws = (uint64_t)((double)usable * working_set);
    if (ws < 1)
        ws = 1;
    if (ws > usable)
        ws = usable;
    uint64_t nfree = 0, used = 0;
    if (free_fraction > 0.0) {
        nfree = (uint64_t)((double)ws * free_fraction);
        if (nfree >= ws)
            nfree = ws - 1; /* at least one page in use */
        used = ws - nfree;
    }
    uint64_t hot = (used ? used : ws) / 10;
    memset(out, 0, sizeof(*out));
    out->ram_size = ram_size;
    out->page_size = page_size;
    out->threads = threads;
    out->workload = workload;
    out->working_set = working_set;
    out->shared_off = page_size;
    out->shared_len = shared;
    out->slice_off = page_size + shared;
    out->slice_len = slice_pages * page_size;
    out->ws_pages = ws;
    out->hot_pages = hot ? hot : 1;
    if (free_fraction > 0.0) {
        out->free_fraction = free_fraction;
        out->free_pages = nfree;
        out->used_pages = used;
        out->perm_off = usable * page_size;
        out->free_period = PC_GUEST_FREE_PERIOD;
    }
    return 0;
}

static inline uint32_t *vcpu_perm(void *ram, const struct pc_guest_info *info, uint64_t tid)
{
    return (uint32_t *)((char *)ram + info->slice_off + tid * info->slice_len + info->perm_off);
}

int pc_guest_boot(void *ram, uint64_t ram_size, uint64_t page_size, uint32_t threads,
                  uint32_t workload, uint64_t seed, uint64_t steps_target, double rate,
                  double working_set, double free_fraction)
{
    struct pc_guest_info lay;
    int rc = pc_guest_layout(ram_size, page_size, threads, workload, working_set, free_fraction, &lay);
    if (rc)
        return rc;
    if (!(rate >= 0.0))
        return PC_GUEST_EPARAM;
    struct pc_guest_hdr *h = ram;
    memset(ram, 0, page_size);
    h->magic = PC_GUEST_MAGIC;
    h->version = PC_GUEST_VERSION;
    h->page_size = (uint32_t)page_size;
    h->ram_size = ram_size;
    h->threads = threads;
    h->workload = workload;
    h->seed = seed;
    h->steps_target = steps_target;
    h->rate = rate;
    h->working_set = working_set;
    h->shared_off = lay.shared_off;
    h->shared_len = lay.shared_len;
    h->slice_off = lay.slice_off;
    h->slice_len = lay.slice_len;
    h->ws_pages = lay.ws_pages;
    h->hot_pages = lay.hot_pages;
    h->free_fraction = lay.free_fraction;
    h->free_pages = lay.free_pages;
    h->used_pages = lay.used_pages;
    h->perm_off = lay.perm_off;
    h->free_period = lay.free_period;
    if (lay.free_fraction > 0.0) {
        /* Identity: the free pages start as the tail of each working set. */
        for (uint32_t t = 0; t < threads; t++) {
            uint32_t *perm = vcpu_perm(ram, &lay, t);
            for (uint64_t k = 0; k < lay.ws_pages; k++)
                perm[k] = (uint32_t)k;
        }
    }
    for (uint32_t t = 0; t < threads; t++) {
        uint64_t x = seed ^ ((uint64_t)(t + 1) * 0xD1B54A32D192ED03ULL);
        struct pc_vcpu_state *v = vcpu_state(ram, (int)t);
        for (int i = 0; i < 4; i++)
            v->rng[i] = splitmix64(&x);
    }
    uint64_t x = seed ^ 0x5348415245445f31ULL; /* "SHARED_1" */
    uint64_t *shared = (uint64_t *)((char *)ram + lay.shared_off);
    for (uint64_t i = 0; i < lay.shared_len / 8; i++)
        shared[i] = splitmix64(&x);
    return 0;
}

int pc_guest_check(const void *ram, uint64_t ram_size, uint64_t page_size,
                   struct pc_guest_info *out)
{
    struct pc_guest_hdr h;
    memcpy(&h, ram, sizeof(h)); /* one read of guest RAM; may fault under userfaultfd */
    if (h.magic != PC_GUEST_MAGIC)
        return PC_GUEST_EBADMAGIC;
    if (h.version != PC_GUEST_VERSION)
        return PC_GUEST_EVERSION;
    if (h.ram_size != ram_size || h.page_size != page_size)
        return PC_GUEST_ESIZE;
    struct pc_guest_info lay;
    int rc = pc_guest_layout(h.ram_size, h.page_size, h.threads, h.workload, h.working_set,
                             h.free_fraction, &lay);
    if (rc)
        return rc;
    if (lay.shared_off != h.shared_off || lay.shared_len != h.shared_len ||
        lay.slice_off != h.slice_off || lay.slice_len != h.slice_len ||
        lay.ws_pages != h.ws_pages || lay.hot_pages != h.hot_pages || !(h.rate >= 0.0) ||
        lay.free_pages != h.free_pages || lay.used_pages != h.used_pages ||
        lay.perm_off != h.perm_off || lay.free_period != h.free_period)
        return PC_GUEST_ELAYOUT;
    lay.seed = h.seed;
    lay.steps_target = h.steps_target;
    lay.rate = h.rate;
    *out = lay;
    return 0;
}

void pc_guest_load_locals(const void *ram, struct pc_vcpu_local *local, int threads)
{
    for (int t = 0; t < threads; t++)
        __atomic_store_n(&local[t].steps_done, vcpu_state((void *)ram, t)->steps_done, __ATOMIC_RELAXED);
}

/* Sleep until deadline (CLOCK_MONOTONIC ns) on a futex on the pause flag, so that a
 * pause that wakes the flag (pc_vm_request_pause) is seen at once; a pause that does
 * not wake it is seen within a 10 ms slice. Returns 1 if the pause flag was raised. */
#define PC_PACE_CATCH_UP_NS 2000000ULL

static int pace(uint64_t deadline, volatile int *pause_flag)
{
    for (;;) {
        if (__atomic_load_n(pause_flag, __ATOMIC_ACQUIRE))
            return 1;
        uint64_t now = pc_monotonic_ns();
        if (now >= deadline)
            return 0;
        uint64_t until = deadline - now > 10000000ULL ? now + 10000000ULL : deadline;
        struct timespec ts = {.tv_sec = (time_t)(until / 1000000000ULL),
                              .tv_nsec = (long)(until % 1000000000ULL)};
        /* Absolute CLOCK_MONOTONIC timeout; returns early when the flag is not 0 any more. */
        syscall(SYS_futex, (uint32_t *)pause_flag, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, 0, &ts, NULL,
                FUTEX_BITSET_MATCH_ANY);
    }
}

/* Free one in-use page and take back a free one (both picked from r, which the step
 * uses too, so the RNG stream is that of a guest without free pages). Order matters
 * to a concurrent pc_guest_free_runs: the page taken back leaves the free part of
 * perm[] before it is written, so a reader that still saw it free did so before the
 * write (and a dirty log started before that read reports the write). */
static void free_swap(uint64_t *slice, uint32_t *perm, uint64_t used, uint64_t nfree, uint64_t r,
                      uint64_t page_size)
{
    uint64_t x = r ^ 0x465245455041474bULL; /* "FREEPAGK" */
    const uint64_t i = mulhi(splitmix64(&x), used);
    const uint64_t j = used + mulhi(splitmix64(&x), nfree);
    const uint32_t taken = __atomic_load_n(&perm[j], __ATOMIC_RELAXED);
    const uint32_t freed = __atomic_load_n(&perm[i], __ATOMIC_RELAXED);
    __atomic_store_n(&perm[i], taken, __ATOMIC_RELAXED);
    __atomic_store_n(&perm[j], freed, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    memset((char *)slice + (uint64_t)taken * page_size, 0, page_size);
}

int pc_vcpu_run(void *ram, uint64_t ram_size, int tid, volatile int *pause_flag,
                uint64_t limit, struct pc_vcpu_local *local, const struct pc_vcpu_pace *pacing)
{
    struct pc_guest_info info;
    /* Re-check: the state page may have been replaced (migration) or discarded since. */
    int rc = pc_guest_check(ram, ram_size, (uint64_t)sysconf(_SC_PAGESIZE), &info);
    if (rc)
        return rc;
    if (tid < 0 || (uint32_t)tid >= info.threads)
        return PC_GUEST_EPARAM;
    const uint64_t words_mask = info.page_size / 8 - 1;
    const int page_shift = __builtin_ctzll(info.page_size / 8);
    const uint64_t *shared = (const uint64_t *)((char *)ram + info.shared_off);
    const uint64_t shared_words = info.shared_len / 8;
    uint64_t *slice = (uint64_t *)((char *)ram + info.slice_off + (uint64_t)tid * info.slice_len);
    const uint64_t ws = info.ws_pages, hot = info.hot_pages;
    const uint32_t wl = info.workload;
    /* Free pages: steps index perm[0, used); without them pages are indexes themselves. */
    uint32_t *const perm = info.free_fraction > 0.0 ? vcpu_perm(ram, &info, (uint64_t)tid) : NULL;
    const uint64_t used = perm ? info.used_pages : ws;
    const uint64_t nfree = perm ? info.free_pages : 0;
    const uint64_t period = info.free_period;
    const int swaps = nfree && period && wl != PC_WL_IDLE;
    double rate = info.rate;
    if (rate <= 0.0 && wl == PC_WL_IDLE)
        rate = 1000.0; /* idle sleeps per step by default */
    const uint64_t base_interval = rate > 0.0 ? (uint64_t)(1e9 / rate) : 0;
    uint64_t interval = base_interval; /* the slower of --rate and the run-time cap */
    uint64_t slice_start = 0;          /* throttle: when the current running slice began */

    struct pc_vcpu_state *v = vcpu_state(ram, tid);
    uint64_t s0 = v->rng[0], s1 = v->rng[1], s2 = v->rng[2], s3 = v->rng[3];
    uint64_t steps = v->steps_done;
    uint64_t seq = steps % used;
    uint64_t first = 0;
    uint64_t next = interval ? pc_monotonic_ns() : 0;

    __atomic_store_n(&local->first_step_ns, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&local->steps_done, steps, __ATOMIC_RELAXED);
    while (steps < limit) {
        if (__atomic_load_n(pause_flag, __ATOMIC_ACQUIRE))
            return PC_VCPU_PAUSED;
        if (pacing) { /* run-time knobs: one relaxed load each per step */
            const uint64_t cap = __atomic_load_n(&pacing->cap_interval_ns, __ATOMIC_RELAXED);
            const uint64_t want = cap > base_interval ? cap : base_interval;
            if (want != interval) { /* changed: pace from now, no catch-up burst */
                interval = want;
                next = pc_monotonic_ns();
            }
        }
        if (interval) {
            if (pace(next, pause_flag))
                return PC_VCPU_PAUSED;
            next += interval;
        }
        /* xoshiro256** */
        const uint64_t r = rotl64(s1 * 5, 7) * 9;
        const uint64_t t = s1 << 17;
        s2 ^= s0;
        s3 ^= s1;
        s1 ^= s2;
        s0 ^= s3;
        s2 ^= t;
        s3 = rotl64(s3, 45);

        const uint64_t sh = ((const volatile uint64_t *)shared)[mulhi(rotl64(r, 21), shared_words)];
        if (swaps && steps % period == period - 1)
            free_swap(slice, perm, used, nfree, r, info.page_size);
        uint64_t page;
        switch (wl) {
        case PC_WL_RANDOM_WRITE:
            page = mulhi(r, used);
            break;
        case PC_WL_SEQUENTIAL:
            page = seq;
            if (++seq == used)
                seq = 0;
            break;
        case PC_WL_HOTSPOT: /* ~90% of writes into the first tenth of the working set */
            page = ((r >> 9) & 1023) < 922 ? mulhi(r, hot) : mulhi(r, used);
            break;
        default:
            page = UINT64_MAX; /* idle: no write */
            break;
        }
        if (page != UINT64_MAX) {
            if (perm)
                page = __atomic_load_n(&perm[page], __ATOMIC_RELAXED);
            slice[(page << page_shift) | (r & words_mask)] += r ^ sh;
        }
        steps++;
        v->rng[0] = s0;
        v->rng[1] = s1;
        v->rng[2] = s2;
        v->rng[3] = s3;
        v->steps_done = steps;
        const uint64_t now = pc_monotonic_ns();
        v->heartbeat_ns = now;
        const uint64_t prev = __atomic_load_n(&local->last_step_ns, __ATOMIC_RELAXED);
        if (prev && now > prev) {
            uint64_t gap = now - prev, max = __atomic_load_n(&local->max_gap_ns, __ATOMIC_RELAXED);
            while (gap > max && !__atomic_compare_exchange_n(&local->max_gap_ns, &max, gap, 1,
                                                             __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
        }
        if (!first) {
            first = now;
            __atomic_store_n(&local->first_step_ns, now, __ATOMIC_RELAXED);
        }
        __atomic_store_n(&local->steps_done, steps, __ATOMIC_RELAXED);
        __atomic_store_n(&local->last_step_ns, now, __ATOMIC_RELEASE);
        /* A sleep overshoots by the timer slack (~50 us): steps catch up on it so the
         * rate holds, but after a long stall (a fault, a pause) no burst beyond 2 ms. */
        if (interval && now > next + PC_PACE_CATCH_UP_NS)
            next = now;
        const uint32_t pct = pacing ? __atomic_load_n(&pacing->throttle_pct, __ATOMIC_RELAXED) : 0;
        if (!pct || pct > 99) {
            slice_start = 0;
        } else if (!slice_start) {
            slice_start = now;
        } else if (now - slice_start >= PC_THROTTLE_SLICE_NS) {
            /* Parked pct% of the time: after each slice of running, a nap of
             * slice * pct / (100 - pct), taken a slice at a time: a pause cuts it short
             * (pace wakes on the flag), and a lowered throttle ends it within a slice
             * (the source lifts it before its pause, so the last step is recent). */
            const uint64_t until = now + PC_THROTTLE_SLICE_NS * pct / (100 - pct);
            for (uint64_t t = now; t < until; t = pc_monotonic_ns()) {
                if (pace(until - t > PC_THROTTLE_SLICE_NS ? t + PC_THROTTLE_SLICE_NS : until, pause_flag))
                    return PC_VCPU_PAUSED;
                if (__atomic_load_n(&pacing->throttle_pct, __ATOMIC_RELAXED) < pct)
                    break;
            }
            slice_start = pc_monotonic_ns();
            if (interval)
                next = slice_start; /* the nap is not owed steps */
        }
    }
    return PC_VCPU_LIMIT;
}

/* ---- hash ---------------------------------------------------------------------- */

#define H1 0x9E3779B185EBCA87ULL
#define H2 0xC2B2AE3D27D4EB4FULL
#define H3 0x165667B19E3779F9ULL
#define H4 0x85EBCA77C2B2AE63ULL

static inline uint64_t hround(uint64_t acc, uint64_t in)
{
    acc += in * H2;
    acc = rotl64(acc, 31);
    return acc * H1;
}

static inline uint64_t avalanche(uint64_t h)
{
    h ^= h >> 33;
    h *= H2;
    h ^= h >> 29;
    h *= H3;
    return h ^ (h >> 32);
}

/* Guest RAM holds doubles and integers alike: read it as words that alias anything. */
typedef uint64_t __attribute__((may_alias)) pc_word;

/* xxh64-style four-lane hash of one page (page_size is a multiple of 32). */
static uint64_t page_hash(const pc_word *p, uint64_t page_size)
{
    uint64_t v1 = H1 + H2, v2 = H2, v3 = 0, v4 = (uint64_t)0 - H1;
    for (uint64_t i = 0; i < page_size / 8; i += 4) {
        v1 = hround(v1, p[i]);
        v2 = hround(v2, p[i + 1]);
        v3 = hround(v3, p[i + 2]);
        v4 = hround(v4, p[i + 3]);
    }
    return avalanche(rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18));
}

static inline uint64_t combine(uint64_t h, uint64_t ph) { return rotl64(h ^ hround(0, ph), 27) * H1 + H4; }

/* Bitmap of the pages free right now (NULL without free pages, or on ENOMEM with
 * *err set). Page tables are validated: a bad entry is ignored, not followed. */
static uint8_t *free_bitmap(const void *ram, uint64_t ram_size, uint64_t page_size, int *err)
{
    struct pc_guest_info info;
    *err = 0;
    if (pc_guest_check(ram, ram_size, page_size, &info) || !(info.free_fraction > 0.0) || !info.free_pages)
        return NULL;
    const uint64_t npages = ram_size / page_size;
    uint8_t *map = calloc((npages + 7) / 8, 1);
    if (!map) {
        *err = ENOMEM;
        return NULL;
    }
    for (uint64_t t = 0; t < info.threads; t++) {
        const uint32_t *perm = vcpu_perm((void *)ram, &info, t);
        const uint64_t base = (info.slice_off + t * info.slice_len) / page_size;
        for (uint64_t k = info.used_pages; k < info.ws_pages; k++) {
            const uint64_t p = __atomic_load_n(&perm[k], __ATOMIC_ACQUIRE);
            if (p < info.ws_pages)
                map[(base + p) >> 3] |= (uint8_t)(1u << ((base + p) & 7));
        }
    }
    return map;
}

static inline int is_free(const uint8_t *map, uint64_t pg) { return map && (map[pg >> 3] >> (pg & 7)) & 1; }

/* Hash pages [first, end) assuming they may contain data (free pages count as zero). */
static uint64_t hash_run(uint64_t h, const char *ram, uint64_t first, uint64_t end, uint64_t ps,
                         const uint8_t *freemap, uint64_t zero_hash)
{
    for (uint64_t pg = first; pg < end; pg++)
        h = combine(h, is_free(freemap, pg) ? zero_hash : page_hash((const pc_word *)(ram + pg * ps), ps));
    return h;
}

static uint64_t zero_run(uint64_t h, uint64_t zero_hash, uint64_t n)
{
    while (n--)
        h = combine(h, zero_hash);
    return h;
}

uint64_t pc_guest_hash(const void *ram, uint64_t ram_size, uint64_t page_size, int memfd)
{
    const char *base = ram;
    const uint64_t npages = ram_size / page_size;
    uint64_t *buf = calloc(1, page_size);
    if (!buf)
        return 0;
    const uint64_t zero_hash = page_hash(buf, page_size);

    /* State page with the timing fields (heartbeats, rate) zeroed: they are not state. */
    memcpy(buf, base, page_size);
    char *state = (char *)buf;
    memset(state + offsetof(struct pc_guest_hdr, rate), 0, sizeof(double));
    for (int t = 0; t < PC_GUEST_MAX_THREADS; t++)
        memset(state + PC_GUEST_VCPU_OFFSET + t * sizeof(struct pc_vcpu_state) +
                   offsetof(struct pc_vcpu_state, heartbeat_ns), 0, sizeof(uint64_t));
    uint64_t h = combine(H3 ^ ram_size, page_hash(buf, page_size));
    free(buf);

    /* A free page's content is undefined (a migration may skip it): hash it as zero. */
    int err;
    uint8_t *freemap = free_bitmap(ram, ram_size, page_size, &err);
    if (err)
        return 0;

    uint64_t pg = 1;
    if (memfd >= 0) {
        /* Holes read as zero; everything else (incl. swapped pages) is data. */
        while (pg < npages) {
            off_t data = lseek(memfd, (off_t)(pg * page_size), SEEK_DATA);
            uint64_t dpg = data < 0 ? npages : (uint64_t)data / page_size;
            if (dpg > npages)
                dpg = npages;
            h = zero_run(h, zero_hash, dpg - pg);
            if (dpg >= npages)
                break;
            off_t hole = lseek(memfd, (off_t)(dpg * page_size), SEEK_HOLE);
            uint64_t hpg = hole < 0 ? npages : ((uint64_t)hole + page_size - 1) / page_size;
            if (hpg > npages)
                hpg = npages;
            if (hpg <= dpg)
                hpg = dpg + 1;
            h = hash_run(h, base, dpg, hpg, page_size, freemap, zero_hash);
            pg = hpg;
        }
    } else {
        /* Private anonymous: not present and not swapped reads as zero (and, under
         * userfaultfd, would fault: never touch it). */
        int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        uint64_t ents[512];
        while (pg < npages) {
            uint64_t n = npages - pg < 512 ? npages - pg : 512;
            ssize_t got = -1;
            if (pm >= 0)
                got = pread(pm, ents, n * 8, (off_t)(((uintptr_t)base / page_size + pg) * 8));
            if (got != (ssize_t)(n * 8)) {
                h = hash_run(h, base, pg, pg + n, page_size, freemap, zero_hash);
            } else {
                for (uint64_t i = 0; i < n; i++)
                    h = ents[i] & (PM_PRESENT | PM_SWAP) && !is_free(freemap, pg + i)
                            ? combine(h, page_hash((const pc_word *)(base + (pg + i) * page_size), page_size))
                            : combine(h, zero_hash);
            }
            pg += n;
        }
        if (pm >= 0)
            close(pm);
    }
    free(freemap);
    return avalanche(h ^ npages);
}

/* ---- free pages, touch, step gaps ------------------------------------------------ */

int64_t pc_guest_free_runs(const void *ram, uint64_t ram_size, uint64_t page_size,
                           uint64_t *runs, uint64_t max_runs)
{
    int err;
    uint8_t *map = free_bitmap(ram, ram_size, page_size, &err);
    if (!map)
        return err ? -err : 0;
    const uint64_t npages = ram_size / page_size;
    int64_t n = 0;
    uint64_t pg = 0;
    while (pg < npages) {
        /* skip whole zero bytes quickly: the free set is small next to RAM */
        if (!(pg & 7) && !map[pg >> 3]) {
            pg += 8;
            continue;
        }
        if (!is_free(map, pg)) {
            pg++;
            continue;
        }
        uint64_t end = pg + 1;
        while (end < npages && is_free(map, end))
            end++;
        if ((uint64_t)n < max_runs) {
            runs[2 * n] = pg;
            runs[2 * n + 1] = end - pg;
        }
        n++;
        pg = end;
    }
    free(map);
    return n;
}

/* Atomic OR of zero: a real write access (the page table sees a write fault, a dirty
 * log reports it) that cannot lose a vCPU's concurrent update of the same word. */
static inline void touch_page(void *ram, uint64_t page, uint64_t page_size)
{
    __atomic_fetch_or((volatile uint64_t *)((char *)ram + page * page_size), 0, __ATOMIC_RELAXED);
}

int pc_guest_touch(void *ram, uint64_t ram_size, uint64_t page_size, const uint64_t *pages,
                   uint64_t n)
{
    const uint64_t npages = ram_size / page_size;
    for (uint64_t i = 0; i < n; i++)
        if (pages[i] >= npages)
            return -EINVAL;
    for (uint64_t i = 0; i < n; i++)
        touch_page(ram, pages[i], page_size);
    return 0;
}

static uint64_t gcd64(uint64_t a, uint64_t b)
{
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

int pc_guest_touch_spread(void *ram, uint64_t ram_size, uint64_t page_size, uint64_t first,
                          uint64_t count, uint64_t n, uint64_t seed)
{
    const uint64_t npages = ram_size / page_size;
    if (first >= npages || count > npages - first || n > count)
        return -EINVAL;
    if (!n)
        return 0;
    if (n == count) { /* every page: the order is all that could differ, go in order */
        for (uint64_t i = 0; i < n; i++)
            touch_page(ram, first + i, page_size);
        return 0;
    }
    /* page(i) = first + (a * i + b) mod count with gcd(a, count) = 1: a permutation. */
    uint64_t x = seed;
    uint64_t a = splitmix64(&x) % count | 1;
    while (gcd64(a, count) != 1)
        a = a + 2 < count ? a + 2 : 1;
    const uint64_t b = splitmix64(&x) % count;
    for (uint64_t i = 0; i < n; i++)
        touch_page(ram, first + (uint64_t)(((unsigned __int128)a * i + b) % count), page_size);
    return 0;
}

uint64_t pc_vcpu_take_max_gap(struct pc_vcpu_local *local, int threads)
{
    uint64_t max = 0;
    for (int t = 0; t < threads; t++) {
        uint64_t g = __atomic_exchange_n(&local[t].max_gap_ns, 0, __ATOMIC_RELAXED);
        if (g > max)
            max = g;
    }
    return max;
}

/* ---- memory -------------------------------------------------------------------- */

void *pc_guest_map(uint64_t size, int fd)
{
    void *p = fd >= 0 ? mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                      : mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    /* Page granularity everywhere: dirty logging, discard and userfaultfd all work on
     * base pages, and a THP would turn one touched byte into 2 MiB of "data". */
    madvise(p, size, MADV_NOHUGEPAGE);
    return p;
}

int pc_guest_discard(void *ram, uint64_t off, uint64_t len, int memfd)
{
    if (madvise((char *)ram + off, len, MADV_DONTNEED))
        return -errno;
    /* A shared mapping's DONTNEED only drops PTEs; the page cache still has the data. */
    if (memfd >= 0 && fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len))
        return -errno;
    return 0;
}

struct pc_vcpu_local *pc_vcpu_locals_new(int n)
{
    size_t sz = (size_t)(n > 0 ? n : 1) * sizeof(struct pc_vcpu_local);
    void *p = aligned_alloc(64, sz);
    if (p)
        memset(p, 0, sz);
    return p;
}

void pc_vcpu_locals_free(struct pc_vcpu_local *p) { free(p); }
