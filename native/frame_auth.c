/* frame_auth: per-frame AES-GMAC tags through libcrypto (see frame_auth.h). */
#include "frame_auth.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

/*
 * The few libcrypto (OpenSSL 3) entry points used, declared here so that building needs
 * only the shared library (libcrypto.so.3, present wherever Python's ssl module is),
 * not its development headers. Their ABI is stable across OpenSSL 3.x.
 */
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct engine_st ENGINE;
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
const EVP_CIPHER *EVP_aes_256_gcm(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, ENGINE *impl, const unsigned char *key,
                       const unsigned char *iv);
int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl);
int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr);
int CRYPTO_memcmp(const void *a, const void *b, size_t len);
#define PC_EVP_CTRL_GCM_GET_TAG 0x10

struct pc_frame_auth {
    EVP_CIPHER_CTX *evp;
};

struct pc_frame_auth *pc_frame_auth_new(const uint8_t *key)
{
    struct pc_frame_auth *ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return NULL;
    ctx->evp = EVP_CIPHER_CTX_new();
    /* The default 12-byte IV length is ours; the key schedule is computed once here. */
    if (!ctx->evp || EVP_EncryptInit_ex(ctx->evp, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
        pc_frame_auth_free(ctx);
        return NULL;
    }
    return ctx;
}

void pc_frame_auth_free(struct pc_frame_auth *ctx)
{
    if (!ctx)
        return;
    if (ctx->evp)
        EVP_CIPHER_CTX_free(ctx->evp);
    free(ctx);
}

/* Feeds len bytes as additional authenticated data, in pieces an int can count. */
static int aad(EVP_CIPHER_CTX *evp, const uint8_t *p, size_t len)
{
    int outl;
    while (len) {
        int n = len > (1u << 30) ? (1 << 30) : (int)len;
        if (EVP_EncryptUpdate(evp, NULL, &outl, p, n) != 1)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int pc_frame_auth_begin(struct pc_frame_auth *ctx, uint64_t seq, const uint8_t *a, size_t alen)
{
    uint8_t iv[12] = {0};
    for (int i = 0; i < 8; i++)
        iv[4 + i] = (uint8_t)(seq >> (56 - 8 * i));
    if (EVP_EncryptInit_ex(ctx->evp, NULL, NULL, NULL, iv) != 1)
        return -1;
    return aad(ctx->evp, a, alen);
}

int pc_frame_auth_update(struct pc_frame_auth *ctx, const uint8_t *p, size_t len)
{
    return aad(ctx->evp, p, len);
}

/* The tag of what begin and update fed. */
static int finish(struct pc_frame_auth *ctx, uint8_t *tag)
{
    int outl;
    if (EVP_EncryptFinal_ex(ctx->evp, NULL, &outl) != 1)
        return -1;
    if (EVP_CIPHER_CTX_ctrl(ctx->evp, PC_EVP_CTRL_GCM_GET_TAG, PC_AUTH_TAG_BYTES, tag) != 1)
        return -1;
    return 0;
}

int pc_frame_auth_end_check(struct pc_frame_auth *ctx, const uint8_t *tag)
{
    uint8_t expected[PC_AUTH_TAG_BYTES];
    if (finish(ctx, expected))
        return -1;
    return CRYPTO_memcmp(expected, tag, PC_AUTH_TAG_BYTES) ? 1 : 0;
}

int pc_frame_auth_tag(struct pc_frame_auth *ctx, uint64_t seq, const uint8_t *a, size_t alen,
                      const uint8_t *b, size_t blen, uint8_t *tag)
{
    if (pc_frame_auth_begin(ctx, seq, a, alen) || aad(ctx->evp, b, blen))
        return -1;
    return finish(ctx, tag);
}

int pc_frame_auth_check(struct pc_frame_auth *ctx, uint64_t seq, const uint8_t *a, size_t alen,
                        const uint8_t *b, size_t blen, const uint8_t *tag)
{
    uint8_t expected[PC_AUTH_TAG_BYTES];
    if (pc_frame_auth_tag(ctx, seq, a, alen, b, blen, expected))
        return -1;
    return CRYPTO_memcmp(expected, tag, PC_AUTH_TAG_BYTES) ? 1 : 0;
}

int64_t pc_frame_auth_bench(struct pc_frame_auth *ctx, const uint8_t *buf, size_t len, uint32_t rounds)
{
    struct timespec t0, t1;
    uint8_t tag[PC_AUTH_TAG_BYTES];
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    for (uint32_t i = 0; i < rounds; i++)
        if (pc_frame_auth_tag(ctx, i, buf, len, NULL, 0, tag))
            return -1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    return (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
}
