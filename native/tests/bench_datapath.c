/* bench_datapath: the native data path in-process, without FUSE (issue 13): what one request
 * costs the daemon apart from its FUSE round trip, encrypted against plain.
 * Usage: bench_datapath FILE_DIR   (a tmpfs directory; two 256 MiB files are made and removed)
 * Output, one line per case (MB = 10^6 bytes): "<what> <request bytes> <MB/s> <us/request>",
 * best of REPEAT bursts of BURST_MS on one thread: 1 MiB sequential writes and reads (a large
 * request splits over the helper thread unless VMFS_CRYPT_SPLIT=0) and 4 KiB random ones,
 * through vc_file_write / vc_file_read on an encrypted and on a plain file. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "datapath.h"

#define REPEAT 5
#define BURST_MS 200
#define FILE_BYTES ((uint64_t)256 << 20)

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t rnd_state = 88172645463325252ULL;

static uint64_t rnd(void)
{
    rnd_state ^= rnd_state << 13;
    rnd_state ^= rnd_state >> 7;
    rnd_state ^= rnd_state << 17;
    return rnd_state;
}

/* Best MB/s of REPEAT bursts; *us = microseconds per request at that rate. */
static double run(vc_file *f, int fd, int write, size_t req, int random, uint8_t *buf, double *us)
{
    double best = 0;
    const uint64_t slots = FILE_BYTES / req;
    uint64_t k = 0;
    for (int r = 0; r < REPEAT; r++) {
        uint64_t n = 0;
        const double t0 = now();
        double t = t0;
        while (t - t0 < BURST_MS / 1000.0) {
            for (int i = 0; i < 16; i++, n++, k++) {
                const int64_t off = (int64_t)((random ? rnd() % slots : k % slots) * req);
                const ssize_t got = write ? vc_file_write(f, fd, buf, req, off) : vc_file_read(f, fd, buf, req, off);
                if (got != (ssize_t)req) {
                    fprintf(stderr, "bench_datapath: request failed: %zd\n", got);
                    exit(1);
                }
            }
            t = now();
        }
        const double mbps = (double)n * (double)req / (t - t0) / 1e6;
        if (mbps > best)
            best = mbps;
    }
    *us = (double)req / best;
    return best;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: bench_datapath DIR\n");
        return 2;
    }
    uint8_t dek[64];
    for (int i = 0; i < 64; i++)
        dek[i] = (uint8_t)(rnd() >> 24);
    vc_xts *x = NULL;
    if (vc_xts_new(dek, &x) != 0)
        return 1;
    const size_t big = 1 << 20;
    uint8_t *buf = malloc(big);
    if (buf == NULL)
        return 1;
    for (size_t i = 0; i < big; i++)
        buf[i] = (uint8_t)rnd();
    static const char *const kinds[] = {"enc", "plain"};
    for (int e = 0; e < 2; e++) {
        char path[4200];
        snprintf(path, sizeof(path), "%s/bench-datapath-%s.bin", argv[1], kinds[e]);
        const int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0) {
            perror(path);
            return 1;
        }
        vc_file *f = NULL;
        if (vc_file_new(e == 0 ? x : NULL, kinds[e], &f) != 0)
            return 1;
        for (uint64_t off = 0; off < FILE_BYTES; off += big) /* written in full first */
            if (vc_file_write(f, fd, buf, big, (int64_t)off) != (ssize_t)big)
                return 1;
        double us = 0, mbps;
        mbps = run(f, fd, 1, big, 0, buf, &us);
        printf("%s-seqwrite %zu %.1f %.2f\n", kinds[e], big, mbps, us);
        mbps = run(f, fd, 0, big, 0, buf, &us);
        printf("%s-seqread %zu %.1f %.2f\n", kinds[e], big, mbps, us);
        mbps = run(f, fd, 1, 4096, 1, buf, &us);
        printf("%s-randwrite %d %.1f %.2f\n", kinds[e], 4096, mbps, us);
        mbps = run(f, fd, 0, 4096, 1, buf, &us);
        printf("%s-randread %d %.1f %.2f\n", kinds[e], 4096, mbps, us);
        vc_file_unref(f);
        if (close(fd) != 0 || unlink(path) != 0)
            return 1;
    }
    vc_xts_unref(x);
    free(buf);
    return 0;
}
