/* ckpt_frames: epoch control frames built and matched in C (see ckpt_frames.h). */
#include "ckpt_frames.h"

#include <string.h>

#include "dp_send.h"

static size_t put_u64(uint8_t *out, uint64_t v)
{
    char digits[20];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = (uint8_t)digits[n - 1 - i];
    return n;
}

static size_t put_str(uint8_t *out, const char *s)
{
    size_t n = strlen(s);
    memcpy(out, s, n);
    return n;
}

static size_t put_steps(uint8_t *out, const uint64_t *steps, uint32_t nsteps)
{
    size_t n = put_str(out, "\"steps\":[");
    for (uint32_t i = 0; i < nsteps; i++) {
        if (i)
            out[n++] = ',';
        n += put_u64(out + n, steps[i]);
    }
    out[n++] = ']';
    return n;
}

/* The header of a JSON frame whose payload of `len` bytes follows it. */
static size_t json_frame(uint8_t *out, uint8_t type, size_t len)
{
    pc_dp_header(out, type, 0, (uint32_t)len, 0);
    return PC_DP_HEADER_BYTES + len;
}

size_t pc_ckpt_begin_frame(uint8_t *out, uint64_t epoch)
{
    pc_dp_header(out, PC_CKPT_EPOCH_BEGIN, 0, 0, epoch);
    return PC_DP_HEADER_BYTES;
}

size_t pc_ckpt_commit_frame(uint8_t *out, uint64_t epoch, uint64_t pages, uint64_t runs, const uint64_t *steps,
                            uint32_t nsteps, uint64_t paused_ns)
{
    uint8_t *p = out + PC_DP_HEADER_BYTES;
    size_t n = put_str(p, "{\"epoch\":");
    n += put_u64(p + n, epoch);
    n += put_str(p + n, ",\"pages\":");
    n += put_u64(p + n, pages);
    n += put_str(p + n, ",\"runs\":");
    n += put_u64(p + n, runs);
    p[n++] = ',';
    n += put_steps(p + n, steps, nsteps);
    n += put_str(p + n, ",\"paused_ns\":");
    n += put_u64(p + n, paused_ns);
    p[n++] = '}';
    return json_frame(out, PC_CKPT_EPOCH_COMMIT, n);
}

size_t pc_ckpt_ack_frame(uint8_t *out, uint64_t epoch, const uint64_t *steps, uint32_t nsteps)
{
    uint8_t *p = out + PC_DP_HEADER_BYTES;
    size_t n = put_str(p, "{\"epoch\":");
    n += put_u64(p + n, epoch);
    p[n++] = ',';
    n += put_steps(p + n, steps, nsteps);
    p[n++] = '}';
    return json_frame(out, PC_CKPT_EPOCH_ACK, n);
}

/* -- strict parsing: read the values, then compare with what they encode to ---------- */

struct cursor {
    const uint8_t *p, *end;
};

static int lit(struct cursor *c, const char *s)
{
    size_t n = strlen(s);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, s, n))
        return -1;
    c->p += n;
    return 0;
}

static int num(struct cursor *c, uint64_t *v)
{
    uint64_t x = 0;
    int digits = 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        if (++digits > 19 && x > (UINT64_MAX - (uint64_t)(*c->p - '0')) / 10)
            return -1; /* beyond 64 bits: Python's to judge */
        x = x * 10 + (uint64_t)(*c->p++ - '0');
    }
    *v = x;
    return digits ? 0 : -1;
}

int pc_ckpt_parse_commit(const uint8_t *payload, size_t len, struct pc_ckpt_commit *out)
{
    struct cursor c = {payload, payload + len};
    if (len > PC_CKPT_FRAME_MAX - PC_DP_HEADER_BYTES || lit(&c, "{\"epoch\":") || num(&c, &out->epoch)
        || lit(&c, ",\"pages\":") || num(&c, &out->pages) || lit(&c, ",\"runs\":") || num(&c, &out->runs)
        || lit(&c, ",\"steps\":["))
        return -1;
    out->nsteps = 0;
    if (lit(&c, "]")) {
        do {
            if (out->nsteps == PC_GUEST_MAX_THREADS || num(&c, &out->steps[out->nsteps++]))
                return -1;
        } while (!lit(&c, ","));
        if (lit(&c, "]"))
            return -1;
    }
    if (lit(&c, ",\"paused_ns\":") || num(&c, &out->paused_ns) || lit(&c, "}") || c.p != c.end)
        return -1;
    /* Leading zeros and the like: only the canonical spelling is taken here. */
    uint8_t frame[PC_CKPT_FRAME_MAX];
    size_t n = pc_ckpt_commit_frame(frame, out->epoch, out->pages, out->runs, out->steps, out->nsteps,
                                    out->paused_ns);
    return n - PC_DP_HEADER_BYTES == len && !memcmp(frame + PC_DP_HEADER_BYTES, payload, len) ? 0 : -1;
}

int pc_ckpt_match(const uint8_t *buf, size_t have, const uint8_t *frame, size_t len, struct pc_frame_auth *verify,
                  uint64_t seq, size_t *used)
{
    const size_t head = PC_DP_HEADER_BYTES;
    if (have < head) {
        *used = head;
        return 0;
    }
    if (memcmp(buf, frame, head))
        return -1;
    *used = len + (verify ? PC_AUTH_TAG_BYTES : 0);
    if (have < *used)
        return 0;
    if (memcmp(buf + head, frame + head, len - head))
        return -1;
    if (verify && pc_frame_auth_check(verify, seq, buf, head, buf + head, len - head, buf + len))
        return -1; /* Python's verifier says why */
    return 1;
}
