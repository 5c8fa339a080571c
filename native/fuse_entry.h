/*
 * fuse_entry: read/write entry points with libfuse's `struct fuse_operations` signatures.
 *
 * They take fi->fh; a handle registered with vc_register is served natively (no Python);
 * any other handle goes to the FALLBACK function installed with vc_fuse_install (the
 * Python callback mfusepy had put into the table), or gets -EBADF if there is none.
 *
 * Two ABIs: libfuse 3 (FUSE_USE_VERSION 31; what the brief asks for) and libfuse 2.9
 * (what mfusepy loads by default when both are installed). The function signatures are
 * the same; `struct fuse_file_info` differs (fh sits at another offset).
 */
#ifndef VC_FUSE_ENTRY_H
#define VC_FUSE_ENTRY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Installs the fallbacks for ABI `fuse_major` (2 or 3; 0 addresses mean none) and gives
 * the addresses of that ABI's native read and write entries. -EINVAL for another major
 * or a fallback that is one of our own entries (it would recurse). */
int vc_fuse_install(int fuse_major, uintptr_t fallback_read, uintptr_t fallback_write, uintptr_t *native_read,
                    uintptr_t *native_write);

/* Test entry points: build a fuse_file_info of ABI `fuse_major` with fh and call that ABI's
 * FUSE entry (the very code libfuse calls). `path` may be NULL. */
int vc_fuse_call_read(int fuse_major, const char *path, uint64_t fh, char *buf, size_t size, int64_t off);
int vc_fuse_call_write(int fuse_major, const char *path, uint64_t fh, const char *buf, size_t size, int64_t off);

/* The libfuse headers the module was built against. */
int vc_fuse_header_version(void); /* FUSE_MAJOR_VERSION * 100 + FUSE_MINOR_VERSION */

#endif
