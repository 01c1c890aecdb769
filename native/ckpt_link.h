/*
 * ckpt_link: the receive side of a channel lent to a native epoch loop (ckpt_primary.h,
 * ckpt_standby.h) for one call: its descriptor (a duplicate), its verifier and next
 * sequence number, and a buffer holding the bytes received but not consumed
 * ([start, end)). Python's decoder hands its buffered bytes over and takes back what
 * the loop leaves (Channel.native_receive), so the next frame is decoded by whichever
 * side the loop returns to.
 */
#ifndef PC_CKPT_LINK_H
#define PC_CKPT_LINK_H

#include <stddef.h>
#include <stdint.h>

#include "frame_auth.h"

#define PC_CKPT_RX_AGAIN 100   /* nothing has arrived (and the caller would not wait) */
#define PC_CKPT_RX_CLOSED 101  /* the peer closed the stream */
#define PC_CKPT_RX_TIMEOUT 102 /* nothing arrived before the deadline */
#define PC_CKPT_RX_FOREVER INT64_MAX

struct pc_ckpt_rx {
    int fd;
    struct pc_frame_auth *verify; /* NULL: frames carry no tag */
    uint64_t seq;                 /* the verifier's next sequence number */
    uint8_t *buf;
    size_t cap, start, end;
    uint64_t bytes_received;      /* added to */
    int64_t last_ns;              /* CLOCK_MONOTONIC of the last byte's arrival */
};

/* Receives what has arrived, room made for a frame of `need` bytes at start; while
 * nothing has, waits until deadline_ns (CLOCK_MONOTONIC; 0: no wait, FOREVER: no limit).
 * 0, AGAIN, CLOSED, TIMEOUT or -errno. */
int pc_ckpt_rx_fill(struct pc_ckpt_rx *rx, size_t need, int64_t deadline_ns);

/* Consumes a frame of `bytes` bytes (its tag included) at start. */
void pc_ckpt_rx_consume(struct pc_ckpt_rx *rx, size_t bytes);

#endif /* PC_CKPT_LINK_H */
