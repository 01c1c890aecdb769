/* ckpt_standby: the standby's epoch loop in C (see ckpt_standby.h). */
#define _GNU_SOURCE
#include "ckpt_standby.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>

#define MORE 0    /* take: the frame needs more bytes */
#define TAKEN 100 /* take: the frame was taken (apart from the PC_CKPT_STANDBY_* codes) */

static int64_t now(void) { return (int64_t)pc_monotonic_ns(); }

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Sends the EpochAck of the epoch just applied, tagged: 0 or -errno. */
static int acknowledge(struct pc_ckpt_standby *s)
{
    uint8_t frame[PC_CKPT_FRAME_MAX], tag[PC_AUTH_TAG_BYTES];
    const struct pc_ckpt_commit *c = &s->committed;
    const size_t len = pc_ckpt_ack_frame(frame, c->epoch, c->steps, c->nsteps);
    struct iovec iov[2] = {{frame, len}, {tag, sizeof(tag)}};
    struct pc_dp_link *link = s->link;
    if (link->seal) {
        if (pc_frame_auth_tag(link->seal, link->seq, frame, PC_DP_HEADER_BYTES, frame + PC_DP_HEADER_BYTES,
                              len - PC_DP_HEADER_BYTES, tag))
            return -EPROTO;
        link->seq++;
    }
    return pc_dp_send_iov(link, iov, link->seal ? 2 : 1);
}

/* The EpochCommit at `at` (have bytes): TAKEN (applied and acknowledged), MORE (*need:
 * the bytes it needs), FRAME (Python's), LOG_FULL or -errno. */
static int take_commit(struct pc_ckpt_standby *s, const uint8_t *at, size_t have, size_t *need)
{
    const uint32_t length = get32(at + 4);
    uint8_t header[PC_DP_HEADER_BYTES];
    pc_dp_header(header, PC_CKPT_EPOCH_COMMIT, 0, length, 0);
    if (memcmp(at, header, sizeof(header)) || length > PC_CKPT_FRAME_MAX - PC_DP_HEADER_BYTES)
        return PC_CKPT_STANDBY_FRAME;
    *need = PC_DP_HEADER_BYTES + length + (s->rx.verify ? PC_AUTH_TAG_BYTES : 0);
    if (have < *need)
        return MORE;
    struct pc_ckpt_commit c;
    const uint8_t *payload = at + PC_DP_HEADER_BYTES;
    if (pc_ckpt_parse_commit(payload, length, &c) || c.epoch != s->expect || c.pages != s->stage->pages)
        return PC_CKPT_STANDBY_FRAME; /* Python's protocol error names what is wrong */
    if (s->rx.verify
        && pc_frame_auth_check(s->rx.verify, s->rx.seq, at, PC_DP_HEADER_BYTES, payload, length, payload + length))
        return PC_CKPT_STANDBY_FRAME;
    if (s->log_len >= s->log_cap)
        return PC_CKPT_STANDBY_LOG_FULL; /* taken by the next call */
    pc_ckpt_rx_consume(&s->rx, *need);
    struct pc_ckpt_stage *st = s->stage;
    const int64_t t0 = now();
    pc_ckpt_apply(s->image, st->arena, st->page_size, st->runs, st->nruns);
    s->log_apply_ns[s->log_len] = now() - t0;
    s->log_pages[s->log_len++] = st->pages;
    s->committed = c;
    st->used = st->nruns = st->pages = 0;
    s->expect++;
    s->in_epoch = 0;
    const int rc = acknowledge(s);
    return rc ? rc : TAKEN;
}

/* The frame at `at` (have bytes, at least a header): TAKEN, MORE (*need set), or why to return. */
static int take(struct pc_ckpt_standby *s, const uint8_t *at, size_t have, size_t *need)
{
    size_t used;
    if (!s->in_epoch) {
        uint8_t begin[PC_DP_HEADER_BYTES];
        pc_ckpt_begin_frame(begin, s->expect);
        const int m = pc_ckpt_match(at, have, begin, sizeof(begin), s->rx.verify, s->rx.seq, &used);
        if (m < 0)
            return PC_CKPT_STANDBY_FRAME;
        *need = used;
        if (!m)
            return MORE;
        pc_ckpt_rx_consume(&s->rx, used);
        s->in_epoch = 1;
        return TAKEN;
    }
    if (at[2] == PC_CKPT_EPOCH_COMMIT)
        return take_commit(s, at, have, need);
    struct pc_dp_frame f;
    const int verdict = pc_dp_recv_parse(at, have, s->rx.verify, s->rx.seq, s->rules, &f);
    if (verdict == PC_DP_RECV_OTHER
        || (verdict == PC_DP_RECV_OK && (f.type != s->rules->page_run_type || f.cause != PC_CKPT_CAUSE_RESENT)))
        return PC_CKPT_STANDBY_FRAME;
    *need = f.bytes;
    if (verdict == PC_DP_RECV_MORE)
        return MORE;
    if (pc_ckpt_stage_run(s->stage, f.first, f.npages, at + PC_DP_RECV_HEADER_BYTES))
        return -ENOMEM;
    pc_ckpt_rx_consume(&s->rx, f.bytes);
    return TAKEN;
}

int pc_ckpt_standby_run(struct pc_ckpt_standby *s)
{
    struct pc_ckpt_rx *rx = &s->rx;
    if (rx->cap < pc_dp_recv_min_buffer(s->rules) || rx->start > rx->end || rx->end > rx->cap || !s->log_cap)
        return -EINVAL;
    const int64_t called = now();
    if (!rx->last_ns)
        rx->last_ns = called;
    for (;;) {
        size_t need = PC_DP_HEADER_BYTES;
        if (rx->end - rx->start >= PC_DP_HEADER_BYTES) {
            const int rc = take(s, rx->buf + rx->start, rx->end - rx->start, &need);
            if (rc == TAKEN && (s->in_epoch || now() - called < s->slice_ns))
                continue;
            if (rc == TAKEN)
                return PC_CKPT_STANDBY_YIELD;
            if (rc != MORE)
                return rc;
        }
        if (now() - called >= s->slice_ns)
            return PC_CKPT_STANDBY_YIELD;
        const int rc = pc_ckpt_rx_fill(rx, need, rx->last_ns + s->silence_ns);
        if (rc)
            return rc == PC_CKPT_RX_CLOSED    ? PC_CKPT_STANDBY_CLOSED
                   : rc == PC_CKPT_RX_TIMEOUT ? PC_CKPT_STANDBY_SILENT
                                              : rc;
    }
}
