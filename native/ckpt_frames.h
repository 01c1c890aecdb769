/*
 * ckpt_frames: the epoch control frames of continuous checkpointing built and matched
 * in C, for the native epoch loops (ckpt_primary.h, ckpt_standby.h).
 *
 * The frames are those of postcopy/protocol/frames.py: EpochBegin (header only, the
 * epoch in its argument), EpochCommit and EpochAck (canonical JSON payloads, the one
 * spelling the Python decoder accepts: json.dumps with separators (",", ":") and the
 * keys in the order the Python agents write them). The tests compare these bytes with
 * the Python wire layer's. C accepts a received control frame only when it is byte for
 * byte what these functions build for the values it expects (and its tag checks out):
 * a strict subset of what the Python decoder accepts; anything else is left to Python.
 */
#ifndef PC_CKPT_FRAMES_H
#define PC_CKPT_FRAMES_H

#include <stddef.h>
#include <stdint.h>

#include "frame_auth.h"
#include "guest_vm.h"

#define PC_CKPT_EPOCH_BEGIN 18
#define PC_CKPT_EPOCH_COMMIT 19
#define PC_CKPT_EPOCH_ACK 20
#define PC_CKPT_CAUSE_RESENT 1 /* wire.Cause.RESENT: the page runs of an epoch */
/* The largest frame built here: header and a JSON of 4 numbers and a steps list, each
 * number at most 20 digits. */
#define PC_CKPT_FRAME_MAX (16 + 80 + 21 * PC_GUEST_MAX_THREADS + 4 * 20)

/* Each writes the whole frame (header and payload, no tag) to out (PC_CKPT_FRAME_MAX
 * bytes) and returns its length. */
size_t pc_ckpt_begin_frame(uint8_t *out, uint64_t epoch);
/* {"epoch":E,"pages":P,"runs":R,"steps":[...],"paused_ns":T} */
size_t pc_ckpt_commit_frame(uint8_t *out, uint64_t epoch, uint64_t pages, uint64_t runs, const uint64_t *steps,
                            uint32_t nsteps, uint64_t paused_ns);
/* {"epoch":E,"steps":[...]} */
size_t pc_ckpt_ack_frame(uint8_t *out, uint64_t epoch, const uint64_t *steps, uint32_t nsteps);

/* The values of an EpochCommit frame's payload, parsed strictly: 0 when payload (len
 * bytes) is exactly the canonical JSON pc_ckpt_commit_frame builds (steps: up to
 * PC_GUEST_MAX_THREADS), -1 otherwise. */
struct pc_ckpt_commit {
    uint64_t epoch, pages, runs, paused_ns;
    uint32_t nsteps;
    uint64_t steps[PC_GUEST_MAX_THREADS];
};
int pc_ckpt_parse_commit(const uint8_t *payload, size_t len, struct pc_ckpt_commit *out);

/* A frame whose bytes (header and payload, len of them) are known, checked against the
 * received bytes at buf (have of them: the frame, then its tag if verify): 1 it is that
 * frame and authentic (frame + tag bytes consumed: *used), 0 more bytes are needed
 * (*used: how many), -1 it is not (a frame for the Python decoder). */
int pc_ckpt_match(const uint8_t *buf, size_t have, const uint8_t *frame, size_t len, struct pc_frame_auth *verify,
                  uint64_t seq, size_t *used);

#endif /* PC_CKPT_FRAMES_H */
