/*
 * ckpt_io: the per-page work of continuous checkpointing, without the GIL.
 *
 * The primary sends an epoch in one call: its EpochBegin frame, one PAGE_RUN frame per
 * dirty run and its EpochCommit frame, each tagged in order (frame_auth.h) and written
 * with sendmsg in batches (the pages are copied into the socket while the guest is
 * parked, so the epoch is the RAM at one step boundary). Frames are laid out as in
 * postcopy/protocol/frames.py (see dp_send.h); the tests compare both byte for byte.
 *
 * The standby receives an epoch's page runs with dp_recv (dp_recv.h: every frame checked
 * as the Python decoder checks it) into a staging sink, and copies the staged runs into
 * its image in one call once all of the epoch arrived (its EpochCommit).
 */
#ifndef PC_CKPT_IO_H
#define PC_CKPT_IO_H

#include <stddef.h>
#include <stdint.h>

#include "dp_recv.h"
#include "dp_send.h"

/* Sends `pre` (a whole frame, header and payload, untagged; pre_len 0: none), one
 * PAGE_RUN frame of `cause` per run (runs: nruns (first page, npages) pairs; a run of
 * more than max_run_pages pages goes as several frames) and `post` (like pre), tagging
 * each in turn with link->seal (NULL: no tags). A run's bytes are at
 * src + first * page_size, or, with `packed`, right after the previous run's in src.
 * Returns 0, or -errno of the failed send (the link is lost), or -EPROTO (tagging). */
int pc_ckpt_send_epoch(struct pc_dp_link *link, const uint8_t *pre, size_t pre_len, const uint8_t *src,
                       int packed, uint32_t page_size, const uint64_t *runs, size_t nruns, uint32_t max_run_pages,
                       uint8_t cause, const uint8_t *post, size_t post_len);

/* An epoch's staged runs: the bytes in arena, (first page, npages, offset in arena)
 * triples in runs; both grow as needed (realloc) and are freed by pc_ckpt_stage_free. */
struct pc_ckpt_stage {
    uint32_t page_size;
    uint8_t *arena;
    uint64_t arena_cap, used; /* bytes */
    uint64_t *runs;
    uint64_t runs_cap, nruns, pages; /* runs_cap in u64 */
};

/* A dp_recv sink (dp_recv.h) that stages every page run it is given. */
void pc_ckpt_sink_stage(struct pc_dp_sink *sink, struct pc_ckpt_stage *stage);
void pc_ckpt_stage_free(struct pc_ckpt_stage *stage);
/* Stages one run (npages pages at data): 0, or -ENOMEM. */
int pc_ckpt_stage_run(struct pc_ckpt_stage *stage, uint64_t first, uint64_t npages, const uint8_t *data);

/* Copies each run (first page, npages pairs) from src + first * page_size to dst, back to back. */
void pc_ckpt_gather(uint8_t *dst, const uint8_t *src, uint32_t page_size, const uint64_t *runs, size_t nruns);

/* Copies each staged run (first page, npages, offset triples) from arena + offset to
 * image + first * page_size. */
void pc_ckpt_apply(uint8_t *image, const uint8_t *arena, uint32_t page_size, const uint64_t *staged, size_t nruns);

#endif /* PC_CKPT_IO_H */
