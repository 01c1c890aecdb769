/*
 * ckpt_primary: the primary's epoch loop in C, without the GIL (cffi releases it for
 * the whole call). Python keeps the policy: it starts the loop once the guest runs its
 * epochs through the doorbell (epoch_doorbell.h), and decides what each return means.
 *
 * One turn of the loop: wait for the guest's answer on the doorbell (its vCPUs parked,
 * the dirty log harvested into the doorbell) -> send the epoch (EpochBegin, the dirty
 * pages with the state page, EpochCommit: ckpt_io.h's pc_ckpt_send_epoch, every frame
 * tagged in order) -> read the acknowledgements that came, waiting while more than
 * max_unacked epochs are unacknowledged -> ring the doorbell for the next epoch.
 * The pages go into the socket while the guest is parked (sendmsg copies them), so an
 * epoch is the RAM at one step boundary; with `overlap` they are copied while it is
 * parked and the copy is sent right after the ring, while the guest runs.
 *
 * An acknowledgement is taken only when it is byte for byte the EpochAck of the next
 * epoch with the steps that epoch was sent with (ckpt_frames.h), and authentic; any other
 * frame is left at the start of the receive buffer for Python (FRAME): a Pong, an Error,
 * an acknowledgement out of order (Python's protocol error says why).
 *
 * The call returns (state kept in the struct, so the next call goes on) after a slice
 * (WAITING, between epochs: Python checks that the guest lives, sends heartbeats, and
 * its signal handlers run), on a frame for Python (FRAME), when the acknowledgements reach
 * notify_acked (ACKED: Python reports the commit), when the log is full (LOG_FULL), when
 * the last epoch is sent (ENDED: the stop flag, the epoch limit, the deadline, or the
 * guest's final answer), on the guest's error answer (GUEST_ERROR), when the standby
 * closes the stream (CLOSED) or on a failed send or receive (-errno).
 */
#ifndef PC_CKPT_PRIMARY_H
#define PC_CKPT_PRIMARY_H

#include <stddef.h>
#include <stdint.h>

#include "ckpt_frames.h"
#include "ckpt_link.h"
#include "dp_send.h"
#include "epoch_doorbell.h"

#define PC_CKPT_LOOP_WAITING 1
#define PC_CKPT_LOOP_FRAME 2
#define PC_CKPT_LOOP_ACKED 3
#define PC_CKPT_LOOP_LOG_FULL 4
#define PC_CKPT_LOOP_ENDED 5
#define PC_CKPT_LOOP_GUEST_ERROR 6
#define PC_CKPT_LOOP_CLOSED 7

/* Epochs whose acknowledgement may be outstanding at once (max_unacked + 1 at most). */
#define PC_CKPT_RING 64

/* One epoch as the loop saw it (CLOCK_MONOTONIC ns; resume_ns 0: the guest was not let
 * run after it, the last epoch). */
struct pc_ckpt_epoch_rec {
    uint64_t epoch, pages, runs, steps0;
    uint64_t unacked;    /* epochs unacknowledged when the guest was let run */
    int64_t paused_ns;   /* the guest parked (its own clock reading, from the doorbell) */
    int64_t prev_resume_ns, seen_ns, resume_ns; /* the guest let run, its answer seen, let run again */
    int64_t harvest_ns;  /* durations: the guest's harvest, */
    int64_t build_ns;    /* the frames built (with overlap: the pages copied), */
    int64_t send_ns;     /* the epoch sent, */
    int64_t ack_ns;      /* acknowledgements taken (waited for beyond the window, read after the resume) */
};

struct pc_ckpt_primary {
    struct pc_dp_link *link; /* the channel's send side and receive side, lent */
    struct pc_ckpt_rx rx;
    /* the guest */
    struct pc_doorbell *db;
    uint32_t threads;
    uint64_t budget;     /* steps per vCPU per epoch */
    const uint8_t *ram;  /* its RAM, mapped (memfd) */
    uint32_t page_size, max_run_pages;
    uint64_t *runs;      /* scratch: 2 * (db->runs_cap + 1) */
    uint8_t *frames;     /* scratch: PC_DP_HEADER_BYTES + PC_CKPT_FRAME_MAX (the epoch's EpochBegin, EpochCommit) */
    int overlap;         /* send each epoch while the guest runs the next (its pages copied first) */
    uint8_t *copy;       /* with overlap: room for copy_cap bytes of pages */
    uint64_t copy_cap;
    /* policy */
    uint64_t max_unacked;  /* < PC_CKPT_RING - 1 */
    uint64_t last_epoch;   /* the epoch limit (UINT64_MAX: none) */
    int64_t deadline_ns;   /* 0: none */
    const int *stop;       /* raised: the next epoch is the last */
    uint64_t notify_acked; /* return ACKED once acked reaches it (0: never) */
    int64_t slice_ns;      /* the longest call (and wait for the guest) */
    /* state, kept across calls */
    uint64_t epoch, acked;
    uint32_t req;          /* the doorbell request under way (0: none) */
    int resume_due;        /* an epoch is taken, the guest not let run yet */
    int send_due;          /* its copy is to be sent once the guest runs */
    size_t send_runs, commit_bytes; /* its runs (in runs) and its EpochCommit's length (in frames) */
    int64_t resume_ns;     /* when the guest was last let run */
    int final_state;       /* PC_DB_* of the last answer */
    int guest_error;
    int64_t ring_sent_ns[PC_CKPT_RING];
    uint64_t ring_steps[PC_CKPT_RING][PC_GUEST_MAX_THREADS];
    /* the log, drained by Python */
    struct pc_ckpt_epoch_rec *log;
    size_t log_cap, log_len;
    int64_t *commit_ns;    /* marker sent -> acknowledgement read, per acknowledged epoch */
    size_t commit_cap, commit_len;
};

/* Runs epochs until one of the returns above. */
int pc_ckpt_primary_run(struct pc_ckpt_primary *p);

#endif /* PC_CKPT_PRIMARY_H */
