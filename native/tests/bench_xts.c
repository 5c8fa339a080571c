/* bench_xts: the sector cipher vs one OpenSSL XTS data unit per call, in C (no Python, no
 * GIL), 1 and 2 threads, 4 KiB and 64 KiB calls.
 * Output, one line per case (MB = 10^6 bytes):
 *   "<what> <bytes> <threads> <MB/s>"         best of REPEAT bursts of BURST_MS, all threads
 *   "minlat <what> <bytes> <threads> <MB/s>"  from the fastest single call of each thread
 *     (per thread; with 2 threads both run at once): preemption by other tenants can only
 *     make a call slower, so on a shared machine this is the stable figure. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>

#include "xts_batch.h"

#define REPEAT 7
#define BURST_MS 150

static vc_xts *key;
static uint8_t dek[64];
static size_t size;
static int mode; /* 0 native sector cipher, 1 EVP one data unit */
static pthread_barrier_t barrier;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int minlat; /* 1: report the fastest call instead of the burst throughput */

static double ns_now(void)
{
    return now() * 1e9;
}

static void *work(void *arg)
{
    double *out = arg;
    uint8_t *buf = aligned_alloc(64, 65536);
    uint8_t iv[16] = {0};
    int outl = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (buf == NULL || c == NULL || EVP_EncryptInit_ex2(c, EVP_aes_256_xts(), dek, iv, NULL) != 1)
        abort();
    memset(buf, 0x5a, 65536);
    pthread_barrier_wait(&barrier);
    const double t0 = now(), end = t0 + BURST_MS / 1000.0;
    size_t n = 0;
    double fastest = 1e30;
    while (now() < end)
        for (int i = 0; i < 16; i++, n++) {
            const double c0 = minlat ? ns_now() : 0;
            if (mode ? EVP_EncryptUpdate(c, buf, &outl, buf, (int)size) != 1
                     : vc_xts_encrypt(key, 4242, buf, buf, size) != 0)
                abort();
            if (minlat) {
                const double dt = ns_now() - c0;
                if (dt < fastest)
                    fastest = dt;
            }
        }
    *out = minlat ? (double)size / fastest * 1e3 : (double)n * (double)size / (now() - t0) / 1e6;
    EVP_CIPHER_CTX_free(c);
    free(buf);
    return NULL;
}

int main(void)
{
    for (int i = 0; i < 64; i++)
        dek[i] = (uint8_t)(i * 5 + 3);
    if (vc_xts_new(dek, &key) != 0)
        return 1;
    const size_t sizes[] = {4096, 65536};
    for (minlat = 0; minlat <= 1; minlat++)
    for (int m = 0; m < 2; m++)
        for (int s = 0; s < 2; s++)
            for (int threads = 1; threads <= 2; threads++) {
                mode = m;
                size = sizes[s];
                double best = 0;
                for (int r = 0; r < REPEAT; r++) {
                    pthread_t t[2];
                    double got[2] = {0, 0};
                    pthread_barrier_init(&barrier, NULL, (unsigned)threads);
                    for (int k = 0; k < threads; k++)
                        pthread_create(&t[k], NULL, work, &got[k]);
                    for (int k = 0; k < threads; k++)
                        pthread_join(t[k], NULL);
                    pthread_barrier_destroy(&barrier);
                    const double v = minlat ? (threads == 2 ? (got[0] < got[1] ? got[0] : got[1]) : got[0])
                                            : got[0] + got[1];
                    if (v > best)
                        best = v;
                }
                printf("%s%s %zu %d %.0f\n", minlat ? "minlat " : "", m ? "evp-xts-one-unit" : "native-sector-cipher",
                       size, threads, best);
            }
    vc_xts_unref(key);
    return 0;
}
