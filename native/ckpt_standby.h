/*
 * ckpt_standby: the standby's epoch loop in C, without the GIL (cffi releases it for
 * the whole call). For each epoch: its EpochBegin, its page runs staged as they come
 * (ckpt_io.h's stage, each run checked by dp_recv's parser as the Python decoder checks
 * it), its EpochCommit; then the staged epoch is applied to the image and acknowledged
 * (EpochAck, tagged with the channel's sealer). So the image is always exactly the last
 * complete epoch, as in the Python loop it replaces.
 *
 * Control frames are taken only when they are byte for byte what ckpt_frames.h builds
 * for the values expected (the next epoch's EpochBegin; an EpochCommit of this epoch
 * announcing the pages that arrived) and authentic; any other frame is left at the
 * start of the receive buffer for Python's decoder (FRAME): a Ping, CheckpointEnd, an
 * Error, an epoch out of order or a forged frame (Python's error says which).
 *
 * Returns FRAME, LOG_FULL (Python takes the log and calls again), YIELD (after a slice:
 * Python's signal handlers run; it calls again), CLOSED (the primary
 * closed the stream), SILENT (nothing arrived for silence_ns) or -errno (a failed receive
 * or send, -ENOMEM: no memory to stage).
 */
#ifndef PC_CKPT_STANDBY_H
#define PC_CKPT_STANDBY_H

#include <stddef.h>
#include <stdint.h>

#include "ckpt_frames.h"
#include "ckpt_link.h"
#include "ckpt_io.h"
#include "dp_recv.h"
#include "dp_send.h"

#define PC_CKPT_STANDBY_FRAME 1
#define PC_CKPT_STANDBY_LOG_FULL 2
#define PC_CKPT_STANDBY_CLOSED 3
#define PC_CKPT_STANDBY_SILENT 4
#define PC_CKPT_STANDBY_YIELD 5

struct pc_ckpt_standby {
    /* the channel's send side and receive side (a buffer of at least
     * pc_dp_recv_min_buffer(rules) bytes; rx.last_ns 0: the first call's start), lent */
    struct pc_dp_link *link;
    struct pc_ckpt_rx rx;
    const struct pc_dp_recv_rules *rules; /* the layout, limits and frame types */
    struct pc_ckpt_stage *stage;
    uint8_t *image;
    int64_t silence_ns;
    int64_t slice_ns; /* the longest call: then YIELD (Python's signal handlers run) */
    /* state, kept across calls */
    uint64_t expect;  /* the next epoch */
    int in_epoch;     /* its EpochBegin was taken */
    struct pc_ckpt_commit committed; /* the last epoch applied */
    /* the log of applied epochs, drained by Python */
    uint64_t *log_pages;
    int64_t *log_apply_ns;
    size_t log_cap, log_len;
};

int pc_ckpt_standby_run(struct pc_ckpt_standby *s);

#endif /* PC_CKPT_STANDBY_H */
