/* Minimal test harness for the native sources (no Python): checks, a PRNG, and an
 * independent per-sector reference built on EVP aes-256-xts (one data unit per sector). */
#ifndef VC_HARNESS_H
#define VC_HARNESS_H

#include <endian.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

static int harness_failures;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);     \
            if (++harness_failures > 20)                                                 \
                exit(1);                                                                 \
        }                                                                                \
    } while (0)

#define CHECK_EQ(a, b)                                                                   \
    do {                                                                                 \
        const long long ca_ = (long long)(a), cb_ = (long long)(b);                      \
        if (ca_ != cb_) {                                                                \
            fprintf(stderr, "%s:%d: CHECK_EQ failed: %s = %lld, %s = %lld\n", __FILE__, \
                    __LINE__, #a, ca_, #b, cb_);                                         \
            if (++harness_failures > 20)                                                 \
                exit(1);                                                                 \
        }                                                                                \
    } while (0)

/* xorshift64*: deterministic, thread-local state passed explicitly */
static inline uint64_t rnd_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * UINT64_C(0x2545F4914F6CDD1D);
}

static inline uint64_t rnd_below(uint64_t *s, uint64_t n)
{
    return n ? rnd_next(s) % n : 0;
}

static inline void rnd_fill(uint64_t *s, uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(rnd_next(s) >> 56);
}

/* One EVP XTS data unit; returns 0 on success. */
static inline int ref_unit(const uint8_t *dek, uint64_t unit, const uint8_t *in, uint8_t *out, int len, int enc)
{
    uint8_t iv[16] = {0};
    const uint64_t le = htole64(unit);
    int outl = 0, fin = 0, rc = -1;
    memcpy(iv, &le, 8);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (c != NULL && EVP_CipherInit_ex2(c, EVP_aes_256_xts(), dek, iv, enc, NULL) == 1 &&
        EVP_CipherUpdate(c, out, &outl, in, len) == 1 && outl == len && EVP_CipherFinal_ex(c, out + outl, &fin) == 1)
        rc = 0;
    EVP_CIPHER_CTX_free(c);
    return rc;
}

/* FORMAT.md section 3 sector by sector: whole and partial sectors, r < 16 by the XOR pad. */
static inline int ref_sectors(const uint8_t *dek, uint64_t first, const uint8_t *in, uint8_t *out, size_t len,
                              int enc)
{
    static const uint8_t zeros[16];
    for (size_t off = 0; off < len; off += 512) {
        const size_t n = len - off < 512 ? len - off : 512;
        const uint64_t unit = first + off / 512;
        if (n >= 16) {
            if (ref_unit(dek, unit, in + off, out + off, (int)n, enc) != 0)
                return -1;
        } else {
            uint8_t pad[16];
            if (ref_unit(dek, unit, zeros, pad, 16, 1) != 0)
                return -1;
            for (size_t k = 0; k < n; k++)
                out[off + k] = (uint8_t)(in[off + k] ^ pad[k]);
        }
    }
    return 0;
}

/* The plaintext a reader must see for a whole backing file (holes read as zeros). */
static inline int ref_plaintext(const uint8_t *dek, const uint8_t *backing, size_t len, uint8_t *out)
{
    for (size_t off = 0; off < len; off += 512) {
        const size_t n = len - off < 512 ? len - off : 512;
        int zero = 1;
        for (size_t k = 0; k < n && zero; k++)
            zero = backing[off + k] == 0;
        if (n >= 16 && zero)
            memset(out + off, 0, n);
        else if (ref_sectors(dek, off / 512, backing + off, out + off, n, 0) != 0)
            return -1;
    }
    return 0;
}

#endif
