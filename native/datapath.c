/* datapath.c: the native read/write path. See datapath.h. */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#include "datapath.h"
#include "vc_util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#define SECTOR ((uint64_t)VC_SECTOR_SIZE)
#define MIN_HOLE_TAIL VC_XTS_BLOCK /* shorter partial last sectors are never holes */
#define CHUNK ((size_t)256 * 1024)   /* region bytes encrypted / decrypted per scratch round */

/* -- file state --------------------------------------------------------------------- */

struct span {
    uint64_t lo, hi; /* sectors, inclusive */
    int excl, used;
};

struct vc_file {
    _Atomic size_t refs;
    vc_xts *cipher; /* NULL: plain file */
    _Atomic int revoked;
    /* reader/writer lock: a mutex and a condition, so that a release is checkable */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned readers, writers_waiting;
    int writer;
    /* The hot zone (issue 10): bytes [hot_lo, hot_hi) an online re-encryption rewrites
     * without holding the lock; data-path I/O touching one of its sectors waits (the
     * *_span lock functions). hot_hi == 0: none. Changed under the write lock only. */
    uint64_t hot_lo, hot_hi;
    /* Sector spans held by data-path requests (vc_file_lock_sectors): shared ones for
     * reads, exclusive ones for writes that do not change the size. They exclude each
     * other only where they overlap; the whole-file write lock excludes them all. */
    struct span spans[VC_SPAN_SLOTS];
    unsigned nspans;
    pthread_mutex_t name_mu;
    char *name;
};

int vc_file_new(vc_xts *cipher, const char *name, vc_file **out)
{
    *out = NULL;
    if (name == NULL)
        return -EINVAL;
    vc_file *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return -ENOMEM;
    f->name = strdup(name);
    if (f->name == NULL) {
        free(f);
        return -ENOMEM;
    }
    if (pthread_mutex_init(&f->mu, NULL) != 0) {
        free(f->name);
        free(f);
        return -ENOMEM;
    }
    if (pthread_cond_init(&f->cv, NULL) != 0) {
        VC_MUST(pthread_mutex_destroy(&f->mu));
        free(f->name);
        free(f);
        return -ENOMEM;
    }
    if (pthread_mutex_init(&f->name_mu, NULL) != 0) {
        VC_MUST(pthread_cond_destroy(&f->cv));
        VC_MUST(pthread_mutex_destroy(&f->mu));
        free(f->name);
        free(f);
        return -ENOMEM;
    }
    atomic_init(&f->refs, 1);
    atomic_init(&f->revoked, 0);
    if (cipher != NULL)
        vc_xts_ref(cipher);
    f->cipher = cipher;
    *out = f;
    return 0;
}

void vc_file_ref(vc_file *f)
{
    atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
}

void vc_file_unref(vc_file *f)
{
    if (f == NULL || atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1)
        return;
    vc_xts_unref(f->cipher);
    VC_MUST(pthread_mutex_destroy(&f->name_mu));
    VC_MUST(pthread_cond_destroy(&f->cv));
    VC_MUST(pthread_mutex_destroy(&f->mu));
    free(f->name);
    free(f);
}

int vc_file_set_cipher(vc_file *f, vc_xts *cipher)
{
    if (cipher == NULL)
        return -EINVAL;
    int rc = 0;
    VC_MUST(pthread_mutex_lock(&f->mu));
    if (!f->writer) {
        rc = -EPERM; /* a plain file may get a cipher too: an online encrypt (issue 10) */
    } else {
        vc_xts *old = f->cipher;
        vc_xts_ref(cipher);
        f->cipher = cipher; /* no reader runs: the caller holds the write lock */
        vc_xts_unref(old);
    }
    VC_MUST(pthread_mutex_unlock(&f->mu));
    return rc;
}

vc_xts *vc_file_cipher(const vc_file *f)
{
    return f->cipher;
}

void vc_file_set_revoked(vc_file *f, int revoked)
{
    atomic_store_explicit(&f->revoked, revoked ? 1 : 0, memory_order_release);
}

int vc_file_revoked(const vc_file *f)
{
    return atomic_load_explicit(&f->revoked, memory_order_acquire);
}

int vc_file_set_name(vc_file *f, const char *name)
{
    char *copy = strdup(name);
    if (copy == NULL)
        return -ENOMEM;
    VC_MUST(pthread_mutex_lock(&f->name_mu));
    char *old = f->name;
    f->name = copy;
    VC_MUST(pthread_mutex_unlock(&f->name_mu));
    free(old);
    return 0;
}

size_t vc_file_name(vc_file *f, char *buf, size_t n)
{
    VC_MUST(pthread_mutex_lock(&f->name_mu));
    const size_t len = strlen(f->name);
    if (n > 0) {
        const size_t k = len < n - 1 ? len : n - 1;
        memcpy(buf, f->name, k);
        buf[k] = '\0';
    }
    VC_MUST(pthread_mutex_unlock(&f->name_mu));
    return len;
}

/* Does I/O of `size` bytes at `off` touch a sector of the hot zone? Caller holds mu. */
static int hot_touches(const vc_file *f, uint64_t off, uint64_t size)
{
    if (f->hot_hi == 0)
        return 0;
    /* off + size - 1 cannot wrap: callers pass off <= INT64_MAX and size <= SSIZE_MAX. */
    const uint64_t last = size ? off + size - 1 : off;
    return off / SECTOR <= (f->hot_hi - 1) / SECTOR && last / SECTOR >= f->hot_lo / SECTOR;
}

/* Is an exclusive span held? (A whole-file reader waits for it.) Caller holds mu. */
static int excl_span_held(const vc_file *f)
{
    for (unsigned i = 0; f->nspans && i < VC_SPAN_SLOTS; i++)
        if (f->spans[i].used && f->spans[i].excl)
            return 1;
    return 0;
}

void vc_file_lock_read(vc_file *f)
{
    VC_MUST(pthread_mutex_lock(&f->mu));
    while (f->writer || f->writers_waiting || excl_span_held(f))
        VC_MUST(pthread_cond_wait(&f->cv, &f->mu));
    f->readers++;
    VC_MUST(pthread_mutex_unlock(&f->mu));
}

void vc_file_lock_read_span(vc_file *f, uint64_t off, uint64_t size)
{
    VC_MUST(pthread_mutex_lock(&f->mu));
    while (f->writer || f->writers_waiting || excl_span_held(f) || hot_touches(f, off, size))
        VC_MUST(pthread_cond_wait(&f->cv, &f->mu));
    f->readers++;
    VC_MUST(pthread_mutex_unlock(&f->mu));
}

int vc_file_unlock_read(vc_file *f)
{
    int rc = 0;
    VC_MUST(pthread_mutex_lock(&f->mu));
    if (f->readers == 0)
        rc = -EPERM;
    else if (--f->readers == 0 && f->writers_waiting)
        VC_MUST(pthread_cond_broadcast(&f->cv));
    VC_MUST(pthread_mutex_unlock(&f->mu));
    return rc;
}

/* Caller holds mu; returns with mu held and the write lock taken. */
static void take_write(vc_file *f)
{
    f->writers_waiting++;
    while (f->writer || f->readers || f->nspans)
        VC_MUST(pthread_cond_wait(&f->cv, &f->mu));
    f->writers_waiting--;
}

void vc_file_lock_write(vc_file *f)
{
    VC_MUST(pthread_mutex_lock(&f->mu));
    take_write(f);
    f->writer = 1;
    VC_MUST(pthread_mutex_unlock(&f->mu));
}

void vc_file_lock_write_span(vc_file *f, uint64_t off, uint64_t size)
{
    VC_MUST(pthread_mutex_lock(&f->mu));
    for (;;) {
        /* Waiting for the hot zone does not count as a waiting writer: readers elsewhere
         * in the file go on meanwhile (the point of the zone). */
        while (hot_touches(f, off, size))
            VC_MUST(pthread_cond_wait(&f->cv, &f->mu));
        take_write(f);
        if (!hot_touches(f, off, size))
            break;
        /* The operation set a zone here while this writer waited for the lock. */
        if (f->writers_waiting == 0)
            VC_MUST(pthread_cond_broadcast(&f->cv));
    }
    f->writer = 1;
    VC_MUST(pthread_mutex_unlock(&f->mu));
}

int vc_file_unlock_write(vc_file *f)
{
    int rc = 0;
    VC_MUST(pthread_mutex_lock(&f->mu));
    if (!f->writer) {
        rc = -EPERM;
    } else {
        f->writer = 0;
        VC_MUST(pthread_cond_broadcast(&f->cv));
    }
    VC_MUST(pthread_mutex_unlock(&f->mu));
    return rc;
}

/* Would a span of sectors [lo, hi] (exclusive or not) conflict with a holder, or with a
 * waiting whole-file writer (which holds off new spans as it holds off new readers)?
 * Caller holds mu. */
static int span_blocked(const vc_file *f, uint64_t lo, uint64_t hi, int excl)
{
    if (f->writer || f->writers_waiting || f->nspans == VC_SPAN_SLOTS || (excl && f->readers))
        return 1;
    for (unsigned i = 0; i < VC_SPAN_SLOTS; i++) {
        const struct span *sp = &f->spans[i];
        if (sp->used && (excl || sp->excl) && sp->lo <= hi && lo <= sp->hi)
            return 1;
    }
    return 0;
}

int vc_file_lock_sectors(vc_file *f, uint64_t off, uint64_t size, int excl)
{
    /* off + size - 1 cannot wrap: callers pass off <= INT64_MAX and size <= SSIZE_MAX. */
    const uint64_t lo = off / SECTOR, hi = (size ? off + size - 1 : off) / SECTOR;
    VC_MUST(pthread_mutex_lock(&f->mu));
    while (hot_touches(f, off, size) || span_blocked(f, lo, hi, excl))
        VC_MUST(pthread_cond_wait(&f->cv, &f->mu));
    unsigned slot = 0;
    while (f->spans[slot].used) /* a free one exists: nspans < VC_SPAN_SLOTS */
        slot++;
    f->spans[slot] = (struct span){.lo = lo, .hi = hi, .excl = excl != 0, .used = 1};
    f->nspans++;
    VC_MUST(pthread_mutex_unlock(&f->mu));
    return (int)slot;
}

int vc_file_unlock_sectors(vc_file *f, int slot)
{
    int rc = 0;
    VC_MUST(pthread_mutex_lock(&f->mu));
    if (slot < 0 || slot >= VC_SPAN_SLOTS || !f->spans[slot].used) {
        rc = -EPERM;
    } else {
        f->spans[slot].used = 0;
        f->nspans--;
        VC_MUST(pthread_cond_broadcast(&f->cv)); /* overlapping spans, a whole-file writer */
    }
    VC_MUST(pthread_mutex_unlock(&f->mu));
    return rc;
}

/* The zone becomes [lo, hi) (0, 0: none), by the holder of the write lock only. */
static int put_hot(vc_file *f, uint64_t lo, uint64_t hi)
{
    int rc = 0;
    VC_MUST(pthread_mutex_lock(&f->mu));
    if (!f->writer) {
        rc = -EPERM;
    } else {
        f->hot_lo = lo;
        f->hot_hi = hi; /* waiters of a cleared zone wake at the release of the write lock */
    }
    VC_MUST(pthread_mutex_unlock(&f->mu));
    return rc;
}

int vc_file_set_hot(vc_file *f, uint64_t lo, uint64_t hi)
{
    if (hi <= lo || lo % SECTOR != 0)
        return -EINVAL;
    return put_hot(f, lo, hi);
}

int vc_file_clear_hot(vc_file *f)
{
    return put_hot(f, 0, 0);
}

/* -- counters and the log hook ------------------------------------------------------ */

static _Atomic uint64_t st_reads, st_writes, st_fb_reads, st_fb_writes, st_faults, st_short, st_split;
static _Atomic(vc_log_fn) log_hook;

void vc_stats_get(struct vc_stats *out)
{
    out->reads = atomic_load_explicit(&st_reads, memory_order_relaxed);
    out->writes = atomic_load_explicit(&st_writes, memory_order_relaxed);
    out->fallback_reads = atomic_load_explicit(&st_fb_reads, memory_order_relaxed);
    out->fallback_writes = atomic_load_explicit(&st_fb_writes, memory_order_relaxed);
    out->faults = atomic_load_explicit(&st_faults, memory_order_relaxed);
    out->short_writes = atomic_load_explicit(&st_short, memory_order_relaxed);
    out->split_requests = atomic_load_explicit(&st_split, memory_order_relaxed);
}

void vc_stats_count_fallback(int write)
{
    atomic_fetch_add_explicit(write ? &st_fb_writes : &st_fb_reads, 1, memory_order_relaxed);
}

void vc_set_log_hook(vc_log_fn fn)
{
    atomic_store_explicit(&log_hook, fn, memory_order_release);
}

/* What went wrong inside a locked section; reported after the lock is dropped. */
struct fault {
    int set;
    uint64_t sector;
    char what[160];
};

static void fault_note(struct fault *ft, uint64_t sector, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void fault_note(struct fault *ft, uint64_t sector, const char *fmt, ...)
{
    if (ft->set) /* the first fault is the cause; later ones are consequences */
        return;
    ft->set = 1;
    ft->sector = sector;
    va_list ap;
    va_start(ap, fmt);
    const int n = vsnprintf(ft->what, sizeof(ft->what), fmt, ap);
    va_end(ap);
    if (n < 0)
        ft->what[0] = '\0';
}

static void fault_emit(vc_file *f, const struct fault *ft, const char *op, int64_t off)
{
    if (!ft->set)
        return;
    atomic_fetch_add_explicit(&st_faults, 1, memory_order_relaxed);
    char name[512], msg[1024];
    (void)vc_file_name(f, name, sizeof(name));
    const int n = snprintf(msg, sizeof(msg), "%s: %s at byte %" PRId64 " (sector %" PRId64 ") failed: %s", name,
                           op, off, off / (int64_t)SECTOR, ft->what);
    if (n < 0)
        return;
    vc_log_fn fn = atomic_load_explicit(&log_hook, memory_order_acquire);
    if (fn != NULL)
        fn(msg);
    else if (fprintf(stderr, "vmfs-crypt: %s\n", msg) < 0)
        return; /* nowhere left to report it */
}

static const char *errstr(int err, char *buf, size_t n)
{
    return strerror_r(err, buf, n); /* GNU variant */
}

/* -- per-thread scratch ------------------------------------------------------------- */

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok;
static __thread uint8_t *scratch_buf;
static __thread size_t scratch_len;

struct scratch {
    uint8_t *buf;
    size_t len;
};

static void scratch_free(void *p)
{
    struct scratch *s = p;
    if (s == NULL)
        return;
    OPENSSL_cleanse(s->buf, s->len); /* plaintext of the last request */
    free(s->buf);
    free(s);
}

static void scratch_init(void)
{
    scratch_key_ok = pthread_key_create(&scratch_key, scratch_free) == 0;
}

/* A buffer of at least `need` (<= CHUNK) bytes, kept for this thread and freed (cleansed)
 * when the thread exits. */
static uint8_t *scratch(size_t need)
{
    if (scratch_buf != NULL && scratch_len >= need)
        return scratch_buf;
    if (pthread_once(&scratch_once, scratch_init) != 0 || !scratch_key_ok)
        return NULL;
    size_t len = need < 64 * 1024 ? 64 * 1024 : CHUNK;
    struct scratch *s = pthread_getspecific(scratch_key);
    if (s == NULL) {
        s = calloc(1, sizeof(*s));
        if (s == NULL)
            return NULL;
        if (pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    uint8_t *buf = malloc(len);
    if (buf == NULL)
        return NULL;
    if (s->buf != NULL) {
        OPENSSL_cleanse(s->buf, s->len);
        free(s->buf);
    }
    s->buf = scratch_buf = buf;
    s->len = scratch_len = len;
    return buf;
}

/* -- I/O helpers -------------------------------------------------------------------- */

/* Reads until `len` bytes, end of file or an error. *got = bytes read. */
static int pread_full(int fd, uint8_t *buf, size_t len, uint64_t off, size_t *got)
{
    size_t done = 0;
    while (done < len) {
        size_t want = len - done;
        if (want > (size_t)SSIZE_MAX)
            want = (size_t)SSIZE_MAX;
        const ssize_t n = pread(fd, buf + done, want, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *got = done;
            return -errno;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    *got = done;
    return 0;
}

/* Writes until done or an error; *put = bytes the file took. A zero return from pwrite
 * (no progress, no errno) counts as -EIO. */
static int pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t off, size_t *put)
{
    size_t done = 0;
    while (done < len) {
        size_t want = len - done;
        if (want > (size_t)SSIZE_MAX)
            want = (size_t)SSIZE_MAX;
        const ssize_t n = pwrite(fd, buf + done, want, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *put = done;
            return -errno;
        }
        if (n == 0) {
            *put = done;
            return -EIO;
        }
        done += (size_t)n;
    }
    *put = done;
    return 0;
}

static int file_size(int fd, uint64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    if (st.st_size < 0)
        return -EIO;
    *size = (uint64_t)st.st_size;
    return 0;
}

static int all_zero(const uint8_t *p, size_t n)
{
    if (n >= 8) { /* real ciphertext almost always fails here */
        uint64_t w;
        memcpy(&w, p, sizeof(w));
        if (w != 0)
            return 0;
    }
    uint8_t acc = 0;
    for (size_t i = 0; i < n; i++)
        acc |= p[i];
    return acc == 0;
}

/* A backing sector of `len` bytes (the last one of the file may be partial) is a hole if
 * it is all zero, unless it is a partial sector under 16 bytes (FORMAT.md 3.4). */
static int is_hole(const uint8_t *ct, size_t len)
{
    return len >= MIN_HOLE_TAIL && all_zero(ct, len);
}

/* Decrypts in place `len` bytes of backing sectors starting at `first` (only the last may
 * be partial), leaving holes as the zeros they already are. */
static int decrypt_region(vc_xts *x, uint64_t first, uint8_t *buf, size_t len, struct fault *ft)
{
    const size_t nsec = (len + SECTOR - 1) / SECTOR;
    size_t i = 0;
    while (i < nsec) {
        size_t slen = len - i * SECTOR < SECTOR ? len - i * SECTOR : SECTOR;
        if (is_hole(buf + i * SECTOR, slen)) {
            i++;
            continue;
        }
        size_t j = i + 1;
        while (j < nsec) {
            slen = len - j * SECTOR < SECTOR ? len - j * SECTOR : SECTOR;
            if (is_hole(buf + j * SECTOR, slen))
                break;
            j++;
        }
        const size_t end = j * SECTOR < len ? j * SECTOR : len;
        const int rc = vc_xts_decrypt(x, first + i, buf + i * SECTOR, buf + i * SECTOR, end - i * SECTOR);
        if (rc != 0) {
            fault_note(ft, first + i, "libcrypto error decrypting sector %" PRIu64, first + i);
            return -EIO;
        }
        i = j + 1; /* sector j (if any) is a hole */
    }
    return 0;
}

/* fs.py _read_sectors: `len` bytes of backing sectors from sector `first` into `buf`,
 * decrypted; a short read is a data fault. */
static int read_region(vc_file *f, int fd, uint64_t first, size_t len, uint8_t *buf, struct fault *ft)
{
    size_t got = 0;
    const int rc = pread_full(fd, buf, len, first * SECTOR, &got);
    if (rc != 0) {
        if (rc == -EIO) {
            char eb[64];
            fault_note(ft, first + got / SECTOR, "backing file error at sector %" PRIu64 ": %s",
                       first + got / SECTOR, errstr(EIO, eb, sizeof(eb)));
        }
        return rc;
    }
    if (got != len) {
        fault_note(ft, first + got / SECTOR, "short read at sector %" PRIu64, first + got / SECTOR);
        return -EIO;
    }
    return decrypt_region(f->cipher, first, buf, len, ft);
}

/* -- the second CPU for a large request (issue 13) ------------------------------------ */

/* One fio job or one guest vCPU has one large request in flight: serving it on one thread
 * leaves the other CPU idle while the cipher runs serially with the copies (the seq 1 MiB
 * bound in docs/PERFORMANCE.md). A request of SPLIT_MIN bytes or more hands its upper part
 * to one helper thread when the helper is idle (else it is served whole, as before): reads
 * pread and decrypt their two halves at once; writes have their upper 5/8 encrypted on the
 * helper while this thread encrypts and stores the lower 3/8, then store the upper part, so
 * backing writes stay in ascending order and a short write keeps the prefix rule of
 * native/README.md. The helper runs under the requester's file lock and the requester
 * waits for it before it returns; the helper takes no file lock. */
#define SPLIT_MIN ((size_t)256 * 1024)
#define SPLIT_MAX ((size_t)4 * 1024 * 1024) /* larger requests are served on one thread */
#define SPLIT_ALIGN ((size_t)4096)

struct part {
    int encrypt;        /* 1: encrypt src -> dst; 0: read and decrypt into dst */
    vc_file *f;
    int fd;
    uint64_t first;     /* sector number of dst[0] */
    size_t len;
    const uint8_t *src; /* encrypt: plaintext */
    uint8_t *dst;
    int rc;
    struct fault ft;
    _Atomic int done;   /* set under helper_mu, also read without it (helper_wait's spin) */
};

static pthread_mutex_t helper_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t helper_cv = PTHREAD_COND_INITIALIZER; /* a job was posted */
static pthread_cond_t helper_done_cv = PTHREAD_COND_INITIALIZER;
static int helper_state;         /* 0: not started, 1: running, -1: cannot run (one CPU, no thread) */
static int helper_busy;          /* a requester owns the helper */
static struct part *helper_job;  /* posted, not yet taken */
static uint8_t *helper_buf;      /* the helper's ciphertext of an upper half (no plaintext) */
static size_t helper_buf_len;
static pthread_once_t helper_fork_once = PTHREAD_ONCE_INIT;

/* How long a requester whose own part is done spins for the helper's before it sleeps. On
 * this kind of VM an idle vCPU halts and a wake-up waits for the hypervisor (20-60 us of
 * run-queue wait per wake-up, `make bench`'s per-request table): sleeping here added one such
 * wake-up to every split request. The helper is running the part meanwhile, so the spin is
 * bounded by that part's time, at most SPIN_WAIT_US (docs/PERFORMANCE.md). */
#define SPIN_WAIT_US 150

static uint64_t mono_us(void)
{
    struct timespec t;
    VC_MUST(clock_gettime(CLOCK_MONOTONIC, &t));
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void run_part(struct part *p)
{
    if (!p->encrypt) {
        p->rc = read_region(p->f, p->fd, p->first, p->len, p->dst, &p->ft);
    } else if (vc_xts_encrypt(p->f->cipher, p->first, p->src, p->dst, p->len) != 0) {
        fault_note(&p->ft, p->first, "libcrypto error encrypting sector %" PRIu64, p->first);
        p->rc = -EIO;
    } else {
        p->rc = 0;
    }
}

static void *helper_main(void *unused)
{
    (void)unused;
    VC_MUST(pthread_mutex_lock(&helper_mu));
    for (;;) {
        while (helper_job == NULL)
            VC_MUST(pthread_cond_wait(&helper_cv, &helper_mu));
        struct part *p = helper_job;
        helper_job = NULL;
        VC_MUST(pthread_mutex_unlock(&helper_mu));
        run_part(p);
        VC_MUST(pthread_mutex_lock(&helper_mu));
        atomic_store_explicit(&p->done, 1, memory_order_release);
        VC_MUST(pthread_cond_broadcast(&helper_done_cv));
    }
    return NULL;
}

/* A child of fork() has no helper thread: it starts its own when it needs one. */
static void helper_after_fork(void)
{
    VC_MUST(pthread_mutex_init(&helper_mu, NULL));
    VC_MUST(pthread_cond_init(&helper_cv, NULL));
    VC_MUST(pthread_cond_init(&helper_done_cv, NULL));
    helper_state = 0;
    helper_busy = 0;
    helper_job = NULL;
    helper_buf = NULL; /* the parent's copy is not freed: it may be in use there */
    helper_buf_len = 0;
}

static void helper_fork_init(void)
{
    if (pthread_atfork(NULL, NULL, helper_after_fork) != 0)
        helper_state = -1; /* without the handler a child could wait for a helper it lacks */
}

/* Under helper_mu: the helper thread, started on first use with every signal blocked
 * (signals stay with the threads that handle them). */
static int helper_start_locked(void)
{
    if (helper_state != 0)
        return helper_state;
    const char *knob = getenv("VMFS_CRYPT_SPLIT"); /* "0": one thread per request (A/B runs) */
    if (sysconf(_SC_NPROCESSORS_ONLN) < 2 || (knob != NULL && strcmp(knob, "0") == 0)) {
        helper_state = -1;
        return -1;
    }
    sigset_t all, old;
    pthread_t t;
    if (sigfillset(&all) != 0 || pthread_sigmask(SIG_SETMASK, &all, &old) != 0) {
        helper_state = -1;
        return -1;
    }
    pthread_attr_t attr;
    int rc = pthread_attr_init(&attr);
    if (rc == 0) {
        rc = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (rc == 0)
            rc = pthread_create(&t, &attr, helper_main, NULL);
        VC_MUST(pthread_attr_destroy(&attr));
    }
    VC_MUST(pthread_sigmask(SIG_SETMASK, &old, NULL));
    helper_state = rc == 0 ? 1 : -1;
    return helper_state;
}

/* Takes the idle helper for one part (and, for `need_buf` > 0, its buffer of that many
 * bytes in *buf); 0: it is busy or cannot run, serve the request on this thread. */
static int helper_take(size_t need_buf, uint8_t **buf)
{
    if (pthread_once(&helper_fork_once, helper_fork_init) != 0)
        return 0;
    int ok = 0;
    VC_MUST(pthread_mutex_lock(&helper_mu));
    if (!helper_busy && helper_start_locked() == 1) {
        ok = 1;
        if (need_buf > helper_buf_len) {
            uint8_t *nb = malloc(need_buf);
            if (nb == NULL) {
                ok = 0;
            } else {
                free(helper_buf);
                helper_buf = nb;
                helper_buf_len = need_buf;
            }
        }
        if (ok) {
            helper_busy = 1;
            *buf = helper_buf;
        }
    }
    VC_MUST(pthread_mutex_unlock(&helper_mu));
    return ok;
}

static void helper_post(struct part *p)
{
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    VC_MUST(pthread_mutex_lock(&helper_mu));
    helper_job = p;
    VC_MUST(pthread_cond_signal(&helper_cv));
    VC_MUST(pthread_mutex_unlock(&helper_mu));
    atomic_fetch_add_explicit(&st_split, 1, memory_order_relaxed);
}

static void helper_wait(struct part *p)
{
    const uint64_t until = mono_us() + SPIN_WAIT_US;
    for (unsigned n = 1; !atomic_load_explicit(&p->done, memory_order_acquire); n++) {
        cpu_relax();
        if (n % 64 == 0 && mono_us() > until)
            break;
    }
    VC_MUST(pthread_mutex_lock(&helper_mu));
    while (!atomic_load_explicit(&p->done, memory_order_relaxed))
        VC_MUST(pthread_cond_wait(&helper_done_cv, &helper_mu));
    VC_MUST(pthread_mutex_unlock(&helper_mu));
}

/* Gives the helper (and its buffer) back. */
static void helper_release(void)
{
    VC_MUST(pthread_mutex_lock(&helper_mu));
    helper_busy = 0;
    VC_MUST(pthread_mutex_unlock(&helper_mu));
}

/* Where a request of `len` bytes splits: this thread takes the lower `eighths`/8 of it
 * (rounded down to SPLIT_ALIGN), the helper the rest; 0: not split. */
static size_t split_point(size_t len, unsigned eighths)
{
    if (len < SPLIT_MIN || len > SPLIT_MAX)
        return 0;
    return len / 8 * eighths / SPLIT_ALIGN * SPLIT_ALIGN;
}

/* read_region, the upper half on the helper when it is free. */
static int read_region_split(vc_file *f, int fd, uint64_t first, size_t len, uint8_t *buf, struct fault *ft)
{
    const size_t mid = split_point(len, 4);
    uint8_t *unused = NULL;
    if (mid == 0 || !helper_take(0, &unused))
        return read_region(f, fd, first, len, buf, ft);
    struct part up = {.encrypt = 0, .f = f, .fd = fd, .first = first + mid / SECTOR, .len = len - mid,
                      .dst = buf + mid};
    helper_post(&up);
    const int rc = read_region(f, fd, first, mid, buf, ft);
    helper_wait(&up);
    helper_release();
    if (rc != 0)
        return rc; /* the lower half's fault is the one reported */
    if (up.rc != 0 && up.ft.set)
        *ft = up.ft;
    return up.rc;
}

/* -- read ----------------------------------------------------------------------------- */

static ssize_t read_locked(vc_file *f, int fd, uint8_t *buf, size_t size, uint64_t off, struct fault *ft)
{
    uint64_t fsize = 0;
    int rc = file_size(fd, &fsize);
    if (rc != 0)
        return rc;
    if (off >= fsize || size == 0)
        return 0;
    const uint64_t end = off + (size < fsize - off ? size : fsize - off);
    const uint64_t first = off / SECTOR, last = (end - 1) / SECTOR;
    const uint64_t region = first * SECTOR;
    const uint64_t region_end = (last + 1) * SECTOR < fsize ? (last + 1) * SECTOR : fsize;
    const size_t length = (size_t)(region_end - region);
    const size_t skip = (size_t)(off - region), out_len = (size_t)(end - off);

    if (skip == 0 && length <= size) { /* aligned: straight into the caller's buffer */
        rc = read_region_split(f, fd, first, length, buf, ft);
        return rc != 0 ? rc : (ssize_t)out_len;
    }
    uint8_t *tmp = scratch(length < CHUNK ? length : CHUNK);
    if (tmp == NULL)
        return -ENOMEM;
    for (size_t a = 0; a < length; a += CHUNK) {
        const size_t b = length - a < CHUNK ? length : a + CHUNK;
        rc = read_region(f, fd, first + a / SECTOR, b - a, tmp, ft);
        if (rc != 0)
            return rc;
        /* the part of [a, b) inside [skip, skip + out_len) */
        const size_t lo = a > skip ? a : skip, hi = b < skip + out_len ? b : skip + out_len;
        if (hi > lo)
            memcpy(buf + (lo - skip), tmp + (lo - a), hi - lo);
    }
    return (ssize_t)out_len;
}

static ssize_t plain_read(int fd, uint8_t *buf, size_t size, uint64_t off)
{
    size_t got = 0;
    const int rc = pread_full(fd, buf, size, off, &got);
    if (rc != 0 && got == 0)
        return rc;
    return (ssize_t)got;
}

ssize_t vc_file_read(vc_file *f, int fd, void *buf, size_t size, int64_t off)
{
    if (off < 0)
        return -EINVAL;
    if (size > (size_t)SSIZE_MAX)
        size = (size_t)SSIZE_MAX; /* a read may return less */
    if (vc_file_revoked(f))
        return -EACCES;
    struct fault ft = {0};
    /* Plain files take the read lock too: an online encrypt gives one a cipher under the
     * write lock, and no plain read may still be running then (issue 10). */
    const int slot = vc_file_lock_sectors(f, (uint64_t)off, (uint64_t)size, 0);
    ssize_t r;
    if (vc_file_revoked(f))
        r = -EACCES;
    else if (f->cipher == NULL)
        r = plain_read(fd, buf, size, (uint64_t)off);
    else
        r = read_locked(f, fd, buf, size, (uint64_t)off, &ft);
    VC_MUST(vc_file_unlock_sectors(f, slot));
    if (r == -EIO && !ft.set)
        fault_note(&ft, (uint64_t)off / SECTOR, "input/output error");
    fault_emit(f, &ft, "read", off);
    return r;
}

/* -- write ---------------------------------------------------------------------------- */

/* Old ciphertext of a sector the write may tear, kept to put back. */
struct saved {
    int have;
    uint64_t sector;
    size_t len;
    uint8_t ct[VC_SECTOR_SIZE];
};

/* fs.py `_read_sectors(handle, sector, 1, old_size)`: the old plaintext of one sector (its
 * length clipped at old_size), keeping its ciphertext in `sv`. */
static int read_old_sector(vc_file *f, int fd, uint64_t sector, uint64_t old_size, uint8_t *pt, size_t *len,
                           struct saved *sv, struct fault *ft)
{
    const uint64_t start = sector * SECTOR;
    const size_t n = (size_t)(old_size - start < SECTOR ? old_size - start : SECTOR);
    size_t got = 0;
    int rc = pread_full(fd, sv->ct, n, start, &got);
    if (rc == 0 && got != n) {
        fault_note(ft, sector, "short read at sector %" PRIu64, sector);
        rc = -EIO;
    }
    if (rc != 0)
        return rc;
    sv->have = 1;
    sv->sector = sector;
    sv->len = n;
    memcpy(pt, sv->ct, n);
    *len = n;
    return decrypt_region(f->cipher, sector, pt, n, ft);
}

/* The plaintext of a write region, assembled from the user data and the old edge sectors. */
struct region {
    uint64_t start, len;   /* backing bytes [start, start + len) */
    const uint8_t *data;   /* user bytes at [doff, doff + dlen) of the region */
    uint64_t doff, dlen;
    const uint8_t *head;   /* old plaintext at [0, hlen) */
    size_t hlen;
    const uint8_t *tail;   /* old plaintext at [tpos, tpos + tlen) */
    uint64_t tpos;
    size_t tlen;
};

static void copy_part(uint8_t *dst, uint64_t a, uint64_t b, const uint8_t *src, uint64_t s0, uint64_t s1)
{
    const uint64_t lo = a > s0 ? a : s0, hi = b < s1 ? b : s1;
    if (hi > lo)
        memcpy(dst + (lo - a), src + (lo - s0), (size_t)(hi - lo));
}

/* Encrypts and stores bytes [a0, a1) of the region, in order, CHUNK by CHUNK; *stored +=
 * the bytes the backing file took (it stops at the first that it did not take). */
static int store_chunks(vc_file *f, int fd, const struct region *rg, uint64_t a0, uint64_t a1, uint64_t *stored,
                        struct fault *ft)
{
    const int direct = rg->doff == 0 && rg->dlen == rg->len;
    uint8_t *tmp = scratch(a1 - a0 < CHUNK ? (size_t)(a1 - a0) : CHUNK);
    if (tmp == NULL)
        return -ENOMEM;
    const uint64_t first = rg->start / SECTOR;
    for (uint64_t a = a0; a < a1; a += CHUNK) {
        const uint64_t b = a1 - a < CHUNK ? a1 : a + CHUNK;
        const size_t n = (size_t)(b - a);
        const uint8_t *src = tmp;
        if (direct) {
            src = rg->data + a;
        } else {
            memset(tmp, 0, n);
            if (rg->head)
                copy_part(tmp, a, b, rg->head, 0, rg->hlen);
            if (rg->tail)
                copy_part(tmp, a, b, rg->tail, rg->tpos, rg->tpos + rg->tlen);
            copy_part(tmp, a, b, rg->data, rg->doff, rg->doff + rg->dlen);
        }
        if (vc_xts_encrypt(f->cipher, first + a / SECTOR, src, tmp, n) != 0) {
            fault_note(ft, first + a / SECTOR, "libcrypto error encrypting sector %" PRIu64, first + a / SECTOR);
            return -EIO;
        }
        size_t put = 0;
        const int rc = pwrite_full(fd, tmp, n, rg->start + a, &put);
        *stored += put;
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Encrypts and stores the region; *stored = bytes of it the backing file took, a prefix.
 * A large whole-sector region has its upper part encrypted on the helper meanwhile (see
 * "the second CPU"), stored after the lower part. */
static int store_region(vc_file *f, int fd, const struct region *rg, uint64_t *stored, struct fault *ft)
{
    *stored = 0;
    const int direct = rg->doff == 0 && rg->dlen == rg->len;
    /* the lower 3/8 here (encrypted and stored), the upper 5/8 encrypted by the helper:
     * the two finish together when a store costs about as much as the cipher */
    const size_t mid = direct && rg->len <= SPLIT_MAX ? split_point((size_t)rg->len, 3) : 0;
    uint8_t *hb = NULL;
    if (mid == 0 || !helper_take((size_t)rg->len - mid, &hb))
        return store_chunks(f, fd, rg, 0, rg->len, stored, ft);
    struct part up = {.encrypt = 1, .f = f, .fd = fd, .first = rg->start / SECTOR + mid / SECTOR,
                      .len = (size_t)rg->len - mid, .src = rg->data + mid, .dst = hb};
    helper_post(&up);
    int rc = store_chunks(f, fd, rg, 0, mid, stored, ft);
    helper_wait(&up);
    if (rc == 0 && up.rc != 0) {
        *ft = up.ft;
        rc = up.rc;
    }
    if (rc == 0) {
        size_t put = 0;
        rc = pwrite_full(fd, hb, up.len, rg->start + mid, &put);
        *stored += put;
    }
    helper_release();
    return rc;
}

static int put_back(int fd, const uint8_t *buf, size_t len, uint64_t off)
{
    size_t put = 0;
    return pwrite_full(fd, buf, len, off, &put);
}

/* The write of `size` bytes at `off` to a file of `old` bytes, under a lock that keeps
 * the size: the whole-file write lock, or an exclusive span when end <= old. */
static ssize_t write_locked(vc_file *f, int fd, const uint8_t *data, size_t size, uint64_t off, uint64_t old,
                            struct fault *ft)
{
    int rc = 0;
    const uint64_t end = off + size, new_size = end > old ? end : old;
    const uint64_t first = off / SECTOR, last = (end - 1) / SECTOR;
    const uint64_t start = first * SECTOR;
    const uint64_t region_end = (last + 1) * SECTOR < new_size ? (last + 1) * SECTOR : new_size;
    const uint64_t old_tail = old / SECTOR, old_r = old % SECTOR;
    char eb[64], eb2[64];

    struct saved sv_head = {0}, sv_tail = {0}, sv_old = {0};
    uint8_t head[VC_SECTOR_SIZE], tail[VC_SECTOR_SIZE];
    struct region rg = {.start = start, .len = region_end - start, .data = data, .doff = off - start,
                        .dlen = size};
    int reencoded = 0;

    if (old_r && old_tail < first) {
        /* fs.py _reencode_tail(old, new): the old partial last sector becomes a whole one. */
        uint8_t pt[VC_SECTOR_SIZE], ct[VC_SECTOR_SIZE];
        size_t n = 0;
        rc = read_old_sector(f, fd, old_tail, old, pt, &n, &sv_old, ft);
        if (rc != 0)
            return rc;
        memset(pt + n, 0, sizeof(pt) - n);
        if (all_zero(pt, VC_SECTOR_SIZE)) {
            /* all-zero plaintext is stored as a hole: zeros over the old bytes */
            memset(ct, 0, n);
        } else if (vc_xts_encrypt(f->cipher, old_tail, pt, ct, VC_SECTOR_SIZE) != 0) {
            OPENSSL_cleanse(pt, sizeof(pt));
            fault_note(ft, old_tail, "libcrypto error encrypting sector %" PRIu64, old_tail);
            return -EIO;
        } else {
            n = VC_SECTOR_SIZE;
        }
        OPENSSL_cleanse(pt, sizeof(pt));
        reencoded = 1;
        size_t put = 0;
        rc = pwrite_full(fd, ct, n, old_tail * SECTOR, &put);
        if (rc != 0) {
            /* nothing of the request is stored: the old tail encoding and size come back */
            int r2 = put_back(fd, sv_old.ct, sv_old.len, old_tail * SECTOR);
            if (r2 == 0 && ftruncate(fd, (off_t)old) != 0)
                r2 = -errno;
            if (r2 != 0)
                fault_note(ft, old_tail, "%s; restoring the old encoding of sector %" PRIu64 " failed (%s): "
                           "the sector is damaged", errstr(-rc, eb, sizeof(eb)), old_tail,
                           errstr(-r2, eb2, sizeof(eb2)));
            return rc;
        }
    } else {
        const int need_head = off != start && start < old;
        const int need_tail = end != region_end && last * SECTOR < old && (last != first || !need_head);
        if (need_head) {
            rc = read_old_sector(f, fd, first, old, head, &rg.hlen, &sv_head, ft);
            if (rc != 0)
                return rc;
            rg.head = head;
        }
        if (need_tail) {
            rc = read_old_sector(f, fd, last, old, tail, &rg.tlen, &sv_tail, ft);
            if (rc != 0)
                return rc;
            rg.tail = tail;
            rg.tpos = last * SECTOR - start;
        }
        /* The old partial last sector inside the region, overwritten whole: keep its
         * ciphertext too (a torn one under 16 bytes cannot be punched to a hole). */
        if (old_r && first <= old_tail && old_tail <= last && !(need_head && first == old_tail) &&
            !(need_tail && last == old_tail)) {
            size_t got = 0;
            rc = pread_full(fd, sv_old.ct, (size_t)old_r, old_tail * SECTOR, &got);
            if (rc == 0 && got != old_r) {
                fault_note(ft, old_tail, "short read at sector %" PRIu64, old_tail);
                rc = -EIO;
            }
            if (rc != 0)
                return rc;
            sv_old.have = 1;
            sv_old.sector = old_tail;
            sv_old.len = (size_t)old_r;
        }
    }

    uint64_t stored = 0;
    const int werr = store_region(f, fd, &rg, &stored, ft);
    OPENSSL_cleanse(head, sizeof(head));
    OPENSSL_cleanse(tail, sizeof(tail));
    if (werr == 0 && stored == rg.len)
        return (ssize_t)size;

    /* Only `stored` bytes of the region are at rest: acknowledge the user bytes in the
     * complete sectors, put everything else back the way it was. */
    atomic_fetch_add_explicit(&st_short, 1, memory_order_relaxed);
    const int err = werr != 0 ? werr : -EIO;
    const uint64_t complete = stored / SECTOR;
    const uint64_t stored_end = start + complete * SECTOR;
    if (err == -EIO)
        fault_note(ft, stored_end / SECTOR, "backing file error writing sector %" PRIu64 ": %s", stored_end / SECTOR,
                   errstr(EIO, eb, sizeof(eb)));
    if (stored % SECTOR) {
        const uint64_t torn = stored_end / SECTOR, torn_to = start + stored;
        if (stored_end < old) {
            const struct saved *sv = sv_head.have && sv_head.sector == torn   ? &sv_head
                                     : sv_tail.have && sv_tail.sector == torn ? &sv_tail
                                     : sv_old.have && sv_old.sector == torn   ? &sv_old
                                                                               : NULL;
            int r2;
            if (sv != NULL) {
                const uint64_t upto = torn_to < stored_end + sv->len ? torn_to : stored_end + sv->len;
                r2 = put_back(fd, sv->ct, (size_t)(upto - stored_end), stored_end);
                if (r2 != 0)
                    fault_note(ft, torn, "%s; restoring torn sector %" PRIu64 " failed (%s): the sector is damaged",
                               errstr(-err, eb, sizeof(eb)), torn, errstr(-r2, eb2, sizeof(eb2)));
            } else {
                /* An interior sector overwritten whole: its old ciphertext was not read.
                 * A hole is what a block filesystem can only have had there. */
                r2 = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)stored_end, (off_t)SECTOR)
                         ? -errno
                         : 0;
                fault_note(ft, torn, "%s; sector %" PRIu64 " was torn and %s", errstr(-err, eb, sizeof(eb)), torn,
                           r2 == 0 ? "now reads as zeros" : "could not be punched: the sector is damaged");
            }
        }
    }
    if (reencoded && complete == 0) {
        const int r2 = put_back(fd, sv_old.ct, sv_old.len, old_tail * SECTOR);
        if (r2 != 0)
            fault_note(ft, old_tail, "%s; restoring the old encoding of sector %" PRIu64 " failed (%s): "
                       "the sector is damaged", errstr(-err, eb, sizeof(eb)), old_tail, errstr(-r2, eb2, sizeof(eb2)));
    }
    const uint64_t final = complete > 0 && stored_end > old ? stored_end : old;
    uint64_t cur = 0;
    int r3 = file_size(fd, &cur);
    if (r3 == 0 && cur > final && ftruncate(fd, (off_t)final) != 0)
        r3 = -errno;
    if (r3 != 0)
        fault_note(ft, final / SECTOR, "%s; cutting the file back to %" PRIu64 " bytes failed (%s)",
                   errstr(-err, eb, sizeof(eb)), final, errstr(-r3, eb2, sizeof(eb2)));
    if (complete == 0)
        return err;
    return (ssize_t)(stored_end - off);
}

static ssize_t plain_write(int fd, const uint8_t *buf, size_t size, uint64_t off)
{
    size_t put = 0;
    const int rc = pwrite_full(fd, buf, size, off, &put);
    if (rc != 0 && put == 0)
        return rc;
    if (put < size)
        atomic_fetch_add_explicit(&st_short, 1, memory_order_relaxed);
    return (ssize_t)put;
}

ssize_t vc_file_write(vc_file *f, int fd, const void *buf, size_t size, int64_t off)
{
    if (off < 0)
        return -EINVAL;
    if (size > (size_t)SSIZE_MAX)
        return -EINVAL;
    if (vc_file_revoked(f))
        return -EACCES;
    if (size == 0)
        return 0;
    if ((uint64_t)size > (uint64_t)INT64_MAX - (uint64_t)off)
        return -EFBIG;
    /* A write inside the file keeps its size: only its own sectors are locked, so that
     * writes elsewhere (a guest's queue) run in parallel (issue 13, rw4k-qd16). An
     * encrypted file's size changes only under the whole-file lock, so it holds while the
     * span is held. A plain file is written under the span too: an online encrypt may give
     * it a cipher (issue 10), under the whole-file lock. */
    const int slot = vc_file_lock_sectors(f, (uint64_t)off, (uint64_t)size, 1);
    if (f->cipher == NULL) {
        const ssize_t pr = vc_file_revoked(f) ? -EACCES : plain_write(fd, buf, size, (uint64_t)off);
        VC_MUST(vc_file_unlock_sectors(f, slot));
        return pr;
    }
    struct fault ft = {0};
    const uint64_t end = (uint64_t)off + size;
    uint64_t old = 0;
    ssize_t r;
    int rc = file_size(fd, &old);
    if (rc != 0 || end <= old) {
        r = rc != 0 ? rc : vc_file_revoked(f) ? -EACCES : write_locked(f, fd, buf, size, (uint64_t)off, old, &ft);
        VC_MUST(vc_file_unlock_sectors(f, slot));
    } else {
        VC_MUST(vc_file_unlock_sectors(f, slot));
        vc_file_lock_write_span(f, (uint64_t)off, (uint64_t)size);
        rc = file_size(fd, &old);
        r = rc != 0 ? rc : vc_file_revoked(f) ? -EACCES : write_locked(f, fd, buf, size, (uint64_t)off, old, &ft);
        VC_MUST(vc_file_unlock_write(f));
    }
    if (r == -EIO && !ft.set)
        fault_note(&ft, (uint64_t)off / SECTOR, "input/output error");
    fault_emit(f, &ft, "write", off);
    return r;
}

/* -- handle table ------------------------------------------------------------------- */

struct vc_handle {
    uint64_t fh;
    int fd;
    vc_file *file;
    _Atomic size_t refs;
    struct vc_handle *next;
};

static pthread_rwlock_t table_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct vc_handle **buckets;
static unsigned bucket_bits;
static size_t table_count;

static size_t bucket_of(uint64_t fh, unsigned bits)
{
    return (size_t)((fh * UINT64_C(0x9E3779B97F4A7C15)) >> (64 - bits));
}

static struct vc_handle **find_slot(uint64_t fh)
{
    struct vc_handle **p = &buckets[bucket_of(fh, bucket_bits)];
    while (*p != NULL && (*p)->fh != fh)
        p = &(*p)->next;
    return p;
}

static int grow_table(void)
{
    const unsigned bits = bucket_bits ? bucket_bits + 1 : 6;
    struct vc_handle **nb = calloc((size_t)1 << bits, sizeof(*nb));
    if (nb == NULL)
        return -ENOMEM;
    if (buckets != NULL) {
        for (size_t i = 0; i < ((size_t)1 << bucket_bits); i++) {
            struct vc_handle *h = buckets[i];
            while (h != NULL) {
                struct vc_handle *next = h->next;
                const size_t b = bucket_of(h->fh, bits);
                h->next = nb[b];
                nb[b] = h;
                h = next;
            }
        }
        free(buckets);
    }
    buckets = nb;
    bucket_bits = bits;
    return 0;
}

int vc_register(uint64_t fh, int fd, vc_file *f)
{
    if (f == NULL || fd < 0)
        return fd < 0 ? -EBADF : -EINVAL;
    struct vc_handle *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return -ENOMEM;
    h->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (h->fd < 0) {
        const int err = errno;
        free(h);
        return -err;
    }
    h->fh = fh;
    h->file = f;
    atomic_init(&h->refs, 1);
    int rc = 0;
    VC_MUST(pthread_rwlock_wrlock(&table_lock));
    if ((buckets == NULL || table_count >= ((size_t)1 << bucket_bits)) && grow_table() != 0 && buckets == NULL)
        rc = -ENOMEM;
    if (rc == 0) {
        struct vc_handle **slot = find_slot(fh);
        if (*slot != NULL) {
            rc = -EEXIST;
        } else {
            vc_file_ref(f);
            *slot = h;
            table_count++;
        }
    }
    VC_MUST(pthread_rwlock_unlock(&table_lock));
    if (rc != 0) {
        (void)close(h->fd); /* our own fresh duplicate: nothing was written through it */
        free(h);
    }
    return rc;
}

int vc_unregister(uint64_t fh)
{
    struct vc_handle *h = NULL;
    VC_MUST(pthread_rwlock_wrlock(&table_lock));
    if (buckets != NULL) {
        struct vc_handle **slot = find_slot(fh);
        h = *slot;
        if (h != NULL) {
            *slot = h->next;
            h->next = NULL;
            table_count--;
        }
    }
    VC_MUST(pthread_rwlock_unlock(&table_lock));
    if (h == NULL)
        return -ENOENT;
    vc_handle_put(h);
    return 0;
}

vc_handle *vc_handle_get(uint64_t fh)
{
    struct vc_handle *h = NULL;
    VC_MUST(pthread_rwlock_rdlock(&table_lock));
    if (buckets != NULL) {
        h = *find_slot(fh);
        if (h != NULL)
            atomic_fetch_add_explicit(&h->refs, 1, memory_order_relaxed);
    }
    VC_MUST(pthread_rwlock_unlock(&table_lock));
    return h;
}

void vc_handle_put(vc_handle *h)
{
    if (h == NULL || atomic_fetch_sub_explicit(&h->refs, 1, memory_order_acq_rel) != 1)
        return;
    /* Linux releases the descriptor even when close reports an error (EINTR, EIO of a
     * deferred write-back): nothing to retry; a lost write-back shows on fsync instead. */
    (void)close(h->fd);
    vc_file_unref(h->file);
    free(h);
}

ssize_t vc_handle_read(vc_handle *h, void *buf, size_t size, int64_t off)
{
    atomic_fetch_add_explicit(&st_reads, 1, memory_order_relaxed);
    return vc_file_read(h->file, h->fd, buf, size, off);
}

ssize_t vc_handle_write(vc_handle *h, const void *buf, size_t size, int64_t off)
{
    atomic_fetch_add_explicit(&st_writes, 1, memory_order_relaxed);
    return vc_file_write(h->file, h->fd, buf, size, off);
}

int vc_handle_size(vc_handle *h, int64_t *size)
{
    uint64_t s = 0;
    const int rc = file_size(h->fd, &s);
    *size = (int64_t)s;
    return rc;
}
