/*
 * ckpt_floor: the C floor of one continuous-checkpointing epoch on this machine, the
 * baseline the checkpoint rate is a ratio to. What an epoch must do at minimum with the
 * pagemap-scan dirty log, and nothing else:
 *
 *   write N distinct random pages of a memfd region armed with async write-protect
 *   (UFFD_FEATURE_WP_ASYNC: the first write to a protected page takes a fault the kernel
 *   resolves itself) -> harvest them with PAGEMAP_SCAN (PM_SCAN_WP_MATCHING: reported
 *   and re-protected in one walk) -> copy them out -> send them over TCP (loopback) to
 *   a receiving thread that stages the whole epoch, applies it into its image and acks.
 *
 * As the checkpointer does, at most `window` epochs may be unacknowledged when the next
 * one starts (its max_unacked; 0: every epoch waits for its ack). The receiver keeps the
 * standby's exactness rule: an epoch reaches the image only once all of it arrived.
 */
#ifndef PC_CKPT_FLOOR_H
#define PC_CKPT_FLOOR_H

#include <stdint.h>

/* Sums over the epochs, in nanoseconds, of each part of the sender's epoch, and what
 * the run checked. */
struct pc_ckpt_floor_parts {
    uint64_t epochs;
    uint64_t write_ns;   /* writing the pages, write-protect faults included */
    uint64_t harvest_ns; /* PAGEMAP_SCAN: report + re-protect */
    uint64_t copy_ns;    /* the harvested pages gathered into the send buffer */
    uint64_t send_ns;    /* one writev of the epoch (header, runs, pages) */
    uint64_t ack_ns;     /* waiting for acks beyond the window */
    uint64_t total_ns;   /* first write of the first epoch to the last epoch's ack */
    uint64_t apply_ns;   /* receiver: staged epoch copied into the image */
    uint64_t pages_written, pages_found; /* totals over the epochs */
    uint64_t epochs_short;  /* epochs whose harvest found other pages than were written */
    int image_matches;      /* after the last ack: image == source, byte for byte */
};

/*
 * Runs `epochs` epochs of `dirty` distinct pages each (a fresh random affine permutation
 * of the region's pages per epoch, from seed) on a fresh memfd region of ram_bytes.
 * epoch_ns (epochs entries, may be NULL) receives each epoch's wall time (its first
 * write to the next epoch's first write; the last one to its ack). Returns 0, -EINVAL
 * for bad sizes, -EOPNOTSUPP when the kernel lacks async write-protect or PAGEMAP_SCAN,
 * or another -errno.
 */
int pc_ckpt_floor_run(uint64_t ram_bytes, uint32_t dirty, uint32_t epochs, uint32_t window, uint64_t seed,
                      uint64_t *epoch_ns, struct pc_ckpt_floor_parts *out);

#endif /* PC_CKPT_FLOOR_H */
