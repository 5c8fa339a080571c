/* test_datapath: the native data path on real files in a temporary directory.
 *   - a random model: writes/reads at random offsets and sizes (sector edges, tails < 16,
 *     sparse growth, zero data) against an in-memory plaintext, and the whole backing file
 *     decrypted independently (per-sector EVP XTS, holes read as zeros) after each write;
 *   - short writes at byte granularity (RLIMIT_FSIZE): only complete sectors acknowledged,
 *     the file left well-formed, torn edge sectors restored;
 *   - plain passthrough, revoked files, lock misuse, handle table churn, threads, log hook.
 * Usage: test_datapath [DIR] (default: a new directory under $TMPDIR or /tmp). */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#include "harness.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "datapath.h"
#include "fuse_entry.h"

static char dir[4096];
static int logged;
static char last_log[1024];

static void log_hook(const char *msg)
{
    logged++;
    snprintf(last_log, sizeof(last_log), "%s", msg);
}

static int open_file(const char *name)
{
    char path[8192];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    const int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    CHECK(fd >= 0);
    return fd;
}

static size_t backing(int fd, uint8_t **buf)
{
    struct stat st;
    CHECK(fstat(fd, &st) == 0);
    const size_t n = (size_t)st.st_size;
    *buf = malloc(n + 1);
    CHECK(*buf != NULL);
    CHECK((size_t)pread(fd, *buf, n, 0) == n);
    return n;
}

/* The backing file decrypts to exactly `model` of length `len`. */
static void check_backing(const uint8_t *dek, int fd, const uint8_t *model, size_t len)
{
    uint8_t *b = NULL;
    const size_t n = backing(fd, &b);
    CHECK_EQ(n, len);
    uint8_t *pt = malloc(n + 1);
    CHECK(pt != NULL);
    CHECK_EQ(ref_plaintext(dek, b, n, pt), 0);
    CHECK(memcmp(pt, model, n) == 0);
    free(pt);
    free(b);
}

#define MODEL_MAX (3u << 20)

static void model_test(uint64_t seed, int ops)
{
    uint64_t s = seed;
    uint8_t dek[64];
    rnd_fill(&s, dek, 64);
    vc_xts *x = NULL;
    vc_file *f = NULL;
    CHECK_EQ(vc_xts_new(dek, &x), 0);
    CHECK_EQ(vc_file_new(x, "model/disk-flat.vmdk", &f), 0);
    vc_xts_unref(x); /* the file state keeps its own reference */
    const int fd = open_file("model.bin");
    uint8_t *model = calloc(1, MODEL_MAX + 70000), *data = malloc(70000), *got = malloc(70000);
    CHECK(model && data && got);
    size_t size = 0;
    for (int i = 0; i < ops; i++) {
        uint64_t off;
        switch (rnd_below(&s, 5)) {
        case 0: off = rnd_below(&s, size + 1024); break;
        case 1: off = rnd_below(&s, size / 512 + 2) * 512 + rnd_below(&s, 35); off = off > 17 ? off - 17 : 0; break;
        case 2: off = size + rnd_below(&s, 1200); off = off > 600 ? off - 600 : 0; break;
        case 3: off = rnd_below(&s, 256 * 1024); break;
        default: off = rnd_below(&s, 16) == 0 ? rnd_below(&s, MODEL_MAX - 70000) : rnd_below(&s, 64 * 1024); break;
        }
        if (off > MODEL_MAX)
            off %= MODEL_MAX; /* the model buffer holds MODEL_MAX + 70000 bytes */
        size_t n;
        switch (rnd_below(&s, 4)) {
        case 0: n = 1 + rnd_below(&s, 16); break;
        case 1: n = 1 + rnd_below(&s, 1200); break;
        case 2: n = 512u << rnd_below(&s, 5); n = n - 16 + rnd_below(&s, 33); break;
        default: n = 1 + rnd_below(&s, 70000); break;
        }
        if (rnd_below(&s, 2) == 0) {
            if (rnd_below(&s, 6) == 0)
                memset(data, 0, n);
            else
                rnd_fill(&s, data, n);
            CHECK_EQ(vc_file_write(f, fd, data, n, (int64_t)off), (long long)n);
            memcpy(model + off, data, n);
            if (off + n > size)
                size = off + n;
            if (i % 16 == 0)
                check_backing(dek, fd, model, size);
        } else {
            const ssize_t r = vc_file_read(f, fd, got, n, (int64_t)off);
            const size_t want = off >= size ? 0 : (size - off < n ? size - off : n);
            CHECK_EQ(r, (long long)want);
            CHECK(memcmp(got, model + off, want) == 0);
        }
    }
    check_backing(dek, fd, model, size);
    CHECK_EQ(vc_file_read(f, fd, got, 10, -1), -EINVAL);
    CHECK_EQ(vc_file_write(f, fd, got, 10, -1), -EINVAL);
    CHECK_EQ(vc_file_write(f, fd, got, 10, INT64_MAX - 5), -EFBIG);
    CHECK_EQ(vc_file_write(f, fd, got, 0, 5), 0);
    free(model);
    free(data);
    free(got);
    CHECK(close(fd) == 0);
    vc_file_unref(f);
}

/* Writes crossing RLIMIT_FSIZE are cut at that byte. */
static void short_writes(void)
{
    struct rlimit saved;
    CHECK(getrlimit(RLIMIT_FSIZE, &saved) == 0);
    CHECK(signal(SIGXFSZ, SIG_IGN) != SIG_ERR);
    uint64_t s = 7;
    uint8_t dek[64], data[9000], before[70000], after[70000], model[70000];
    rnd_fill(&s, dek, 64);
    vc_xts *x = NULL;
    CHECK_EQ(vc_xts_new(dek, &x), 0);
    for (int round = 0; round < 300; round++) {
        vc_file *f = NULL;
        CHECK_EQ(vc_file_new(x, "short", &f), 0);
        const int fd = open_file("short.bin");
        const size_t old = 512 * rnd_below(&s, 40) + rnd_below(&s, 3) * rnd_below(&s, 512);
        rnd_fill(&s, model, old);
        if (old)
            CHECK_EQ(vc_file_write(f, fd, model, old, 0), (long long)old);
        const size_t n = 1 + rnd_below(&s, sizeof(data));
        const uint64_t off = rnd_below(&s, old + 3000);
        const uint64_t limit = off + rnd_below(&s, n + 1100);
        rnd_fill(&s, data, n);
        CHECK_EQ((long long)pread(fd, before, old, 0), (long long)old);
        struct rlimit lim = {.rlim_cur = limit, .rlim_max = saved.rlim_max};
        CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
        const ssize_t r = vc_file_write(f, fd, data, n, (int64_t)off);
        CHECK(setrlimit(RLIMIT_FSIZE, &saved) == 0);
        struct stat st;
        CHECK(fstat(fd, &st) == 0);
        if (r < 0) {
            CHECK(r == -EFBIG);
            /* nothing acknowledged: the file is as before, unless a torn interior sector
             * was punched (logged) */
            CHECK_EQ(st.st_size, (long long)old);
            CHECK_EQ((long long)pread(fd, after, old, 0), (long long)old);
            if (memcmp(after, before, old) != 0)
                CHECK(logged > 0);
        } else {
            CHECK(r > 0 && (size_t)r <= n);
            if ((size_t)r < n)
                CHECK_EQ((off + (uint64_t)r) % 512, 0);
            memcpy(model + off, data, (size_t)r);
            const size_t want_size = off + (size_t)r > old ? off + (size_t)r : old;
            if (off > old)
                memset(model + old, 0, off - old);
            CHECK_EQ(st.st_size, (long long)want_size);
            /* acknowledged bytes read back; the file decrypts to the model except for a
             * torn interior sector punched to zeros (only when a fault was logged) */
            uint8_t *b = NULL;
            const size_t bn = backing(fd, &b);
            uint8_t *pt = malloc(bn + 1);
            CHECK(pt != NULL && ref_plaintext(dek, b, bn, pt) == 0);
            CHECK(memcmp(pt + off, data, (size_t)r) == 0);
            if (memcmp(pt, model, bn) != 0) {
                CHECK(logged > 0);
                const uint64_t torn = (off + (uint64_t)r) / 512 * 512;
                CHECK(memcmp(pt, model, (size_t)torn) == 0);
            }
            free(pt);
            free(b);
        }
        logged = 0;
        CHECK(close(fd) == 0);
        vc_file_unref(f);
    }
    vc_xts_unref(x);
}

static void plain_and_revoked(void)
{
    vc_file *p = NULL;
    CHECK_EQ(vc_file_new(NULL, "plain.txt", &p), 0);
    CHECK(vc_file_cipher(p) == NULL);
    const int fd = open_file("plain.txt");
    char buf[64];
    CHECK_EQ(vc_file_write(p, fd, "hello plain", 11, 3), 11);
    CHECK_EQ(vc_file_read(p, fd, buf, sizeof(buf), 0), 14);
    CHECK(memcmp(buf, "\0\0\0hello plain", 14) == 0);
    vc_file_set_revoked(p, 1);
    CHECK_EQ(vc_file_read(p, fd, buf, 4, 0), -EACCES);
    CHECK_EQ(vc_file_write(p, fd, buf, 4, 0), -EACCES);
    vc_file_set_revoked(p, 0);
    CHECK_EQ(vc_file_unlock_read(p), -EPERM);
    CHECK_EQ(vc_file_unlock_write(p), -EPERM);
    vc_file_lock_read(p);
    vc_file_lock_read(p);
    CHECK_EQ(vc_file_unlock_read(p), 0);
    CHECK_EQ(vc_file_unlock_read(p), 0);
    vc_file_lock_write(p);
    CHECK_EQ(vc_file_unlock_write(p), 0);
    CHECK_EQ(vc_file_set_name(p, "renamed.txt"), 0);
    char name[8];
    CHECK_EQ(vc_file_name(p, name, sizeof(name)), 11);
    CHECK(strcmp(name, "renamed") == 0); /* truncated copy */
    CHECK(close(fd) == 0);
    vc_file_unref(p);
}

static void handles_and_entries(void)
{
    uint8_t dek[64];
    uint64_t s = 3;
    rnd_fill(&s, dek, 64);
    vc_xts *x = NULL;
    vc_file *f = NULL;
    CHECK_EQ(vc_xts_new(dek, &x), 0);
    CHECK_EQ(vc_file_new(x, "h", &f), 0);
    vc_xts_unref(x);
    const int fd = open_file("h.bin");
    for (uint64_t fh = 1; fh <= 500; fh++) /* grows the table several times */
        CHECK_EQ(vc_register(fh * 7919, fd, f), 0);
    CHECK_EQ(vc_register(7919, fd, f), -EEXIST);
    CHECK_EQ(vc_register(1, -1, f), -EBADF);
    CHECK_EQ(vc_register(1, 100000, f), -EBADF);
    CHECK(close(fd) == 0); /* the table holds duplicates */
    char buf[600];
    memset(buf, 'w', sizeof(buf));
    uintptr_t nr = 0, nw = 0;
    CHECK_EQ(vc_fuse_install(3, 0, 0, &nr, &nw), 0);
    CHECK_EQ(vc_fuse_install(3, nr, 0, &nr, &nw), -EINVAL);
    CHECK_EQ(vc_fuse_install(4, 0, 0, &nr, &nw), -EINVAL);
    CHECK_EQ(vc_fuse_call_write(3, "/h", 7919 * 3, buf, sizeof(buf), 100), (int)sizeof(buf));
    CHECK_EQ(vc_fuse_call_write(2, "/h", 7919 * 4, buf, sizeof(buf), 1000), (int)sizeof(buf));
    char back[2000];
    CHECK_EQ(vc_fuse_call_read(3, "/h", 7919 * 5, back, sizeof(back), 0), 1600);
    CHECK(memcmp(back + 100, buf, sizeof(buf)) == 0 && memcmp(back + 1000, buf, sizeof(buf)) == 0);
    CHECK_EQ(vc_fuse_call_read(3, "/h", 12345, back, 10, 0), -EBADF); /* not registered, no fallback */
    struct vc_stats st;
    vc_stats_get(&st);
    CHECK(st.reads >= 1 && st.writes >= 2 && st.fallback_reads >= 1);
    for (uint64_t fh = 1; fh <= 500; fh++)
        CHECK_EQ(vc_unregister(fh * 7919), 0);
    CHECK_EQ(vc_unregister(7919), -ENOENT);
    vc_file_unref(f);
}

struct tjob {
    vc_file *f;
    int fd, id, bad;
};

/* Each sector: 64 copies of (writer, sector, seq); a read must never see a mixed sector. */
static void *worker(void *arg)
{
    struct tjob *j = arg;
    uint64_t s = (uint64_t)j->id * 1000 + 1;
    uint8_t buf[16 * 512];
    for (int i = 0; i < 3000; i++) {
        const uint64_t first = rnd_below(&s, 48), count = 1 + rnd_below(&s, 16);
        if (j->id < 3) {
            for (uint64_t k = 0; k < count; k++)
                for (int w = 0; w < 64; w++) {
                    const uint64_t tag = ((uint64_t)j->id << 48) | ((first + k) << 32) | (uint64_t)i;
                    memcpy(buf + k * 512 + (uint64_t)w * 8, &tag, 8);
                }
            if (vc_file_write(j->f, j->fd, buf, count * 512, (int64_t)(first * 512)) != (ssize_t)(count * 512))
                j->bad++;
        } else {
            if (vc_file_read(j->f, j->fd, buf, count * 512, (int64_t)(first * 512)) != (ssize_t)(count * 512)) {
                j->bad++;
                continue;
            }
            for (uint64_t k = 0; k < count; k++) {
                uint64_t t0;
                memcpy(&t0, buf + k * 512, 8);
                if (((t0 >> 32) & 0xffff) != first + k)
                    j->bad++;
                for (int w = 1; w < 64; w++)
                    if (memcmp(buf + k * 512 + w * 8, &t0, 8) != 0) {
                        j->bad++;
                        break;
                    }
            }
        }
    }
    return NULL;
}

/* An encrypted file state under a DEK drawn from `seed` (*x: its cipher, one reference). */
static vc_file *encrypted_state(uint64_t seed, const char *name, vc_xts **x)
{
    uint8_t dek[64];
    rnd_fill(&seed, dek, 64);
    vc_file *f = NULL;
    CHECK_EQ(vc_xts_new(dek, x), 0);
    CHECK_EQ(vc_file_new(*x, name, &f), 0);
    return f;
}

static void threads(void)
{
    vc_xts *x = NULL;
    vc_file *f = encrypted_state(11, "t", &x);
    vc_xts_unref(x);
    const int fd = open_file("t.bin");
    uint8_t init[64 * 512];
    for (uint64_t k = 0; k < 64; k++)
        for (int w = 0; w < 64; w++) {
            const uint64_t tag = k << 32;
            memcpy(init + k * 512 + (uint64_t)w * 8, &tag, 8);
        }
    CHECK_EQ(vc_file_write(f, fd, init, sizeof(init), 0), (long long)sizeof(init));
    pthread_t t[6];
    struct tjob jobs[6];
    for (int i = 0; i < 6; i++) {
        jobs[i] = (struct tjob){f, fd, i, 0};
        CHECK_EQ(pthread_create(&t[i], NULL, worker, &jobs[i]), 0);
    }
    for (int i = 0; i < 6; i++) {
        CHECK_EQ(pthread_join(t[i], NULL), 0);
        CHECK_EQ(jobs[i].bad, 0);
    }
    CHECK(close(fd) == 0);
    vc_file_unref(f);
}

static void data_fault_logged(void)
{
    const char *sysfs = "/sys/kernel/mm/transparent_hugepage/enabled"; /* st_size 4096, fewer bytes */
    const int fd = open(sysfs, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        printf("  (no %s: data fault check skipped)\n", sysfs);
        return;
    }
    uint8_t dek[64];
    for (int i = 0; i < 64; i++)
        dek[i] = (uint8_t)i;
    vc_xts *x = NULL;
    vc_file *f = NULL;
    CHECK_EQ(vc_xts_new(dek, &x), 0);
    CHECK_EQ(vc_file_new(x, "vm/broken-flat.vmdk", &f), 0);
    vc_xts_unref(x);
    char buf[512];
    logged = 0;
    CHECK_EQ(vc_file_read(f, fd, buf, 512, 0), -EIO);
    CHECK_EQ(logged, 1);
    CHECK(strstr(last_log, "vm/broken-flat.vmdk: read at byte 0 (sector 0) failed: short read at sector 0") ==
          last_log);
    CHECK(close(fd) == 0);
    vc_file_unref(f);
}

struct hot_job {
    vc_file *f;
    int fd;
    uint64_t off;
    _Atomic int done;
    ssize_t got;
    char buf[512];
};

static void *hot_reader(void *arg)
{
    struct hot_job *j = arg;
    j->got = vc_file_read(j->f, j->fd, j->buf, sizeof(j->buf), (int64_t)j->off);
    atomic_store(&j->done, 1);
    return NULL;
}

/* The hot zone of an online re-encryption (issue 10): I/O touching it waits, the rest goes on. */
static void hot_zone(void)
{
    vc_file *p = NULL;
    CHECK_EQ(vc_file_new(NULL, "hot.bin", &p), 0);
    const int fd = open_file("hot.bin");
    char page[4096];
    memset(page, 'h', sizeof(page));
    CHECK_EQ(vc_file_write(p, fd, page, sizeof(page), 0), 4096);
    CHECK_EQ(vc_file_set_hot(p, 1024, 1536), -EPERM); /* only under the write lock */
    vc_file_lock_write(p);
    CHECK_EQ(vc_file_set_hot(p, 1536, 1536), -EINVAL);
    CHECK_EQ(vc_file_set_hot(p, 100, 2048), -EINVAL);
    CHECK_EQ(vc_file_set_hot(p, 1024, 1536), 0);
    CHECK_EQ(vc_file_unlock_write(p), 0);
    char buf[512];
    CHECK_EQ(vc_file_read(p, fd, buf, 512, 1536), 512); /* outside: served */
    CHECK_EQ(vc_file_write(p, fd, buf, 512, 0), 512);
    struct hot_job j = {.f = p, .fd = fd, .off = 1200};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, hot_reader, &j), 0);
    struct timespec look = {0, 200 * 1000 * 1000};
    CHECK(nanosleep(&look, NULL) == 0); /* a bounded look: the read into the zone must still wait */
    CHECK_EQ(atomic_load(&j.done), 0);
    vc_file_lock_write(p); /* the operation's own lock ignores the zone */
    CHECK_EQ(vc_file_clear_hot(p), 0);
    CHECK_EQ(vc_file_unlock_write(p), 0);
    CHECK_EQ(pthread_join(t, NULL), 0);
    CHECK_EQ(j.got, 512);
    CHECK(memcmp(j.buf, page, 512) == 0);
    CHECK_EQ(vc_file_clear_hot(p), -EPERM);
    CHECK(close(fd) == 0);
    vc_file_unref(p);
}

/* A thread that takes a lock and says so. */
struct span_job {
    vc_file *f;
    uint64_t off, size;
    int kind; /* 0 shared span, 1 exclusive span, 2 whole-file write, 3 whole-file read */
    _Atomic int done;
};

static void *span_taker(void *arg)
{
    struct span_job *j = arg;
    if (j->kind == 2) {
        vc_file_lock_write(j->f);
        CHECK_EQ(vc_file_unlock_write(j->f), 0);
    } else if (j->kind == 3) {
        vc_file_lock_read(j->f);
        CHECK_EQ(vc_file_unlock_read(j->f), 0);
    } else {
        const int slot = vc_file_lock_sectors(j->f, j->off, j->size, j->kind);
        CHECK(slot >= 0);
        CHECK_EQ(vc_file_unlock_sectors(j->f, slot), 0);
    }
    atomic_store(&j->done, 1);
    return NULL;
}

/* Starts a taker, checks it is still waiting after a bounded look, returns its thread. */
static pthread_t waits(struct span_job *j)
{
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, span_taker, j), 0);
    struct timespec look = {0, 150 * 1000 * 1000};
    CHECK(nanosleep(&look, NULL) == 0); /* a bounded look: it must still wait */
    CHECK_EQ(atomic_load(&j->done), 0);
    return t;
}

/* Sector spans (issue 13): disjoint ones go together, overlapping exclusive ones wait,
 * the whole-file locks wait for the spans that conflict with them. */
static void sector_spans(void)
{
    vc_file *p = NULL;
    CHECK_EQ(vc_file_new(NULL, "spans.bin", &p), 0);
    /* one thread holds two disjoint exclusive spans and a shared one beside them */
    const int a = vc_file_lock_sectors(p, 0, 4096, 1);
    const int b = vc_file_lock_sectors(p, 4096, 4096, 1);
    const int c = vc_file_lock_sectors(p, 1 << 20, 512, 0);
    CHECK(a >= 0 && b >= 0 && c >= 0 && a != b && b != c);
    CHECK_EQ(vc_file_unlock_sectors(p, 7 + a + b + c), -EPERM);
    /* shared spans overlap each other */
    const int d = vc_file_lock_sectors(p, (1 << 20) + 100, 1000, 0);
    CHECK(d >= 0);
    CHECK_EQ(vc_file_unlock_sectors(p, d), 0);
    /* a read of sector 7 (inside span a) and a write of sector 8 (span b) wait; they go
     * once their span is released */
    struct span_job r = {.f = p, .off = 7 * 512 + 100, .size = 10, .kind = 0};
    pthread_t tr = waits(&r);
    struct span_job w = {.f = p, .off = 8 * 512, .size = 512, .kind = 1};
    pthread_t tw = waits(&w);
    CHECK_EQ(vc_file_unlock_sectors(p, a), 0);
    CHECK_EQ(pthread_join(tr, NULL), 0);
    CHECK_EQ(atomic_load(&w.done), 0); /* b still held (joining it would hang: bounded above) */
    /* the whole-file write lock waits for the spans, and holds off new ones meanwhile:
     * the write of sector 8 now waits for it, after b is released */
    struct span_job whole = {.f = p, .kind = 2};
    pthread_t twhole = waits(&whole);
    CHECK_EQ(vc_file_unlock_sectors(p, b), 0);
    struct timespec look = {0, 150 * 1000 * 1000};
    CHECK(nanosleep(&look, NULL) == 0);
    CHECK_EQ(atomic_load(&whole.done), 0); /* c still held */
    CHECK_EQ(atomic_load(&w.done), 0);     /* behind the waiting whole-file writer */
    CHECK_EQ(vc_file_unlock_sectors(p, c), 0);
    CHECK_EQ(pthread_join(twhole, NULL), 0);
    CHECK_EQ(pthread_join(tw, NULL), 0);
    const int e = vc_file_lock_sectors(p, 0, 512, 1);
    struct span_job reader = {.f = p, .kind = 3};
    pthread_t treader = waits(&reader);
    CHECK_EQ(vc_file_unlock_sectors(p, e), 0);
    CHECK_EQ(pthread_join(treader, NULL), 0);
    /* while the whole-file write lock is held, every span waits */
    vc_file_lock_write(p);
    struct span_job far = {.f = p, .off = 1 << 30, .size = 512, .kind = 0};
    pthread_t tfar = waits(&far);
    CHECK_EQ(vc_file_unlock_write(p), 0);
    CHECK_EQ(pthread_join(tfar, NULL), 0);
    CHECK_EQ(vc_file_unlock_sectors(p, e), -EPERM);
    vc_file_unref(p);
}

struct big_job {
    vc_file *f;
    int fd, id, bad;
};

/* Large writes and reads of one thread's own MiB while others do the same: the helper is
 * taken by one request at a time, the others are served whole. */
static void *big_worker(void *arg)
{
    struct big_job *j = arg;
    const size_t n = 1 << 20;
    uint8_t *buf = malloc(n), *got = malloc(n);
    uint64_t s = (uint64_t)j->id + 100;
    if (buf == NULL || got == NULL) {
        j->bad++;
    } else {
        for (int i = 0; i < 40; i++) {
            rnd_fill(&s, buf, n);
            const int64_t off = (int64_t)j->id << 20;
            if (vc_file_write(j->f, j->fd, buf, n, off) != (ssize_t)n || vc_file_read(j->f, j->fd, got, n, off) != (ssize_t)n ||
                memcmp(buf, got, n) != 0)
                j->bad++;
        }
    }
    free(buf);
    free(got);
    return NULL;
}

/* Requests of SPLIT_MIN bytes or more are served on two threads (issue 13): the same bytes
 * at rest and back as one thread gives, whole sectors and partial tails, in and past the file. */
static void split_requests(void)
{
    uint64_t s = 24;
    vc_xts *x = NULL;
    vc_file *f = encrypted_state(23, "split", &x);
    const int fd = open_file("split.bin");
    const size_t max = 5u << 20;
    uint8_t *model = calloc(1, max), *got = malloc(max), *ct = malloc(max), *want = malloc(max);
    CHECK(model && got && ct && want);
    struct vc_stats before, after;
    vc_stats_get(&before);
    const size_t sizes[] = {256 * 1024, 256 * 1024 + 512, 1 << 20, (1 << 20) + 300, 3 << 20, 4 << 20, (4 << 20) + 512};
    const uint64_t offs[] = {0, 512, 1 << 20, 3 * 512 * 1024};
    size_t fsize = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        for (size_t k = 0; k < sizeof(offs) / sizeof(offs[0]); k++) {
            const size_t n = sizes[i];
            const uint64_t off = offs[k];
            if (off + n > max)
                continue;
            rnd_fill(&s, model + off, n);
            CHECK_EQ(vc_file_write(f, fd, model + off, n, (int64_t)off), (long long)n);
            if (off + n > fsize)
                fsize = off + n;
            CHECK_EQ(vc_file_read(f, fd, got, n, (int64_t)off), (long long)n);
            CHECK(memcmp(got, model + off, n) == 0);
        }
    /* one read of everything, then the ciphertext against one-thread encryption */
    CHECK_EQ(vc_file_read(f, fd, got, max, 0), (long long)fsize);
    CHECK(memcmp(got, model, fsize) == 0);
    CHECK_EQ(pread(fd, ct, fsize, 0), (ssize_t)fsize);
    CHECK_EQ(vc_xts_encrypt(x, 0, model, want, fsize), 0);
    CHECK(memcmp(ct, want, fsize) == 0);
    vc_stats_get(&after);
    if (sysconf(_SC_NPROCESSORS_ONLN) >= 2)
        CHECK(after.split_requests > before.split_requests);
    pthread_t t[3];
    struct big_job jobs[3];
    for (int i = 0; i < 3; i++) {
        jobs[i] = (struct big_job){f, fd, i, 0};
        CHECK_EQ(pthread_create(&t[i], NULL, big_worker, &jobs[i]), 0);
    }
    for (int i = 0; i < 3; i++) {
        CHECK_EQ(pthread_join(t[i], NULL), 0);
        CHECK_EQ(jobs[i].bad, 0);
    }
    vc_xts_unref(x);
    free(model);
    free(got);
    free(ct);
    free(want);
    CHECK(close(fd) == 0);
    vc_file_unref(f);
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        snprintf(dir, sizeof(dir), "%s", argv[1]);
    } else {
        const char *tmp = getenv("TMPDIR");
        snprintf(dir, sizeof(dir), "%s/vc-datapath-XXXXXX", tmp ? tmp : "/tmp");
        CHECK(mkdtemp(dir) != NULL);
    }
    vc_set_log_hook(log_hook);
    model_test(1, 2500);
    model_test(2, 2500);
    short_writes();
    plain_and_revoked();
    handles_and_entries();
    threads();
    hot_zone();
    sector_spans();
    split_requests();
    data_fault_logged();
    vc_set_log_hook(NULL);
    char cmd[8300];
    if (argc <= 1) {
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        CHECK(system(cmd) == 0);
    }
    if (harness_failures) {
        fprintf(stderr, "test_datapath: %d failures\n", harness_failures);
        return 1;
    }
    printf("test_datapath: ok\n");
    return 0;
}
