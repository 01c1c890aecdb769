/* dp_recv: page frames from a socket to a sink, without the GIL (see dp_recv.h). */
#define _GNU_SOURCE
#include "dp_recv.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define MAGIC 0x5043
#define GREEDY_READ (64u << 10) /* small frames are read several per call */
#define PLACE_GREEDY_READ 4096u /* with a placing sink: little of a payload goes through the buffer */
#define WAIT_MS 100             /* how often a quiet wait looks at the stop flag */

static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Pages [first, first + npages) lie inside one region (as Layout.contains). */
static int inside(const struct pc_dp_recv_rules *r, uint64_t first, uint64_t npages)
{
    size_t lo = 0, hi = r->nregions;
    while (lo < hi) { /* the first region ending after first */
        size_t mid = (lo + hi) / 2;
        if (r->regions[2 * mid + 1] <= first)
            lo = mid + 1;
        else
            hi = mid;
    }
    return npages >= 1 && lo < r->nregions && r->regions[2 * lo] <= first && npages <= r->regions[2 * lo + 1] - first;
}

/* The header checks of decode_header for the two frame kinds taken here: 1 if the
 * header at h is one of them (payload bytes in *length), 0 if not. */
static int data_header(const uint8_t *h, const struct pc_dp_recv_rules *r, uint32_t *length)
{
    if ((h[0] << 8 | h[1]) != MAGIC)
        return 0;
    uint8_t type = h[2], flags = h[3];
    uint32_t len = get32(h + 4);
    if (len > r->max_payload)
        return 0;
    if (type == r->page_run_type) {
        if (flags >= 32 || !(r->known_causes >> flags & 1) || len == 0 || len % r->page_size)
            return 0;
    } else if (type == r->zero_range_type) {
        if (flags || len != 8)
            return 0;
    } else {
        return 0;
    }
    *length = len;
    return 1;
}

int pc_dp_recv_parse(const uint8_t *buf, size_t len, struct pc_frame_auth *verify, uint64_t seq,
                     const struct pc_dp_recv_rules *rules, struct pc_dp_frame *out)
{
    size_t tag = verify ? PC_AUTH_TAG_BYTES : 0;
    uint32_t length;
    out->bytes = PC_DP_RECV_HEADER_BYTES;
    if (len < PC_DP_RECV_HEADER_BYTES)
        return PC_DP_RECV_MORE;
    if (!data_header(buf, rules, &length))
        return PC_DP_RECV_OTHER;
    out->bytes = PC_DP_RECV_HEADER_BYTES + length + tag;
    if (len < out->bytes)
        return PC_DP_RECV_MORE;
    const uint8_t *payload = buf + PC_DP_RECV_HEADER_BYTES;
    if (verify && pc_frame_auth_check(verify, seq, buf, PC_DP_RECV_HEADER_BYTES, payload, length, payload + length))
        return PC_DP_RECV_OTHER; /* Python's verifier says why */
    out->type = buf[2];
    out->cause = buf[3];
    out->first = get64(buf + 8);
    out->npages = out->type == rules->page_run_type ? length / rules->page_size : get64(payload);
    return inside(rules, out->first, out->npages) ? PC_DP_RECV_OK : PC_DP_RECV_OTHER;
}

size_t pc_dp_recv_min_buffer(const struct pc_dp_recv_rules *rules)
{
    return (size_t)rules->max_payload + PC_DP_RECV_HEADER_BYTES + PC_AUTH_TAG_BYTES + GREEDY_READ;
}

/* Why the frame f, which the decoder accepts, is not taken now (0: it is). */
static int hand_back(const struct pc_dp_recv_rules *r, const struct pc_dp_frame *f)
{
    if (r->phase_word && __atomic_load_n(r->phase_word, __ATOMIC_ACQUIRE) != r->phase)
        return PC_DP_RECV_PHASE; /* the rules may be stale: Python asks the session again */
    if (f->type == r->page_run_type ? !(r->taken_causes >> f->cause & 1) : !r->take_zero_ranges)
        return PC_DP_RECV_FRAME; /* the session decides (a transition, or an error) */
    if (r->stop && __atomic_load_n(r->stop, __ATOMIC_ACQUIRE))
        return PC_DP_RECV_STOPPED;
    return 0;
}

/* Gives the frame at *start to the sink (it is taken: consumed, its sequence number used). */
static int take(const struct pc_dp_recv_rules *r, const struct pc_dp_sink *sink, const uint8_t *frame,
                const struct pc_dp_frame *f, struct pc_dp_recv_counts *counts)
{
    int rc;
    counts->frames++;
    if (f->type == r->page_run_type) {
        if (!counts->first_ns[f->cause])
            counts->first_ns[f->cause] = now_ns();
        rc = sink->run(sink->ctx, f->first, f->npages, frame + PC_DP_RECV_HEADER_BYTES, f->cause);
        if (!rc)
            counts->pages[f->cause] += f->npages;
    } else {
        rc = sink->zero(sink->ctx, f->first, f->npages);
        if (!rc)
            counts->zero_pages += f->npages;
    }
    if (rc < 0) {
        counts->sink_rc = rc;
        return PC_DP_RECV_SINK;
    }
    return 0;
}

/* Receives more bytes for a frame that needs `need` bytes from *start: the rest of a
 * large frame exactly (nothing after it ever moves), small ones greedily. 0, or why to return. */
static int fill(const struct pc_dp_recv_rules *r, int fd, uint8_t *buf, size_t cap, size_t *start, size_t *end,
                size_t need, size_t greedy, struct pc_dp_recv_counts *counts)
{
    if (*start == *end)
        *start = *end = 0;
    if (*start + need > cap || cap - *end < PC_DP_RECV_HEADER_BYTES + PC_AUTH_TAG_BYTES) {
        memmove(buf, buf + *start, *end - *start);
        *end -= *start;
        *start = 0;
    }
    size_t have = *end - *start;
    size_t want = need > GREEDY_READ ? need - have : greedy;
    if (want > cap - *end)
        want = cap - *end;
    /* The rest of a large frame is on its way (its sender writes it whole): wait for all
     * of it in one call instead of waking per segment. A shutdown of the channel (link
     * lost, migration over) ends the wait. */
    int flags = need > GREEDY_READ ? MSG_WAITALL : MSG_DONTWAIT;
    for (;;) {
        ssize_t got = recv(fd, buf + *end, want, flags);
        if (got > 0) {
            *end += (size_t)got;
            counts->bytes_received += (uint64_t)got;
            return 0;
        }
        if (got == 0)
            return PC_DP_RECV_CLOSED;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return -errno;
        flags = MSG_DONTWAIT; /* a non-blocking socket: wait in poll */
        if (r->stop && __atomic_load_n(r->stop, __ATOMIC_ACQUIRE))
            return PC_DP_RECV_STOPPED;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, WAIT_MS) < 0 && errno != EINTR)
            return -errno;
    }
}

/* A page run's header that a placing sink takes (the payload is not read yet, so its
 * tag is checked later, by the sink): OK, MORE, or OTHER (not a page run the decoder
 * would accept by its header, or one outside RAM: the whole-frame parse decides). */
static int parse_run_header(const uint8_t *buf, size_t len, const struct pc_dp_recv_rules *rules,
                            struct pc_dp_frame *out)
{
    uint32_t length;
    out->bytes = PC_DP_RECV_HEADER_BYTES;
    if (len < PC_DP_RECV_HEADER_BYTES)
        return PC_DP_RECV_MORE;
    if (!data_header(buf, rules, &length) || buf[2] != rules->page_run_type)
        return PC_DP_RECV_OTHER;
    out->type = buf[2];
    out->cause = buf[3];
    out->first = get64(buf + 8);
    out->npages = length / rules->page_size;
    return inside(rules, out->first, out->npages) ? PC_DP_RECV_OK : PC_DP_RECV_OTHER;
}

/* Hands the page run whose header is at *start to the placing sink (taken: consumed,
 * its sequence number used, whatever the sink says). */
static int place(const struct pc_dp_recv_rules *r, const struct pc_dp_sink *sink, int fd, struct pc_frame_auth *verify,
                 uint64_t *seq, uint8_t *buf, size_t *start, size_t *end, const struct pc_dp_frame *f,
                 struct pc_dp_recv_counts *counts)
{
    uint8_t header[PC_DP_RECV_HEADER_BYTES];
    memcpy(header, buf + *start, sizeof(header));
    *start += sizeof(header);
    counts->frames++;
    uint64_t frame_seq = (*seq)++;
    if (verify && pc_frame_auth_begin(verify, frame_seq, header, sizeof(header))) {
        counts->sink_rc = -EIO; /* libcrypto failed */
        return PC_DP_RECV_SINK;
    }
    if (!counts->first_ns[f->cause])
        counts->first_ns[f->cause] = now_ns();
    struct pc_dp_stream in = {.fd = fd, .buf = buf, .start = start, .end = end, .verify = verify,
                              .left = f->npages * r->page_size, .bytes_received = &counts->bytes_received};
    int sink_rc = 0;
    int rc = sink->place(sink->ctx, f->first, f->npages, f->cause, &in, &sink_rc);
    if (rc == PC_DP_RECV_SINK)
        counts->sink_rc = sink_rc;
    else if (!rc)
        counts->pages[f->cause] += f->npages;
    return rc;
}

int pc_dp_recv(const struct pc_dp_recv_rules *rules, const struct pc_dp_sink *sink, int fd,
               struct pc_frame_auth *verify, uint64_t *seq, uint8_t *buf, size_t cap, size_t *start, size_t *end,
               struct pc_dp_recv_counts *counts)
{
    if (cap < pc_dp_recv_min_buffer(rules) || *start > *end || *end > cap || !rules->page_size)
        return -EINVAL;
    size_t greedy = sink->place ? PLACE_GREEDY_READ : GREEDY_READ;
    for (;;) {
        struct pc_dp_frame f;
        int rc, verdict = PC_DP_RECV_OTHER;
        if (sink->place) {
            verdict = parse_run_header(buf + *start, *end - *start, rules, &f);
            if (verdict == PC_DP_RECV_OK) {
                if ((rc = hand_back(rules, &f)) || (rc = place(rules, sink, fd, verify, seq, buf, start, end, &f, counts)))
                    return rc;
                continue;
            }
        }
        if (verdict == PC_DP_RECV_OTHER)
            verdict = pc_dp_recv_parse(buf + *start, *end - *start, verify, *seq, rules, &f);
        if (verdict == PC_DP_RECV_OTHER)
            return PC_DP_RECV_FRAME;
        if (verdict == PC_DP_RECV_OK) {
            if ((rc = hand_back(rules, &f)))
                return rc;
            const uint8_t *frame = buf + *start;
            *start += f.bytes;
            (*seq)++;
            if ((rc = take(rules, sink, frame, &f, counts)))
                return rc;
            continue;
        }
        if ((rc = fill(rules, fd, buf, cap, start, end, f.bytes, greedy, counts)))
            return rc;
    }
}

/* ---- the payload stream of a placing sink ---- */

/* Reads into dst from the buffer, then the socket (flags: MSG_DONTWAIT), until len bytes
 * or nothing more has arrived. 0, CLOSED or -errno; *got: bytes read. */
static int stream_recv(struct pc_dp_stream *s, uint8_t *dst, size_t len, size_t *got)
{
    size_t have = *s->end - *s->start, n = have < len ? have : len;
    memcpy(dst, s->buf + *s->start, n);
    *s->start += n;
    *got = n;
    while (*got < len) {
        ssize_t r = recv(s->fd, dst + *got, len - *got, MSG_DONTWAIT);
        if (r > 0) {
            *got += (size_t)r;
            *s->bytes_received += (uint64_t)r;
            continue;
        }
        if (r == 0)
            return PC_DP_RECV_CLOSED;
        if (errno == EINTR)
            continue;
        return errno == EAGAIN ? 0 : -errno;
    }
    return 0;
}

int pc_dp_stream_read(struct pc_dp_stream *s, uint8_t *dst, size_t len, size_t *got)
{
    if (len > s->left)
        len = (size_t)s->left;
    int rc = stream_recv(s, dst, len, got);
    s->left -= *got;
    if (*got && s->verify && pc_frame_auth_update(s->verify, dst, *got))
        return -EIO; /* libcrypto failed */
    return rc;
}

int pc_dp_stream_wait(struct pc_dp_stream *s)
{
    if (*s->end > *s->start)
        return 0;
    struct pollfd p = {.fd = s->fd, .events = POLLIN};
    if (poll(&p, 1, WAIT_MS) < 0 && errno != EINTR)
        return -errno;
    return 0;
}

int pc_dp_stream_finish(struct pc_dp_stream *s)
{
    if (s->left)
        return -EINVAL; /* the sink's bug: the payload is not read yet */
    if (!s->verify)
        return 0;
    uint8_t tag[PC_AUTH_TAG_BYTES];
    size_t have = 0;
    while (have < sizeof(tag)) {
        size_t got;
        int rc = stream_recv(s, tag + have, sizeof(tag) - have, &got);
        have += got;
        if (rc)
            return rc;
        if (have < sizeof(tag) && (rc = pc_dp_stream_wait(s)))
            return rc;
    }
    int bad = pc_frame_auth_end_check(s->verify, tag);
    return bad < 0 ? -EIO : bad ? PC_DP_RECV_FORGED : 0;
}

/* ---- a sink into plain memory ---- */

static int memory_run(void *ctx, uint64_t first, uint64_t npages, const uint8_t *data, uint8_t cause)
{
    struct pc_dp_memory *m = ctx;
    if (first > m->npages || npages > m->npages - first)
        return -EINVAL;
    memcpy(m->base + first * m->page_size, data, npages * m->page_size);
    return 0;
}

static int memory_zero(void *ctx, uint64_t first, uint64_t npages)
{
    struct pc_dp_memory *m = ctx;
    if (first > m->npages || npages > m->npages - first)
        return -EINVAL;
    memset(m->base + first * m->page_size, 0, npages * m->page_size);
    return 0;
}

void pc_dp_sink_memory(struct pc_dp_sink *sink, struct pc_dp_memory *mem)
{
    sink->run = memory_run;
    sink->zero = memory_zero;
    sink->ctx = mem;
}
