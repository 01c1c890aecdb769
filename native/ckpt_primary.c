/* ckpt_primary: the primary's epoch loop in C (see ckpt_primary.h). */
#define _GNU_SOURCE
#include "ckpt_primary.h"

#include <errno.h>
#include <string.h>

#include "ckpt_io.h"

_Static_assert(PC_CKPT_RING == 64 && PC_GUEST_MAX_THREADS == 56, "ckpt_primary.cdef spells the ring [64][56]");

static int64_t now(void) { return (int64_t)pc_monotonic_ns(); }

/* Takes the acknowledgements that arrived, waiting while more than block_over epochs
 * are unacknowledged. 0, or why to return. */
static int take_acks(struct pc_ckpt_primary *p, uint64_t block_over)
{
    struct pc_ckpt_rx *rx = &p->rx;
    uint8_t frame[PC_CKPT_FRAME_MAX];
    uint64_t built_for = 0;
    size_t len = 0, need = PC_DP_HEADER_BYTES;
    for (;;) {
        if (rx->start != rx->end) {
            if (p->acked == p->epoch)
                return PC_CKPT_LOOP_FRAME; /* no acknowledgement is due: this frame is Python's */
            const uint64_t next = p->acked + 1;
            if (built_for != next) {
                len = pc_ckpt_ack_frame(frame, next, p->ring_steps[next % PC_CKPT_RING], p->threads);
                built_for = next;
            }
            const int m = pc_ckpt_match(rx->buf + rx->start, rx->end - rx->start, frame, len, rx->verify, rx->seq,
                                        &need);
            if (m < 0)
                return PC_CKPT_LOOP_FRAME;
            if (m > 0) {
                pc_ckpt_rx_consume(rx, need);
                p->acked = next;
                if (p->commit_len < p->commit_cap)
                    p->commit_ns[p->commit_len++] = now() - p->ring_sent_ns[next % PC_CKPT_RING];
                if (p->notify_acked && p->acked >= p->notify_acked)
                    return PC_CKPT_LOOP_ACKED;
                need = PC_DP_HEADER_BYTES;
                continue;
            }
        }
        const int block = p->epoch - p->acked > block_over;
        const int rc = pc_ckpt_rx_fill(rx, need, block ? PC_CKPT_RX_FOREVER : 0);
        if (rc == PC_CKPT_RX_AGAIN)
            return 0;
        if (rc)
            return rc == PC_CKPT_RX_CLOSED ? PC_CKPT_LOOP_CLOSED : rc;
    }
}

/* The state page (page 0) always among the runs: the guest's harvest into p->runs.
 * Returns the number of runs; *pages their pages. */
static size_t with_state_page(struct pc_ckpt_primary *p, uint64_t *pages)
{
    const uint64_t *in = p->db->runs;
    const size_t n = p->db->nruns;
    uint64_t *out = p->runs;
    size_t k = 0, i = 0;
    if (!n || in[0] > 1) {
        out[0] = 0;
        out[1] = 1;
        k = 1;
    } else if (in[0] == 1) {
        out[0] = 0;
        out[1] = in[1] + 1;
        k = i = 1;
    }
    memcpy(out + 2 * k, in + 2 * i, 16 * (n - i));
    k += n - i;
    *pages = 0;
    for (size_t j = 0; j < k; j++)
        *pages += out[2 * j + 1];
    return k;
}

/* Sends the epoch built in p->frames: its pages from RAM in place, or, packed, from
 * the copy. 0 or -errno. */
static int send_epoch(struct pc_ckpt_primary *p, int packed)
{
    int rc = pc_ckpt_send_epoch(p->link, p->frames, PC_DP_HEADER_BYTES, packed ? p->copy : p->ram, packed,
                                p->page_size, p->runs, p->send_runs, p->max_run_pages, PC_CKPT_CAUSE_RESENT,
                                p->frames + PC_DP_HEADER_BYTES, p->commit_bytes);
    return rc > 0 ? -EIO : rc;
}

/* The guest answered: build its epoch and send it now (or, with overlap, copy its
 * pages to send them once the guest runs again). 0 (the guest is to run the next
 * epoch), ENDED (this was the last), GUEST_ERROR or -errno. */
static int take_epoch(struct pc_ckpt_primary *p)
{
    struct pc_ckpt_epoch_rec *r = &p->log[p->log_len];
    const struct pc_doorbell *db = p->db;
    const int64_t seen = now();
    p->final_state = db->state;
    if (db->state != PC_DB_PARKED && db->state != PC_DB_FINISHED) {
        p->guest_error = db->state == PC_DB_ERROR ? db->error : 0;
        return PC_CKPT_LOOP_GUEST_ERROR;
    }
    if (!db->harvest)
        return -EINVAL;
    uint64_t pages;
    p->send_runs = with_state_page(p, &pages);
    const uint64_t epoch = ++p->epoch;
    uint64_t *steps = p->ring_steps[epoch % PC_CKPT_RING];
    for (uint32_t t = 0; t < p->threads; t++)
        steps[t] = db->steps_done[t];
    const int64_t paused = db->paused_ns ? (int64_t)db->paused_ns : seen;
    const int stopping = db->state == PC_DB_FINISHED || (p->stop && __atomic_load_n(p->stop, __ATOMIC_ACQUIRE))
                         || epoch >= p->last_epoch || (p->deadline_ns && seen >= p->deadline_ns);
    pc_ckpt_begin_frame(p->frames, epoch);
    p->commit_bytes = pc_ckpt_commit_frame(p->frames + PC_DP_HEADER_BYTES, epoch, pages, p->send_runs, steps,
                                         p->threads, (uint64_t)paused);
    *r = (struct pc_ckpt_epoch_rec){.epoch = epoch, .pages = pages, .runs = p->send_runs, .steps0 = steps[0],
                                    .paused_ns = paused, .harvest_ns = (int64_t)db->harvest_ns,
                                    .prev_resume_ns = p->resume_ns, .seen_ns = seen};
    /* With overlap the pages are copied while the guest is parked and sent while it
     * runs; an epoch beyond the copy's room goes in place, as the last one does. */
    p->send_due = p->overlap && !stopping && pages * p->page_size <= p->copy_cap;
    if (p->send_due)
        pc_ckpt_gather(p->copy, p->ram, p->page_size, p->runs, p->send_runs);
    const int64_t built = now();
    r->build_ns = built - seen;
    p->ring_sent_ns[epoch % PC_CKPT_RING] = built;
    if (!p->send_due) {
        int rc = send_epoch(p, 0);
        r->send_ns = now() - built;
        if (rc)
            return rc;
    }
    if (stopping) {
        p->log_len++;
        return PC_CKPT_LOOP_ENDED;
    }
    p->resume_due = 1;
    return 0;
}

int pc_ckpt_primary_run(struct pc_ckpt_primary *p)
{
    if (!p->db || !p->threads || p->threads > PC_GUEST_MAX_THREADS || p->max_unacked >= PC_CKPT_RING - 1
        || !p->max_run_pages || !p->log_cap || !p->frames)
        return -EINVAL;
    const int64_t called = now();
    for (;;) {
        int rc;
        if (!p->resume_due && p->log_len >= p->log_cap)
            return PC_CKPT_LOOP_LOG_FULL;
        if (p->req && now() - called >= p->slice_ns)
            return PC_CKPT_LOOP_WAITING; /* a slice at most per call: Python's signal handlers and stop() run */
        if (p->req) {
            if ((rc = take_acks(p, p->max_unacked)))
                return rc;
            if (!pc_doorbell_wait(p->db, p->req, p->slice_ns))
                return PC_CKPT_LOOP_WAITING;
            p->req = 0;
            if ((rc = take_epoch(p)))
                return rc;
        }
        if (!p->resume_due)
            return -EINVAL; /* nothing under way: Python starts the first epoch */
        struct pc_ckpt_epoch_rec *r = &p->log[p->log_len];
        int64_t t0 = now();
        if ((rc = take_acks(p, p->max_unacked))) /* a standby lagging this far holds the guest */
            return rc;
        r->resume_ns = p->resume_ns = now();
        r->ack_ns = r->resume_ns - t0;
        r->unacked = p->epoch - p->acked;
        p->req = pc_doorbell_ring(p->db, PC_DB_RUN, p->budget, 1);
        p->resume_due = 0;
        p->log_len++;
        if (p->send_due) { /* the copied epoch, while the guest runs */
            p->send_due = 0;
            t0 = now();
            rc = send_epoch(p, 1);
            r->send_ns += now() - t0;
            if (rc)
                return rc;
        }
        t0 = now();
        rc = take_acks(p, p->max_unacked); /* those that came, read while the guest runs */
        r->ack_ns += now() - t0;
        if (rc)
            return rc;
    }
}
