/*
 * ckpt_io: the per-page work of continuous checkpointing, without the GIL.
 *
 * The primary sends an epoch in one call: its EpochBegin frame, one PAGE_RUN frame per
 * dirty run and its EpochCommit frame, each tagged in order (frame_auth.h) and written
 * with sendmsg in batches (the pages are copied into the socket while the guest is
 * parked, so the epoch is the RAM at one step boundary). Frames are laid out as in
 * postcopy/protocol/frames.py (see dp_send.h); the tests compare both byte for byte.
 *
 * The standby copies a staged epoch into its image in one call once all of it arrived.
 */
#ifndef PC_CKPT_IO_H
#define PC_CKPT_IO_H

#include <stddef.h>
#include <stdint.h>

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

/* Copies each run (first page, npages pairs) from src + first * page_size to dst, back to back. */
void pc_ckpt_gather(uint8_t *dst, const uint8_t *src, uint32_t page_size, const uint64_t *runs, size_t nruns);

/* Copies each staged run (first page, npages, offset triples) from arena + offset to
 * image + first * page_size. */
void pc_ckpt_apply(uint8_t *image, const uint8_t *arena, uint32_t page_size, const uint64_t *staged, size_t nruns);

#endif /* PC_CKPT_IO_H */
