/*
 * dp_send: the source's data plane, run without the GIL (cffi releases it for the
 * whole call): the pusher's send loop and the demand server of the urgent channel.
 *
 * Python keeps the policy (what to push next, the size of the pre-paging window, rates,
 * phases) and calls in with batches of page ranges; C does the per-page work, the
 * pre-paging after each demand request included (no return to Python per fault). Frames are
 * built and parsed here exactly as postcopy/protocol/frames.py and decode.py do
 * (16-byte header "!HBBIQ": magic 0x5043, type, flags, payload length, arg; after the
 * handshake a 16-byte AES-GMAC tag over header || payload, see frame_auth.h), and the
 * tests compare both byte for byte.
 *
 * One pc_dp_send per guest holds what the pusher and the demand server share: how RAM
 * is reached (memfd: sendfile, with a read-only mapping for the tags; anonymous RAM:
 * process_vm_readv into a buffer), the per-page "sent once" map (Python's bytearray,
 * every claim made under this context's lock), the populated extents, the hint (the
 * end of the last demand request, for pre-paging) and the stop flag.
 */
#ifndef PC_DP_SEND_H
#define PC_DP_SEND_H

#include <stddef.h>
#include <stdint.h>

#include "frame_auth.h"

#define PC_DP_HEADER_BYTES 16
#define PC_DP_MAGIC 0x5043
#define PC_DP_PAGE_RUN 4
#define PC_DP_ZERO_RANGE 5
#define PC_DP_PAGE_REQUEST 6
#define PC_DP_MAX_RUN_BYTES (4u << 20)

/* Return codes (negative: -errno of a failed send or receive: the link is lost). */
#define PC_DP_DONE 0      /* every range of the batch is sent */
#define PC_DP_STOPPED 1   /* the stop flag was raised */
#define PC_DP_CLOSED 3    /* serve: the peer closed the channel */
#define PC_DP_FRAME 4     /* serve: the next frame is not a valid page request: Python decodes it */
#define PC_DP_SHORT_FILE 5 /* push: sendfile reached the end of the guest RAM file */

/* The request parser's verdicts. */
#define PC_DP_REQUEST_OK 1
#define PC_DP_REQUEST_MORE 0
#define PC_DP_REQUEST_OTHER (-1)

struct pc_dp_send;

/* One channel's send side, handed to C by the thread that holds the channel's send lock. */
struct pc_dp_link {
    int fd;
    struct pc_frame_auth *seal; /* NULL: frames go without tags */
    uint64_t seq;               /* in: the sealer's next sequence number; out: after the call */
    uint64_t bytes;             /* out: bytes written to the socket (added to) */
};

/* Counters, added to by each call (Python folds them into its report). */
struct pc_dp_counts {
    uint64_t pages_sent;  /* pages sent as data */
    uint64_t pages_zero;  /* pages announced as zero ranges */
    uint64_t requests;    /* serve: page requests answered */
    uint64_t held_back_ns; /* push: time the rate limit held the pusher back */
    uint64_t bytes_received; /* serve: bytes received */
};

/* A token bucket (bytes/s, 0: no limit), kept across calls. */
struct pc_dp_rate {
    double rate;
    double burst;
    double tokens;
    int64_t stamp_ns;
};

/* memfd >= 0: memfd RAM. Otherwise anonymous RAM of process pid at address base, read
 * with process_vm_readv (mem_fd, /proc/PID/mem, when that is refused), populated pages
 * found with pagemap_fd. For memfd RAM pagemap_fd (or -1) is the guest's mapping of it
 * at base: a page mapped there is data without asking the memfd (whose lseek waits
 * while the pusher's sweep holds its inode lock). sent points to npages bytes that
 * outlive the context. NULL on failure (errno set). */
struct pc_dp_send *pc_dp_send_new(int memfd, int mem_fd, int pagemap_fd, int pid, uint64_t base, uint64_t size,
                                  uint32_t page_size, uint8_t *sent, uint64_t npages);
void pc_dp_send_free(struct pc_dp_send *s);
/* The populated runs (first_page, npages pairs, sorted): copied, set once (RAM does not
 * change after the switchover). Returns 0, or -ENOMEM. */
int pc_dp_send_set_extents(struct pc_dp_send *s, const uint64_t *runs, size_t nruns);
/* RAM regions in pages ([start, end) pairs, sorted) that requests must lie inside. */
int pc_dp_send_set_regions(struct pc_dp_send *s, const uint64_t *regions, size_t nregions);
void pc_dp_send_stop(struct pc_dp_send *s, int stop);
/* From now on the demand server hands requests to Python (the session left the phases
 * that take them, e.g. the destination confirmed completion). */
void pc_dp_send_refuse_requests(struct pc_dp_send *s, int refuse);
/* The end page of the last demand request since the last call (or push's), or -1. */
int64_t pc_dp_send_take_hint(struct pc_dp_send *s);
/* Demand requests answered since the context was made (the pusher holds back until the
 * first: the destination's guest runs). */
uint64_t pc_dp_send_served(struct pc_dp_send *s);
/* Marks [first, end) sent (or unsent), under the claims' lock. */
void pc_dp_send_mark(struct pc_dp_send *s, uint64_t first, uint64_t end, uint8_t value);

/* Pushes the unsent pages of each [first, end) range (pairs) in order, as PAGE_RUN
 * frames of at most run_pages pages with this cause, and the unpopulated ones as
 * ZERO_RANGE frames. Claims pages in the sent map first. Between two runs, a demand
 * request's hint (prepage_min > 0) sends the unsent pages of its pre-paging window
 * first: the guest's next touches, right behind its fault. The window follows
 * readahead's rule: prepage_min pages, doubled (up to prepage_max) each time the guest
 * faults again within a window past the last one of the same stream (a sequential
 * toucher outrunning it); up to 8 streams are followed (one per streaming vCPU). Stops
 * between runs when the stop flag is raised (PC_DP_STOPPED). */
int pc_dp_push(struct pc_dp_send *s, struct pc_dp_link *link, const uint64_t *ranges, size_t nranges,
               uint32_t run_pages, uint32_t prepage_min, uint32_t prepage_max, uint8_t cause,
               struct pc_dp_rate *rate, struct pc_dp_counts *counts);

/* Parses the next frame of buf as an authenticated page request (verify may be NULL,
 * then no tag): PC_DP_REQUEST_OK with *first, *npages, *frame_bytes when it is one that
 * postcopy/protocol/decode.py accepts and its range lies inside the regions;
 * PC_DP_REQUEST_MORE when the bytes so far are the start of one; PC_DP_REQUEST_OTHER
 * for anything else (another frame, a bad tag, a range outside RAM: Python decodes it
 * and raises or dispatches as its decoder says). Does not advance *seq. */
int pc_dp_parse_request(const uint8_t *buf, size_t len, struct pc_frame_auth *verify, uint64_t seq,
                        const uint64_t *regions, size_t nregions, uint64_t *first, uint64_t *npages,
                        size_t *frame_bytes);

/* The demand server: receives on in_fd into buf (cap bytes, [*start, *end) already
 * buffered), answers each page request with DEMAND runs and zero ranges on link, marks
 * its pages sent and leaves the hint. Returns PC_DP_CLOSED, PC_DP_FRAME (the frame at
 * *start is Python's), or -errno; *recv_seq counts the requests verified. */
int pc_dp_serve(struct pc_dp_send *s, struct pc_dp_link *link, int in_fd, struct pc_frame_auth *verify,
                uint64_t *recv_seq, uint8_t *buf, size_t cap, size_t *start, size_t *end, uint32_t run_pages,
                struct pc_dp_counts *counts);

/* For other native components (not exposed to Python): writes every byte of iov[0..n)
 * on link (consuming iov), counting them in link->bytes; 0 or -errno. */
struct iovec;
int pc_dp_send_iov(struct pc_dp_link *link, struct iovec *iov, int n);

/* Header bytes (for the tests comparing C with the Python wire layer). */
void pc_dp_header(uint8_t *out, uint8_t type, uint8_t flags, uint32_t length, uint64_t arg);

#endif /* PC_DP_SEND_H */
