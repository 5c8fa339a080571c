/* test_xts_batch: the sector cipher against NIST CAVP and an independent per-sector EVP
 * reference; argument checks; threads sharing one key. Usage: test_xts_batch [XTSGenAES256.rsp] */
#define _GNU_SOURCE
#include "harness.h"

#include <errno.h>
#include <pthread.h>

#include "xts_batch.h"

static int unhex(const char *h, uint8_t *out, size_t max, size_t *n)
{
    size_t len = strlen(h);
    while (len && (h[len - 1] == '\n' || h[len - 1] == '\r' || h[len - 1] == ' '))
        len--;
    if (len % 2 || len / 2 > max)
        return -1;
    for (size_t i = 0; i < len / 2; i++) {
        unsigned v;
        if (sscanf(h + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    *n = len / 2;
    return 0;
}

/* Every whole-byte entry of XTSGenAES256.rsp (tweak = data unit sequence number). */
static int nist(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        perror(path);
        return -1;
    }
    char line[1024];
    int enc = 1, bits = 0, checked = 0;
    uint8_t key[64], pt[64], ct[64], out[64];
    size_t klen = 0, plen = 0, clen = 0;
    unsigned long long seq = 0;
    int have = 0;
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "[ENCRYPT]", 9) == 0)
            enc = 1;
        else if (strncmp(line, "[DECRYPT]", 9) == 0)
            enc = 0;
        else if (sscanf(line, "DataUnitLen = %d", &bits) == 1)
            have = 0;
        else if (strncmp(line, "Key = ", 6) == 0)
            CHECK(unhex(line + 6, key, sizeof(key), &klen) == 0 && klen == 64);
        else if (sscanf(line, "DataUnitSeqNumber = %llu", &seq) == 1)
            ;
        else if (strncmp(line, "PT = ", 5) == 0) {
            CHECK(unhex(line + 5, pt, sizeof(pt), &plen) == 0);
            have |= 1;
        } else if (strncmp(line, "CT = ", 5) == 0) {
            CHECK(unhex(line + 5, ct, sizeof(ct), &clen) == 0);
            have |= 2;
        }
        if (have == 3) {
            have = 0;
            if (bits % 8)
                continue; /* 140/250-bit units are not whole bytes */
            vc_xts *x = NULL;
            CHECK_EQ(vc_xts_new(key, &x), 0);
            if (enc) {
                CHECK_EQ(vc_xts_encrypt(x, seq, pt, out, plen), 0);
                CHECK(memcmp(out, ct, plen) == 0);
            } else {
                CHECK_EQ(vc_xts_decrypt(x, seq, ct, out, clen), 0);
                CHECK(memcmp(out, pt, clen) == 0);
            }
            vc_xts_unref(x);
            checked++;
        }
    }
    fclose(f);
    printf("NIST CAVP XTSGenAES256: %d whole-byte vectors\n", checked);
    CHECK_EQ(checked, 600);
    return 0;
}

static void random_vs_reference(void)
{
    uint64_t s = 0x1234567;
    const size_t max = 70 * 512 + 511;
    uint8_t *in = malloc(max), *out = malloc(max), *ref = malloc(max), *back = malloc(max);
    CHECK(in && out && ref && back);
    for (int iter = 0; iter < 1500; iter++) {
        uint8_t dek[64];
        rnd_fill(&s, dek, 64);
        vc_xts *x = NULL;
        CHECK_EQ(vc_xts_new(dek, &x), 0);
        size_t len;
        switch (iter % 4) {
        case 0: len = 1 + rnd_below(&s, max); break;
        case 1: len = 512 * rnd_below(&s, 6) + 1 + rnd_below(&s, 15); break;
        case 2: len = 512 * rnd_below(&s, 6) + 16 + rnd_below(&s, 496); break;
        default: len = 512 * (1 + rnd_below(&s, 70)); break;
        }
        const uint64_t units = (len + 511) / 512;
        uint64_t first;
        switch (rnd_below(&s, 4)) {
        case 0: first = 0; break;
        case 1: first = UINT64_MAX - units + 1; break; /* ends at sector 2^64-1 */
        case 2: first = (UINT64_C(1) << 32) - 1 - rnd_below(&s, 3); break;
        default: first = rnd_next(&s) >> 1; break;
        }
        rnd_fill(&s, in, len);
        CHECK_EQ(ref_sectors(dek, first, in, ref, len, 1), 0);
        CHECK_EQ(vc_xts_encrypt(x, first, in, out, len), 0);
        CHECK(memcmp(out, ref, len) == 0);
        CHECK_EQ(vc_xts_decrypt(x, first, out, back, len), 0);
        CHECK(memcmp(back, in, len) == 0);
        memcpy(back, in, len); /* in place */
        CHECK_EQ(vc_xts_encrypt(x, first, back, back, len), 0);
        CHECK(memcmp(back, ref, len) == 0);
        CHECK_EQ(vc_xts_decrypt(x, first, back, back, len), 0);
        CHECK(memcmp(back, in, len) == 0);
        vc_xts_unref(x);
    }
    free(in);
    free(out);
    free(ref);
    free(back);
}

static void argument_checks(void)
{
    uint8_t dek[64], buf[2048] = {0};
    for (int i = 0; i < 32; i++)
        dek[i] = dek[i + 32] = (uint8_t)i;
    vc_xts *x = (vc_xts *)1;
    CHECK_EQ(vc_xts_new(dek, &x), -EINVAL); /* K1 == K2 */
    CHECK(x == NULL);
    CHECK_EQ(vc_xts_new(NULL, &x), -EINVAL);
    dek[63] ^= 1;
    CHECK_EQ(vc_xts_new(dek, &x), 0);
    CHECK_EQ(vc_xts_encrypt(x, UINT64_MAX, buf, buf, 512), 0);
    CHECK_EQ(vc_xts_encrypt(x, UINT64_MAX, buf, buf, 513), -EINVAL);
    CHECK_EQ(vc_xts_encrypt(x, UINT64_MAX - 1, buf, buf, 1024), 0);
    CHECK_EQ(vc_xts_encrypt(x, UINT64_MAX - 1, buf, buf, 1025), -EINVAL);
    CHECK_EQ(vc_xts_decrypt(x, UINT64_MAX - 1, buf, buf, 1024 + 512), -EINVAL);
    CHECK_EQ(vc_xts_encrypt(x, UINT64_MAX, buf, buf, 0), 0); /* empty: nothing to check */
    CHECK_EQ(vc_xts_encrypt(x, 0, buf, buf + 16, 512), -EINVAL); /* partial overlap */
    CHECK_EQ(vc_xts_encrypt(x, 0, buf + 16, buf, 512), -EINVAL);
    CHECK_EQ(vc_xts_encrypt(x, 0, NULL, buf, 512), -EINVAL);
    CHECK_EQ(vc_xts_encrypt(NULL, 0, buf, buf, 512), -EINVAL);
    vc_xts_unref(x);
    vc_xts_unref(NULL);
    CHECK_EQ(vc_xts_selftest(), 0);
}

struct job {
    vc_xts *x;
    const uint8_t *dek;
    uint64_t seed;
    int bad;
};

static void *hammer(void *arg)
{
    struct job *j = arg;
    uint8_t in[9000], out[9000], ref[9000];
    uint64_t s = j->seed;
    for (int i = 0; i < 400; i++) {
        const size_t len = 1 + rnd_below(&s, sizeof(in));
        const uint64_t first = rnd_next(&s) >> 2;
        rnd_fill(&s, in, len);
        if (ref_sectors(j->dek, first, in, ref, len, 1) != 0 || vc_xts_encrypt(j->x, first, in, out, len) != 0 ||
            memcmp(out, ref, len) != 0 || vc_xts_decrypt(j->x, first, out, out, len) != 0 || memcmp(out, in, len) != 0)
            j->bad++;
    }
    return NULL;
}

static void threads(void)
{
    uint8_t dek[64];
    uint64_t s = 99;
    rnd_fill(&s, dek, 64);
    vc_xts *x = NULL;
    CHECK_EQ(vc_xts_new(dek, &x), 0);
    pthread_t t[8];
    struct job jobs[8];
    for (int i = 0; i < 8; i++) {
        jobs[i] = (struct job){x, dek, (uint64_t)i + 1, 0};
        CHECK_EQ(pthread_create(&t[i], NULL, hammer, &jobs[i]), 0);
    }
    for (int i = 0; i < 8; i++) {
        CHECK_EQ(pthread_join(t[i], NULL), 0);
        CHECK_EQ(jobs[i].bad, 0);
    }
    vc_xts_unref(x);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        CHECK_EQ(nist(argv[1]), 0);
    random_vs_reference();
    argument_checks();
    threads();
    if (harness_failures) {
        fprintf(stderr, "test_xts_batch: %d failures\n", harness_failures);
        return 1;
    }
    printf("test_xts_batch: ok (%s)\n", vc_xts_openssl_version());
    return 0;
}
