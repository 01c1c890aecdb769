/*
 * dp_recv: the receiver of page frames, run without the GIL (cffi releases it for the
 * whole call). Reads PAGE_RUN and ZERO_RANGE frames from a socket into a buffer, checks
 * each as postcopy/protocol/decode.py does (header, tag, range: the tests compare both
 * over mutated frames), and hands it to a sink: a small pair of functions that put the
 * pages where they belong (the destination's gated UFFDIO_COPY, see dp_dest.h; or a
 * plain copy into mapped memory, pc_dp_sink_memory below).
 *
 * The caller lends the channel's receive side for one call (Channel.native_receive):
 * its descriptor, its verifier and next sequence number, and a buffer holding the
 * bytes its decoder had buffered. The call returns, leaving the frame it would not take
 * unconsumed in the buffer, on any other frame kind, a frame the decoder would refuse
 * (bad tag, malformed header, range outside RAM), a page run of a cause the session
 * does not let through now, a change of the session's phase word, the stop flag, the
 * end of the stream or a receive error: Python's decoder then takes over.
 */
#ifndef PC_DP_RECV_H
#define PC_DP_RECV_H

#include <stddef.h>
#include <stdint.h>

#include "frame_auth.h"

#define PC_DP_RECV_HEADER_BYTES 16
#define PC_DP_RECV_CAUSES 8

/* The parser's verdicts. */
#define PC_DP_RECV_OK 1
#define PC_DP_RECV_MORE 0
#define PC_DP_RECV_OTHER (-1)

/* Why pc_dp_recv returned (negative: -errno of a failed receive). */
#define PC_DP_RECV_FRAME 1   /* the frame at *start is Python's to decode */
#define PC_DP_RECV_PHASE 2   /* the session's phase word changed: Python checks the next frame */
#define PC_DP_RECV_STOPPED 3 /* the stop flag was raised */
#define PC_DP_RECV_CLOSED 4  /* the peer closed the stream */
#define PC_DP_RECV_SINK 5    /* the sink failed: its code is in counts->sink_rc (the frame was consumed) */
#define PC_DP_RECV_FORGED 6  /* a page run placed by the sink failed authentication (consumed; nothing of it used) */

/* What the decoder accepts and the session lets through, handed in by Python. */
struct pc_dp_recv_rules {
    uint32_t page_size;
    uint32_t max_payload;   /* the decoder's limit on a payload */
    const uint64_t *regions; /* RAM as [start, end) page pairs, sorted */
    size_t nregions;
    uint32_t known_causes;  /* bit c: c is a cause of the protocol (else the header is malformed) */
    uint32_t taken_causes;  /* bit c: page runs of cause c are taken now (self-loops of the phase) */
    int take_zero_ranges;   /* ZERO_RANGE frames are taken now */
    int page_run_type, zero_range_type; /* the frame type numbers */
    const uint64_t *phase_word; /* NULL, or: hand back once it differs from phase */
    uint64_t phase;
    const int *stop;        /* NULL, or: hand back once it is set */
};

/* One parsed frame. */
struct pc_dp_frame {
    uint8_t type, cause;
    uint64_t first, npages;
    size_t bytes; /* header, payload and tag; with PC_DP_RECV_MORE: bytes the frame needs */
};

/*
 * The rest of a page run whose header was taken, for a sink that places the payload
 * itself (one copy: the socket's, straight into place): the payload, then the tag. The
 * bytes dp_recv had buffered come first, then the socket's. Every payload byte read is
 * fed to the frame's MAC as it is read, so the tag can be checked at the end without
 * reading the payload again from a buffer.
 */
struct pc_dp_stream {
    int fd;
    uint8_t *buf;        /* dp_recv's buffer, [*start, *end) not consumed */
    size_t *start, *end;
    struct pc_frame_auth *verify; /* NULL: frames carry no tag */
    uint64_t left;       /* payload bytes not read yet */
    uint64_t *bytes_received;
};

/* Reads up to len payload bytes (at most left) into dst: what has arrived, without
 * waiting (*got may be 0). 0, PC_DP_RECV_CLOSED, or -errno. */
int pc_dp_stream_read(struct pc_dp_stream *s, uint8_t *dst, size_t len, size_t *got);
/* Waits (up to ~100 ms) for more bytes to arrive: 0 or -errno. The sender writes a frame
 * whole, so this ignores the stop flag; a shut down channel ends it (a read then says CLOSED). */
int pc_dp_stream_wait(struct pc_dp_stream *s);
/* After the whole payload: reads the tag and checks the MAC (waiting for it). 0 if the
 * frame is authentic (or carries no tag), PC_DP_RECV_FORGED, PC_DP_RECV_CLOSED or -errno. */
int pc_dp_stream_finish(struct pc_dp_stream *s);

/* Where frames go. run: npages pages at data (the received payload); zero: pages that
 * hold only zeros. Each returns 0 or a negative code (then the call returns SINK).
 * place (NULL: page runs go to run): the sink reads a page run's payload and tag itself
 * from the stream (pc_dp_stream_*) and puts it in place; returns 0 once it is in, a
 * reason of pc_dp_recv's (FORGED, CLOSED, -errno of a receive), or SINK with its code
 * in *sink_rc. Whatever it returns, the frame was consumed. */
struct pc_dp_sink {
    int (*run)(void *ctx, uint64_t first, uint64_t npages, const uint8_t *data, uint8_t cause);
    int (*zero)(void *ctx, uint64_t first, uint64_t npages);
    void *ctx;
    int (*place)(void *ctx, uint64_t first, uint64_t npages, uint8_t cause, struct pc_dp_stream *in, int *sink_rc);
};

/* What one call did (added to). */
struct pc_dp_recv_counts {
    uint64_t frames;
    uint64_t pages[PC_DP_RECV_CAUSES]; /* pages of page runs, by cause */
    uint64_t zero_pages;
    uint64_t bytes_received;
    int64_t first_ns[PC_DP_RECV_CAUSES]; /* CLOCK_MONOTONIC ns of the first run of each cause taken (0: none) */
    int sink_rc;
};

/* Parses the frame at buf (len bytes so far) as a page run or zero range that the
 * decoder accepts (verify: the channel's verifier at sequence seq, or NULL: no tags).
 * OK with *out filled; MORE (out->bytes: the bytes it needs) while it may still be one;
 * OTHER for anything else. Does not look at the session (taken causes, phase). */
int pc_dp_recv_parse(const uint8_t *buf, size_t len, struct pc_frame_auth *verify, uint64_t seq,
                     const struct pc_dp_recv_rules *rules, struct pc_dp_frame *out);

/* The smallest buffer pc_dp_recv works with, for these rules. */
size_t pc_dp_recv_min_buffer(const struct pc_dp_recv_rules *rules);

/* Receives on fd into buf (cap bytes; [*start, *end) already buffered) and hands every
 * frame it takes to sink, until one of the reasons above. *seq counts the frames verified. */
int pc_dp_recv(const struct pc_dp_recv_rules *rules, const struct pc_dp_sink *sink, int fd,
               struct pc_frame_auth *verify, uint64_t *seq, uint8_t *buf, size_t cap, size_t *start, size_t *end,
               struct pc_dp_recv_counts *counts);

/* A sink into plain memory: npages pages of page_size bytes at base (a run is copied, a
 * zero range zero-filled). mem must outlive the sink. */
struct pc_dp_memory {
    uint8_t *base;
    uint64_t npages;
    uint32_t page_size;
};
void pc_dp_sink_memory(struct pc_dp_sink *sink, struct pc_dp_memory *mem);

#endif /* PC_DP_RECV_H */
