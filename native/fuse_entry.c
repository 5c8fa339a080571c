/* fuse_entry.c: FUSE read/write entries that serve registered handles natively. */
#define _FILE_OFFSET_BITS 64
#define FUSE_USE_VERSION 31
#include <fuse.h> /* libfuse 3: pkg-config --cflags fuse3 puts /usr/include/fuse3 first */

#include "fuse_entry.h"

#include "datapath.h"

#include <errno.h>
#include <limits.h>
#include <stdatomic.h>
#include <string.h>

#if !defined(FUSE_MAJOR_VERSION) || FUSE_MAJOR_VERSION != 3
#error "fuse_entry.c must be built against the libfuse 3 headers (pkg-config --cflags fuse3)"
#endif

_Static_assert(sizeof(off_t) == 8, "libfuse needs a 64-bit off_t");

/* libfuse 2.9's struct fuse_file_info (include/fuse/fuse_common.h of libfuse 2.9.9),
 * up to fh: the only member read here. native/tests/test_fuse2_layout.c checks it against
 * the real header, tests/test_native.py against mfusepy's ctypes layout. */
struct vc_fuse2_file_info {
    int flags;
    unsigned long fh_old;
    int writepage;
    unsigned int direct_io : 1, keep_cache : 1, flush : 1, nonseekable : 1, flock_release : 1, padding : 27;
    uint64_t fh;
    uint64_t lock_owner;
};

typedef int (*read3_fn)(const char *, char *, size_t, off_t, struct fuse_file_info *);
typedef int (*write3_fn)(const char *, const char *, size_t, off_t, struct fuse_file_info *);
typedef int (*read2_fn)(const char *, char *, size_t, off_t, struct vc_fuse2_file_info *);
typedef int (*write2_fn)(const char *, const char *, size_t, off_t, struct vc_fuse2_file_info *);

static _Atomic(read3_fn) fb_read3;
static _Atomic(write3_fn) fb_write3;
static _Atomic(read2_fn) fb_read2;
static _Atomic(write2_fn) fb_write2;

/* libfuse returns int: a read larger than INT_MAX (never asked for) is served in part;
 * a write that large is refused. */
#define MAX_READ ((size_t)INT_MAX & ~(size_t)511)

static int serve_read(uint64_t fh, char *buf, size_t size, off_t off, int *served)
{
    vc_handle *h = vc_handle_get(fh);
    *served = h != NULL;
    if (h == NULL)
        return 0;
    const ssize_t r = vc_handle_read(h, buf, size > MAX_READ ? MAX_READ : size, (int64_t)off);
    vc_handle_put(h);
    return (int)r;
}

static int serve_write(uint64_t fh, const char *buf, size_t size, off_t off, int *served)
{
    vc_handle *h = vc_handle_get(fh);
    *served = h != NULL;
    if (h == NULL)
        return 0;
    const ssize_t r = size > (size_t)INT_MAX ? -EINVAL : vc_handle_write(h, buf, size, (int64_t)off);
    vc_handle_put(h);
    return (int)r;
}

static int vc_fuse3_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
    int served = 0;
    if (fi != NULL) {
        const int r = serve_read(fi->fh, buf, size, off, &served);
        if (served)
            return r;
    }
    vc_stats_count_fallback(0);
    read3_fn fb = atomic_load_explicit(&fb_read3, memory_order_acquire);
    return fb != NULL ? fb(path, buf, size, off, fi) : -EBADF;
}

static int vc_fuse3_write(const char *path, const char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
    int served = 0;
    if (fi != NULL) {
        const int r = serve_write(fi->fh, buf, size, off, &served);
        if (served)
            return r;
    }
    vc_stats_count_fallback(1);
    write3_fn fb = atomic_load_explicit(&fb_write3, memory_order_acquire);
    return fb != NULL ? fb(path, buf, size, off, fi) : -EBADF;
}

static int vc_fuse2_read(const char *path, char *buf, size_t size, off_t off, struct vc_fuse2_file_info *fi)
{
    int served = 0;
    if (fi != NULL) {
        const int r = serve_read(fi->fh, buf, size, off, &served);
        if (served)
            return r;
    }
    vc_stats_count_fallback(0);
    read2_fn fb = atomic_load_explicit(&fb_read2, memory_order_acquire);
    return fb != NULL ? fb(path, buf, size, off, fi) : -EBADF;
}

static int vc_fuse2_write(const char *path, const char *buf, size_t size, off_t off, struct vc_fuse2_file_info *fi)
{
    int served = 0;
    if (fi != NULL) {
        const int r = serve_write(fi->fh, buf, size, off, &served);
        if (served)
            return r;
    }
    vc_stats_count_fallback(1);
    write2_fn fb = atomic_load_explicit(&fb_write2, memory_order_acquire);
    return fb != NULL ? fb(path, buf, size, off, fi) : -EBADF;
}

/* The ops table's own types, checked at compile time against struct fuse_operations. */
static const struct fuse_operations signature_check = {.read = vc_fuse3_read, .write = vc_fuse3_write};

int vc_fuse_install(int fuse_major, uintptr_t fallback_read, uintptr_t fallback_write, uintptr_t *native_read,
                    uintptr_t *native_write)
{
    (void)signature_check;
    const uintptr_t own[] = {(uintptr_t)vc_fuse3_read, (uintptr_t)vc_fuse3_write, (uintptr_t)vc_fuse2_read,
                             (uintptr_t)vc_fuse2_write};
    for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
        if ((fallback_read != 0 && fallback_read == own[i]) || (fallback_write != 0 && fallback_write == own[i]))
            return -EINVAL;
    if (fuse_major == 3) {
        atomic_store_explicit(&fb_read3, (read3_fn)fallback_read, memory_order_release);
        atomic_store_explicit(&fb_write3, (write3_fn)fallback_write, memory_order_release);
        *native_read = (uintptr_t)vc_fuse3_read;
        *native_write = (uintptr_t)vc_fuse3_write;
        return 0;
    }
    if (fuse_major == 2) {
        atomic_store_explicit(&fb_read2, (read2_fn)fallback_read, memory_order_release);
        atomic_store_explicit(&fb_write2, (write2_fn)fallback_write, memory_order_release);
        *native_read = (uintptr_t)vc_fuse2_read;
        *native_write = (uintptr_t)vc_fuse2_write;
        return 0;
    }
    return -EINVAL;
}

int vc_fuse_call_read(int fuse_major, const char *path, uint64_t fh, char *buf, size_t size, int64_t off)
{
    if (fuse_major == 2) {
        struct vc_fuse2_file_info fi;
        memset(&fi, 0, sizeof(fi));
        fi.fh = fh;
        return vc_fuse2_read(path, buf, size, (off_t)off, &fi);
    }
    struct fuse_file_info fi;
    memset(&fi, 0, sizeof(fi));
    fi.fh = fh;
    return vc_fuse3_read(path, buf, size, (off_t)off, &fi);
}

int vc_fuse_call_write(int fuse_major, const char *path, uint64_t fh, const char *buf, size_t size, int64_t off)
{
    if (fuse_major == 2) {
        struct vc_fuse2_file_info fi;
        memset(&fi, 0, sizeof(fi));
        fi.fh = fh;
        return vc_fuse2_write(path, buf, size, (off_t)off, &fi);
    }
    struct fuse_file_info fi;
    memset(&fi, 0, sizeof(fi));
    fi.fh = fh;
    return vc_fuse3_write(path, buf, size, (off_t)off, &fi);
}

int vc_fuse_header_version(void)
{
    return FUSE_MAJOR_VERSION * 100 + FUSE_MINOR_VERSION;
}
