/* ckpt_io: an epoch's frames sent in one call, a staged epoch applied (see ckpt_io.h). */
#define _GNU_SOURCE
#include "ckpt_io.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#define BATCH_FRAMES 336 /* 3 iovecs each: below the kernel's 1024 per sendmsg */

struct batch {
    struct iovec iov[3 * BATCH_FRAMES];
    uint8_t heads[BATCH_FRAMES][PC_DP_HEADER_BYTES];
    uint8_t tags[BATCH_FRAMES][PC_AUTH_TAG_BYTES];
    int frames, niov;
};

static int flush(struct pc_dp_link *link, struct batch *b)
{
    int rc = b->niov ? pc_dp_send_iov(link, b->iov, b->niov) : 0;
    b->frames = b->niov = 0;
    return rc;
}

/* Appends one frame (header bytes copied, payload referenced) with its tag. */
static int add(struct pc_dp_link *link, struct batch *b, const uint8_t *header, const uint8_t *payload, size_t len)
{
    if (b->frames == BATCH_FRAMES) {
        int rc = flush(link, b);
        if (rc)
            return rc;
    }
    uint8_t *head = b->heads[b->frames], *tag = b->tags[b->frames];
    memcpy(head, header, PC_DP_HEADER_BYTES);
    b->iov[b->niov++] = (struct iovec){head, PC_DP_HEADER_BYTES};
    if (len)
        b->iov[b->niov++] = (struct iovec){(void *)payload, len};
    if (link->seal) {
        if (pc_frame_auth_tag(link->seal, link->seq, head, PC_DP_HEADER_BYTES, payload, len, tag))
            return -EPROTO;
        link->seq++;
        b->iov[b->niov++] = (struct iovec){tag, PC_AUTH_TAG_BYTES};
    }
    b->frames++;
    return 0;
}

static int add_whole(struct pc_dp_link *link, struct batch *b, const uint8_t *frame, size_t len)
{
    if (len < PC_DP_HEADER_BYTES)
        return len ? -EINVAL : 0;
    return add(link, b, frame, frame + PC_DP_HEADER_BYTES, len - PC_DP_HEADER_BYTES);
}

int pc_ckpt_send_epoch(struct pc_dp_link *link, const uint8_t *pre, size_t pre_len, const uint8_t *src,
                       int packed, uint32_t page_size, const uint64_t *runs, size_t nruns, uint32_t max_run_pages,
                       uint8_t cause, const uint8_t *post, size_t post_len)
{
    static __thread struct batch b; /* ~22 KiB: not on the caller's stack */
    b.frames = b.niov = 0;
    if (!max_run_pages)
        return -EINVAL;
    int rc = add_whole(link, &b, pre, pre_len);
    const uint8_t *at = src;
    for (size_t i = 0; i < nruns && !rc; i++) {
        uint64_t first = runs[2 * i], left = runs[2 * i + 1];
        if (!packed)
            at = src + first * page_size;
        while (left && !rc) {
            uint64_t n = left < max_run_pages ? left : max_run_pages;
            uint8_t header[PC_DP_HEADER_BYTES];
            pc_dp_header(header, PC_DP_PAGE_RUN, cause, (uint32_t)(n * page_size), first);
            rc = add(link, &b, header, at, n * page_size);
            at += n * page_size;
            first += n;
            left -= n;
        }
    }
    if (!rc)
        rc = add_whole(link, &b, post, post_len);
    if (!rc)
        rc = flush(link, &b);
    return rc;
}

void pc_ckpt_gather(uint8_t *dst, const uint8_t *src, uint32_t page_size, const uint64_t *runs, size_t nruns)
{
    for (size_t i = 0; i < nruns; i++) {
        size_t len = runs[2 * i + 1] * page_size;
        memcpy(dst, src + runs[2 * i] * page_size, len);
        dst += len;
    }
}

void pc_ckpt_apply(uint8_t *image, const uint8_t *arena, uint32_t page_size, const uint64_t *staged, size_t nruns)
{
    for (size_t i = 0; i < nruns; i++)
        memcpy(image + staged[3 * i] * page_size, arena + staged[3 * i + 2], staged[3 * i + 1] * page_size);
}

/* -- the standby's staging sink ------------------------------------------------------- */

static int grow(void **p, uint64_t *cap, uint64_t need, size_t unit)
{
    if (need <= *cap)
        return 0;
    uint64_t n = *cap ? *cap : 1;
    while (n < need)
        n *= 2;
    void *q = realloc(*p, n * unit);
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

int pc_ckpt_stage_run(struct pc_ckpt_stage *st, uint64_t first, uint64_t npages, const uint8_t *data)
{
    uint64_t len = npages * st->page_size;
    if (grow((void **)&st->arena, &st->arena_cap, st->used + len, 1)
        || grow((void **)&st->runs, &st->runs_cap, 3 * (st->nruns + 1), sizeof(uint64_t)))
        return -ENOMEM;
    memcpy(st->arena + st->used, data, len);
    uint64_t *run = st->runs + 3 * st->nruns++;
    run[0] = first;
    run[1] = npages;
    run[2] = st->used;
    st->used += len;
    st->pages += npages;
    return 0;
}

static int stage_run(void *ctx, uint64_t first, uint64_t npages, const uint8_t *data, uint8_t cause)
{
    return pc_ckpt_stage_run(ctx, first, npages, data);
}

static int stage_zero(void *ctx, uint64_t first, uint64_t npages)
{
    return -EPROTO; /* no zero ranges in an epoch: the session never lets C take one */
}

void pc_ckpt_sink_stage(struct pc_dp_sink *sink, struct pc_ckpt_stage *stage)
{
    sink->run = stage_run;
    sink->zero = stage_zero;
    sink->ctx = stage;
}

void pc_ckpt_stage_free(struct pc_ckpt_stage *stage)
{
    free(stage->arena);
    free(stage->runs);
    *stage = (struct pc_ckpt_stage){.page_size = stage->page_size};
}
