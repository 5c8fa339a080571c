/* test_fuse_abi: the native entries called through real `struct fuse_operations` tables
 * with real `struct fuse_file_info`s of libfuse 3 (this file) and 2.9 (fuse2_probe.c). */
#define _GNU_SOURCE
#define _FILE_OFFSET_BITS 64
#define FUSE_USE_VERSION 31
#include <fuse.h>

#include "harness.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "datapath.h"
#include "fuse_entry.h"

int fuse2_call(unsigned long entry, int is_write, unsigned long long fh, char *buf, size_t n, long long off);

static int fallbacks;

static int fb_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void)path;
    (void)off;
    (void)fi;
    fallbacks++;
    memset(buf, 'F', size);
    return (int)size;
}

int main(void)
{
    char path[] = "/tmp/vc-fuse-abi-XXXXXX";
    const int fd = mkstemp(path);
    CHECK(fd >= 0 && unlink(path) == 0);
    uint8_t dek[64];
    for (int i = 0; i < 64; i++)
        dek[i] = (uint8_t)(i * 3 + 1);
    vc_xts *x = NULL;
    vc_file *f = NULL;
    CHECK_EQ(vc_xts_new(dek, &x), 0);
    CHECK_EQ(vc_file_new(x, "abi", &f), 0);
    vc_xts_unref(x);
    const uint64_t fh = UINT64_C(0x1122334455667788); /* all 8 bytes matter */
    CHECK_EQ(vc_register(fh, fd, f), 0);
    char buf[1000], back[1000];
    memset(buf, 'n', sizeof(buf));

    /* libfuse 3 */
    uintptr_t r3 = 0, w3 = 0;
    CHECK_EQ(vc_fuse_install(3, (uintptr_t)fb_read, 0, &r3, &w3), 0);
    struct fuse_operations ops;
    memset(&ops, 0, sizeof(ops));
    ops.read = (int (*)(const char *, char *, size_t, off_t, struct fuse_file_info *))r3;
    ops.write = (int (*)(const char *, const char *, size_t, off_t, struct fuse_file_info *))w3;
    struct fuse_file_info fi;
    memset(&fi, 0xA5, sizeof(fi));
    fi.fh = fh;
    CHECK_EQ(ops.write("/p3", buf, sizeof(buf), 3, &fi), (int)sizeof(buf));
    CHECK_EQ(ops.read("/p3", back, sizeof(back), 3, &fi), (int)sizeof(back));
    CHECK(memcmp(back, buf, sizeof(buf)) == 0);
    fi.fh = fh ^ 1;
    CHECK_EQ(ops.read("/p3", back, 10, 0, &fi), 10);
    CHECK(back[0] == 'F' && fallbacks == 1);

    /* libfuse 2.9 */
    uintptr_t r2 = 0, w2 = 0;
    CHECK_EQ(vc_fuse_install(2, 0, 0, &r2, &w2), 0);
    CHECK(r2 != r3 && w2 != w3);
    memset(buf, 'm', sizeof(buf));
    CHECK_EQ(fuse2_call(w2, 1, fh, buf, sizeof(buf), 2000), (int)sizeof(buf));
    CHECK_EQ(fuse2_call(r2, 0, fh, back, sizeof(back), 2000), (int)sizeof(back));
    CHECK(memcmp(back, buf, sizeof(buf)) == 0);
    CHECK_EQ(fuse2_call(r2, 0, fh ^ 1, back, 10, 0), -EBADF); /* no fallback for ABI 2 */

    CHECK_EQ(vc_unregister(fh), 0);
    CHECK(close(fd) == 0);
    vc_file_unref(f);
    if (harness_failures)
        return 1;
    printf("test_fuse_abi: ok (libfuse %d.%d headers and 2.9)\n", vc_fuse_header_version() / 100,
           vc_fuse_header_version() % 100);
    return 0;
}
