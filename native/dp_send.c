/* dp_send: the source's push loop and demand server without the GIL (see dp_send.h). */
#define _GNU_SOURCE
#include "dp_send.h"
#include "file_ops.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PM_PRESENT (1ull << 63)
#define PM_SWAP (1ull << 62)
#define PAGEMAP_CHUNK 512
#define WHO_PUSH 0   /* which scratch buffer: the pusher's */
#define WHO_DEMAND 1 /* or the demand server's */

/* A run of pre-paging windows following one sequential toucher (a vCPU streaming
 * through RAM): its last window [start, end) and that window's size. */
#define PREPAGE_STREAMS 8
struct prepage_stream {
    uint64_t start, end, used;
    uint32_t size;
};

struct pc_dp_send {
    int memfd, mem_fd, pagemap_fd, pid;
    uint64_t base, size, npages;
    uint32_t page_size;
    const uint8_t *map; /* memfd, read only: what tags are computed over */
    uint8_t *sent;
    pthread_mutex_t lock; /* every claim and mark of the sent map */
    uint64_t *extents;    /* (first, npages) pairs, published once */
    _Atomic size_t nextents;
    uint64_t *regions;
    size_t nregions;
    _Atomic int64_t hint;
    _Atomic uint64_t served; /* demand requests answered, ever (the pusher waits for the first) */
    _Atomic int stop;
    _Atomic int refuse_requests; /* the session takes no more requests: Python decodes them */
    uint8_t *scratch[2]; /* anonymous RAM: the pusher's and the demand server's buffer */
    struct prepage_stream streams[PREPAGE_STREAMS]; /* the pusher's own: its recent pre-paging windows */
    uint64_t stream_clock;
};

static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (24 - 8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (56 - 8 * i)); }
static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

void pc_dp_header(uint8_t *out, uint8_t type, uint8_t flags, uint32_t length, uint64_t arg)
{
    put16(out, PC_DP_MAGIC);
    out[2] = type;
    out[3] = flags;
    put32(out + 4, length);
    put64(out + 8, arg);
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

struct pc_dp_send *pc_dp_send_new(int memfd, int mem_fd, int pagemap_fd, int pid, uint64_t base, uint64_t size,
                                  uint32_t page_size, uint8_t *sent, uint64_t npages)
{
    struct pc_dp_send *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    *s = (struct pc_dp_send){.memfd = memfd, .mem_fd = mem_fd, .pagemap_fd = pagemap_fd, .pid = pid,
                             .base = base, .size = size, .npages = npages, .page_size = page_size,
                             .sent = sent, .hint = -1};
    pthread_mutex_init(&s->lock, NULL);
    if (memfd >= 0) {
        void *map = mmap(NULL, size, PROT_READ, MAP_SHARED, memfd, 0);
        if (map == MAP_FAILED) {
            pc_dp_send_free(s);
            return NULL;
        }
        s->map = map;
    }
    return s;
}

void pc_dp_send_free(struct pc_dp_send *s)
{
    if (!s)
        return;
    if (s->map)
        munmap((void *)s->map, s->size);
    for (int i = 0; i < 2; i++)
        free(s->scratch[i]);
    free(s->extents);
    free(s->regions);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

int pc_dp_send_set_extents(struct pc_dp_send *s, const uint64_t *runs, size_t nruns)
{
    if (atomic_load(&s->nextents) || !nruns)
        return 0; /* set once: a reader may be walking them */
    uint64_t *copy = malloc(nruns * 2 * sizeof(*copy));
    if (!copy)
        return -ENOMEM;
    memcpy(copy, runs, nruns * 2 * sizeof(*copy));
    s->extents = copy;
    atomic_store(&s->nextents, nruns); /* publishes the array */
    return 0;
}

int pc_dp_send_set_regions(struct pc_dp_send *s, const uint64_t *regions, size_t nregions)
{
    uint64_t *copy = malloc((nregions ? nregions : 1) * 2 * sizeof(*copy));
    if (!copy)
        return -ENOMEM;
    memcpy(copy, regions, nregions * 2 * sizeof(*copy));
    free(s->regions);
    s->regions = copy;
    s->nregions = nregions;
    return 0;
}

void pc_dp_send_stop(struct pc_dp_send *s, int stop) { atomic_store(&s->stop, stop); }

void pc_dp_send_refuse_requests(struct pc_dp_send *s, int refuse)
{
    atomic_store(&s->refuse_requests, refuse);
}

int64_t pc_dp_send_take_hint(struct pc_dp_send *s) { return atomic_exchange(&s->hint, -1); }

uint64_t pc_dp_send_served(struct pc_dp_send *s) { return atomic_load(&s->served); }

void pc_dp_send_mark(struct pc_dp_send *s, uint64_t first, uint64_t end, uint8_t value)
{
    if (end > s->npages)
        end = s->npages;
    if (first >= end)
        return;
    pthread_mutex_lock(&s->lock);
    memset(s->sent + first, value, end - first);
    pthread_mutex_unlock(&s->lock);
}

/* -- sending -------------------------------------------------------------------------- */

static int wait_fd(int fd, short events)
{
    struct pollfd p = {.fd = fd, .events = events};
    return poll(&p, 1, -1) < 0 && errno != EINTR ? -errno : 0;
}

/* Writes every byte of iov[0..n) (which it consumes). */
static int send_all(struct pc_dp_link *link, struct iovec *iov, int n, int flags)
{
    while (n > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t sent = sendmsg(link->fd, &msg, flags | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                int rc = wait_fd(link->fd, POLLOUT);
                if (rc)
                    return rc;
                continue;
            }
            return -errno;
        }
        link->bytes += (uint64_t)sent;
        while (n > 0 && (size_t)sent >= iov->iov_len) {
            sent -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + sent;
            iov->iov_len -= (size_t)sent;
        }
    }
    return 0;
}

int pc_dp_send_iov(struct pc_dp_link *link, struct iovec *iov, int n) { return send_all(link, iov, n, 0); }

static int seal(struct pc_dp_link *link, const uint8_t *header, const uint8_t *payload, size_t len, uint8_t *tag)
{
    if (!link->seal)
        return 0;
    if (pc_frame_auth_tag(link->seal, link->seq, header, PC_DP_HEADER_BYTES, payload, len, tag))
        return -EPROTO;
    link->seq++;
    return PC_AUTH_TAG_BYTES;
}

static int send_zero_range(struct pc_dp_link *link, uint64_t first, uint64_t npages)
{
    uint8_t frame[PC_DP_HEADER_BYTES + 8], tag[PC_AUTH_TAG_BYTES];
    pc_dp_header(frame, PC_DP_ZERO_RANGE, 0, 8, first);
    put64(frame + PC_DP_HEADER_BYTES, npages);
    int taglen = seal(link, frame, frame + PC_DP_HEADER_BYTES, 8, tag);
    if (taglen < 0)
        return taglen;
    struct iovec iov[2] = {{frame, sizeof(frame)}, {tag, (size_t)taglen}};
    return send_all(link, iov, taglen ? 2 : 1, 0);
}

static int read_anon(struct pc_dp_send *s, uint8_t *buf, uint64_t offset, size_t len)
{
    struct iovec local = {buf, len}, remote = {(void *)(uintptr_t)(s->base + offset), len};
    ssize_t got = process_vm_readv(s->pid, &local, 1, &remote, 1, 0);
    if (got < 0 && (errno == EPERM || errno == ENOSYS) && s->mem_fd >= 0)
        got = pread(s->mem_fd, buf, len, (off_t)(s->base + offset));
    if (got < 0)
        return -errno;
    return (size_t)got == len ? 0 : -EIO;
}

static int read_memfd(struct pc_dp_send *s, uint8_t *buf, uint64_t offset, size_t len)
{
    for (size_t done = 0; done < len;) {
        ssize_t got = pread(s->memfd, buf + done, len - done, (off_t)(offset + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return got < 0 ? -errno : -EIO;
        done += (size_t)got;
    }
    return 0;
}

/* One PAGE_RUN frame of pages [first, first+npages). */
static int send_run(struct pc_dp_send *s, struct pc_dp_link *link, uint64_t first, uint64_t npages, uint8_t cause,
                    int who)
{
    uint8_t header[PC_DP_HEADER_BYTES], tag[PC_AUTH_TAG_BYTES];
    uint64_t offset = first * s->page_size, len = npages * s->page_size;
    pc_dp_header(header, PC_DP_PAGE_RUN, cause, (uint32_t)len, first);
    /* Demand replies go out in one sendmsg (header, pages, tag: one segment for a small
     * run), read with one copy instead of mapping and unmapping them; bulk runs of memfd
     * RAM go by sendfile. */
    if (s->memfd < 0 || who == WHO_DEMAND) {
        if (!s->scratch[who] && !(s->scratch[who] = malloc(PC_DP_MAX_RUN_BYTES)))
            return -ENOMEM;
        uint8_t *buf = s->scratch[who];
        int rc = s->memfd < 0 ? read_anon(s, buf, offset, len) : read_memfd(s, buf, offset, len);
        if (rc)
            return rc;
        int taglen = seal(link, header, buf, len, tag);
        if (taglen < 0)
            return taglen;
        struct iovec iov[3] = {{header, sizeof(header)}, {buf, len}, {tag, (size_t)taglen}};
        return send_all(link, iov, taglen ? 3 : 2, 0);
    }
    /* The guest is paused: the mapped bytes the tag covers are those sendfile sends. */
    int taglen = seal(link, header, s->map + offset, len, tag);
    if (link->seal)
        pc_drop_mapped(s->map, s->size, offset, len); /* see file_ops.h */
    if (taglen < 0)
        return taglen;
    struct iovec iov[1] = {{header, sizeof(header)}};
    int rc = send_all(link, iov, 1, MSG_MORE); /* the header leaves with the first page bytes */
    if (rc)
        return rc;
    off_t pos = (off_t)offset;
    uint64_t left = len;
    while (left) {
        ssize_t sent = sendfile(link->fd, s->memfd, &pos, left);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                if ((rc = wait_fd(link->fd, POLLOUT)))
                    return rc;
                continue;
            }
            return -errno;
        }
        if (sent == 0)
            return PC_DP_SHORT_FILE;
        left -= (uint64_t)sent;
        link->bytes += (uint64_t)sent;
    }
    struct iovec tail[1] = {{tag, (size_t)taglen}};
    return taglen ? send_all(link, tail, 1, 0) : 0;
}

/* -- populated pages ---------------------------------------------------------------- */

/* The populated runs in [first, end) as (first, npages) pairs in out (room for max
 * pairs; the last pair may stop early, then the caller asks again from its end). */
static int populated(struct pc_dp_send *s, uint64_t first, uint64_t end, uint64_t *out, size_t max)
{
    size_t n = 0, next = atomic_load(&s->nextents);
    if (next) {
        const uint64_t *e = s->extents;
        size_t lo = 0, hi = next;
        while (lo < hi) { /* the first extent ending after first */
            size_t mid = (lo + hi) / 2;
            if (e[2 * mid] + e[2 * mid + 1] <= first)
                lo = mid + 1;
            else
                hi = mid;
        }
        for (size_t i = lo; i < next && e[2 * i] < end && n < max; i++) {
            uint64_t a = e[2 * i] > first ? e[2 * i] : first, b = e[2 * i] + e[2 * i + 1];
            out[2 * n] = a;
            out[2 * n + 1] = (b < end ? b : end) - a;
            n++;
        }
        return (int)n;
    }
    /* Before the pusher has swept the extents: page by page (cheap for a request). */
    uint64_t entries[PAGEMAP_CHUNK];
    for (uint64_t page = first; page < end;) {
        uint64_t chunk = end - page < PAGEMAP_CHUNK ? end - page : PAGEMAP_CHUNK;
        int mapped = 0; /* memfd RAM: entries tell which pages the guest has mapped */
        if (s->pagemap_fd >= 0) {
            ssize_t got = pread(s->pagemap_fd, entries, chunk * 8, (off_t)((s->base / s->page_size + page) * 8));
            if (s->memfd < 0 && got != (ssize_t)(chunk * 8))
                return got < 0 ? -errno : -EIO;
            mapped = s->memfd >= 0 && got == (ssize_t)(chunk * 8);
        }
        for (uint64_t i = 0; i < chunk; i++) {
            int present;
            if (s->memfd < 0) {
                present = (entries[i] & (PM_PRESENT | PM_SWAP)) != 0;
            } else if (mapped && (entries[i] & PM_PRESENT)) {
                present = 1; /* mapped by the guest: in the page cache, so data */
            } else { /* a hole, or swapped out (SEEK_DATA counts those as data) */
                off_t offset = (off_t)((page + i) * s->page_size);
                present = lseek(s->memfd, offset, SEEK_DATA) == offset; /* returns at once on data */
            }
            if (!present)
                continue;
            if (n && out[2 * (n - 1)] + out[2 * (n - 1) + 1] == page + i) {
                out[2 * (n - 1) + 1]++;
            } else {
                if (n == max)
                    return (int)n;
                out[2 * n] = page + i;
                out[2 * n + 1] = 1;
                n++;
            }
        }
        page += chunk;
    }
    return (int)n;
}

#define RUNS_AT_ONCE 64
#define HOLD_SLICE_NS 10000000 /* a rate limit's wait is cut short by the stop flag within this */

static void hold_back(struct pc_dp_send *s, int64_t ns)
{
    while (ns > 0 && !atomic_load(&s->stop)) {
        int64_t slice = ns < HOLD_SLICE_NS ? ns : HOLD_SLICE_NS;
        struct timespec t = {slice / 1000000000, slice % 1000000000};
        while (nanosleep(&t, &t) && errno == EINTR)
            ;
        ns -= slice;
    }
}

/* Sends [first, end): populated runs as PAGE_RUN frames of at most run_pages pages
 * (rate limited when rate is set), gaps as ZERO_RANGE frames. */
static int send_range(struct pc_dp_send *s, struct pc_dp_link *link, uint64_t first, uint64_t end,
                      uint32_t run_pages, uint8_t cause, struct pc_dp_rate *rate, struct pc_dp_counts *counts,
                      int who)
{
    uint64_t runs[2 * RUNS_AT_ONCE];
    uint64_t cursor = first;
    while (cursor < end) {
        int n = populated(s, cursor, end, runs, RUNS_AT_ONCE);
        if (n < 0)
            return n;
        if (n == 0)
            break;
        for (int i = 0; i < n; i++) {
            uint64_t start = runs[2 * i], count = runs[2 * i + 1];
            if (start > cursor) {
                int rc = send_zero_range(link, cursor, start - cursor);
                if (rc)
                    return rc;
                counts->pages_zero += start - cursor;
            }
            for (uint64_t done = 0; done < count;) {
                uint64_t chunk = count - done < run_pages ? count - done : run_pages;
                if (rate && rate->rate > 0) {
                    int64_t now = now_ns();
                    rate->tokens += (double)(now - rate->stamp_ns) * 1e-9 * rate->rate;
                    if (rate->tokens > rate->burst)
                        rate->tokens = rate->burst;
                    rate->stamp_ns = now;
                    rate->tokens -= (double)(chunk * s->page_size);
                    if (rate->tokens < 0) {
                        int64_t wait = (int64_t)(-rate->tokens / rate->rate * 1e9);
                        hold_back(s, wait);
                        counts->held_back_ns += (uint64_t)wait;
                    }
                }
                int rc = send_run(s, link, start + done, chunk, cause, who);
                if (rc)
                    return rc;
                counts->pages_sent += chunk;
                done += chunk;
            }
            cursor = start + count;
        }
    }
    if (cursor < end) {
        int rc = send_zero_range(link, cursor, end - cursor);
        if (rc)
            return rc;
        counts->pages_zero += end - cursor;
    }
    return 0;
}

/* Claims the next unsent pages of [*first, end) (at most max): returns their count, 0
 * when none is left. */
static uint64_t claim(struct pc_dp_send *s, uint64_t *first, uint64_t end, uint64_t max)
{
    uint64_t a = *first, b;
    pthread_mutex_lock(&s->lock);
    while (a < end && s->sent[a])
        a++;
    for (b = a; b < end && b - a < max && !s->sent[b]; b++)
        ;
    memset(s->sent + a, 1, b - a);
    pthread_mutex_unlock(&s->lock);
    *first = a;
    return b - a;
}

/* The pre-paging window after a demand request that ended at page hint (readahead's
 * rule): a request at most one window past a stream's last window (the guest ran
 * through it before it all arrived, or right after) doubles that stream's window, up to
 * max; any other request starts a stream (in place of the least recently used) at min. */
static uint64_t prepage_window(struct pc_dp_send *s, uint64_t hint, uint32_t min, uint32_t max)
{
    struct prepage_stream *st = NULL, *lru = &s->streams[0];
    for (int i = 0; i < PREPAGE_STREAMS; i++) {
        struct prepage_stream *c = &s->streams[i];
        if (c->size && hint > c->start && hint <= c->end + c->size) {
            st = c;
            break;
        }
        if (c->used < lru->used)
            lru = c;
    }
    uint32_t size = st ? (st->size > max / 2 ? max : 2 * st->size) : min;
    if (!st)
        st = lru;
    uint64_t end = s->npages - hint < size ? s->npages : hint + size;
    *st = (struct prepage_stream){.start = hint, .end = end, .used = ++s->stream_clock, .size = size};
    return end;
}

/* Sends the unsent pages of [first, end) in runs of at most run_pages: 0, STOPPED, or
 * a send's error. With a pre-paging window (min > 0), a demand request's hint taken
 * between two runs sends its window first (the window's own hints wait for the next run). */
static int push_range(struct pc_dp_send *s, struct pc_dp_link *link, uint64_t first, uint64_t end, uint32_t run_pages,
                      uint32_t prepage_min, uint32_t prepage_max, uint8_t cause, struct pc_dp_rate *rate,
                      struct pc_dp_counts *counts)
{
    while (first < end) {
        if (atomic_load(&s->stop))
            return PC_DP_STOPPED;
        int64_t hint = prepage_min ? atomic_exchange(&s->hint, -1) : -1;
        if (hint >= 0 && (uint64_t)hint < s->npages) {
            uint64_t window_end = prepage_window(s, (uint64_t)hint, prepage_min, prepage_max);
            int rc = push_range(s, link, (uint64_t)hint, window_end, run_pages, 0, 0, cause, rate, counts);
            if (rc)
                return rc;
        }
        uint64_t count = claim(s, &first, end, run_pages);
        if (!count)
            break;
        int rc = send_range(s, link, first, first + count, run_pages, cause, rate, counts, WHO_PUSH);
        if (rc)
            return rc;
        first += count;
    }
    return 0;
}

int pc_dp_push(struct pc_dp_send *s, struct pc_dp_link *link, const uint64_t *ranges, size_t nranges,
               uint32_t run_pages, uint32_t prepage_min, uint32_t prepage_max, uint8_t cause,
               struct pc_dp_rate *rate, struct pc_dp_counts *counts)
{
    if (!run_pages || (uint64_t)run_pages * s->page_size > PC_DP_MAX_RUN_BYTES || prepage_max < prepage_min)
        return -EINVAL;
    for (size_t r = 0; r < nranges; r++) {
        uint64_t end = ranges[2 * r + 1] < s->npages ? ranges[2 * r + 1] : s->npages;
        int rc = push_range(s, link, ranges[2 * r], end, run_pages, prepage_min, prepage_max, cause, rate, counts);
        if (rc)
            return rc;
    }
    return PC_DP_DONE;
}

/* -- the demand server ---------------------------------------------------------------- */

static int inside(const uint64_t *regions, size_t nregions, uint64_t first, uint64_t npages)
{
    size_t lo = 0, hi = nregions;
    while (lo < hi) { /* the first region ending after first */
        size_t mid = (lo + hi) / 2;
        if (regions[2 * mid + 1] <= first)
            lo = mid + 1;
        else
            hi = mid;
    }
    return npages >= 1 && lo < nregions && regions[2 * lo] <= first && npages <= regions[2 * lo + 1] - first;
}

int pc_dp_parse_request(const uint8_t *buf, size_t len, struct pc_frame_auth *verify, uint64_t seq,
                        const uint64_t *regions, size_t nregions, uint64_t *first, uint64_t *npages,
                        size_t *frame_bytes)
{
    uint8_t expected[8];
    put16(expected, PC_DP_MAGIC);
    expected[2] = PC_DP_PAGE_REQUEST;
    expected[3] = 0; /* flags */
    put32(expected + 4, 8); /* length: one u64 */
    if (memcmp(buf, expected, len < 8 ? len : 8))
        return PC_DP_REQUEST_OTHER;
    size_t total = PC_DP_HEADER_BYTES + 8 + (verify ? PC_AUTH_TAG_BYTES : 0);
    if (len < total)
        return PC_DP_REQUEST_MORE;
    if (verify && pc_frame_auth_check(verify, seq, buf, PC_DP_HEADER_BYTES, buf + PC_DP_HEADER_BYTES, 8,
                                      buf + PC_DP_HEADER_BYTES + 8))
        return PC_DP_REQUEST_OTHER; /* Python's verifier says why */
    uint64_t a = get64(buf + 8), n = get64(buf + PC_DP_HEADER_BYTES);
    if (!inside(regions, nregions, a, n))
        return PC_DP_REQUEST_OTHER;
    *first = a;
    *npages = n;
    *frame_bytes = total;
    return PC_DP_REQUEST_OK;
}

int pc_dp_serve(struct pc_dp_send *s, struct pc_dp_link *link, int in_fd, struct pc_frame_auth *verify,
                uint64_t *recv_seq, uint8_t *buf, size_t cap, size_t *start, size_t *end, uint32_t run_pages,
                struct pc_dp_counts *counts)
{
    if (!run_pages || (uint64_t)run_pages * s->page_size > PC_DP_MAX_RUN_BYTES || cap < 256)
        return -EINVAL;
    for (;;) {
        uint64_t first, npages;
        size_t used;
        int verdict = pc_dp_parse_request(buf + *start, *end - *start, verify, *recv_seq, s->regions, s->nregions,
                                          &first, &npages, &used);
        if (verdict == PC_DP_REQUEST_OTHER || (verdict == PC_DP_REQUEST_OK && atomic_load(&s->refuse_requests)))
            return PC_DP_FRAME;
        if (verdict == PC_DP_REQUEST_OK) {
            *start += used;
            (*recv_seq)++;
            counts->requests++;
            int rc = send_range(s, link, first, first + npages, run_pages, 2 /* DEMAND */, NULL, counts, WHO_DEMAND);
            if (rc)
                return rc;
            pc_dp_send_mark(s, first, first + npages, 1);
            atomic_store(&s->hint, (int64_t)(first + npages));
            atomic_fetch_add(&s->served, 1);
            continue;
        }
        if (*start == *end) {
            *start = *end = 0;
        } else if (cap - *end < 128) {
            memmove(buf, buf + *start, *end - *start);
            *end -= *start;
            *start = 0;
        }
        ssize_t got = recv(in_fd, buf + *end, cap - *end, 0);
        if (got == 0)
            return PC_DP_CLOSED;
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                int rc = wait_fd(in_fd, POLLIN);
                if (rc)
                    return rc;
                continue;
            }
            return -errno;
        }
        *end += (size_t)got;
        counts->bytes_received += (uint64_t)got;
    }
}
