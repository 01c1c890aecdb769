/*
 * frame_auth: the per-frame authentication tag of the postcopy wire protocol.
 *
 * AES-256-GCM with no plaintext (that is GMAC) from OpenSSL's libcrypto, which uses
 * AES-NI and carry-less multiplication (PCLMUL/VPCLMULQDQ) where the CPU has them.
 * One context per direction of one channel, holding that direction's key. The 96-bit
 * nonce is 4 zero bytes then the frame's 64-bit sequence number (big endian), so a
 * nonce is never reused under one key; the authenticated data is the frame header and
 * its payload, in up to two pieces (no copy to join them).
 *
 * cffi releases the GIL around these calls. A context is not thread safe: its owner
 * serialises its use (the channel's send lock, or its single receiving thread).
 */
#ifndef PC_FRAME_AUTH_H
#define PC_FRAME_AUTH_H

#include <stddef.h>
#include <stdint.h>

#define PC_AUTH_KEY_BYTES 32
#define PC_AUTH_TAG_BYTES 16

struct pc_frame_auth;

/* A context for one direction's 32-byte key, or NULL (out of memory, libcrypto error). */
struct pc_frame_auth *pc_frame_auth_new(const uint8_t *key);
void pc_frame_auth_free(struct pc_frame_auth *ctx);

/* Writes the 16-byte tag of (seq, a || b) to tag. Returns 0, or -1 on a libcrypto error. */
int pc_frame_auth_tag(struct pc_frame_auth *ctx, uint64_t seq, const uint8_t *a, size_t alen,
                      const uint8_t *b, size_t blen, uint8_t *tag);

/* 0 if tag is the tag of (seq, a || b) (compared in constant time), 1 if not, -1 on a
 * libcrypto error. */
int pc_frame_auth_check(struct pc_frame_auth *ctx, uint64_t seq, const uint8_t *a, size_t alen,
                        const uint8_t *b, size_t blen, const uint8_t *tag);

/* The tag of one frame computed piece by piece, for bytes that arrive in pieces (a
 * page run received straight into place): begin with the header, update with each
 * piece of payload in order, then end_check with the received tag (0 authentic, 1 not,
 * -1 on a libcrypto error; so does begin and update return -1 on an error, else 0). */
int pc_frame_auth_begin(struct pc_frame_auth *ctx, uint64_t seq, const uint8_t *a, size_t alen);
int pc_frame_auth_update(struct pc_frame_auth *ctx, const uint8_t *p, size_t len);
int pc_frame_auth_end_check(struct pc_frame_auth *ctx, const uint8_t *tag);

/* Tags `rounds` times a buffer of len bytes (seq 0, 1, ...): CPU nanoseconds of this thread, or -1.
 * The MAC's own speed, for the bench's comparison with HMAC-SHA256. */
int64_t pc_frame_auth_bench(struct pc_frame_auth *ctx, const uint8_t *buf, size_t len, uint32_t rounds);

#endif /* PC_FRAME_AUTH_H */
