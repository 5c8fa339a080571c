/* Built against the libfuse 2.9 headers: calls an entry the way libfuse 2 does. */
#define _FILE_OFFSET_BITS 64
#define FUSE_USE_VERSION 26
#include <fuse.h>
#include <string.h>

#if FUSE_MAJOR_VERSION != 2
#error "fuse2_probe.c needs the libfuse 2 headers (pkg-config --cflags fuse)"
#endif

int fuse2_call(unsigned long entry, int is_write, unsigned long long fh, char *buf, size_t n, long long off);

int fuse2_call(unsigned long entry, int is_write, unsigned long long fh, char *buf, size_t n, long long off)
{
    struct fuse_file_info fi;
    memset(&fi, 0xA5, sizeof(fi)); /* garbage everywhere but fh: only fh may be read */
    fi.fh = fh;
    struct fuse_operations ops;
    memset(&ops, 0, sizeof(ops));
    if (is_write) {
        ops.write = (int (*)(const char *, const char *, size_t, off_t, struct fuse_file_info *))entry;
        return ops.write("/p2", buf, n, (off_t)off, &fi);
    }
    ops.read = (int (*)(const char *, char *, size_t, off_t, struct fuse_file_info *))entry;
    return ops.read("/p2", buf, n, (off_t)off, &fi);
}
