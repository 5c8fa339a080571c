/*
 * datapath: the native read/write path of vmfs-crypt, pure C on a file descriptor.
 *
 * Semantics are those of vmfs_crypt/fs.py `_read_plain` / `_write_plain` /
 * `_reencode_tail` (docs/FORMAT.md section 3), byte for byte in the backing file, plus the
 * rule "what is acknowledged is stored":
 *
 *  - read: sectors are read from the backing file and decrypted; an all-zero backing
 *    sector (also a partial last sector of r >= 16 bytes) is a hole and reads as zeros; a
 *    partial last sector of r < 16 bytes is always decrypted. A short backing read inside
 *    the file is a data fault: -EIO (logged).
 *  - write: read-modify-write of partial edge sectors; when the write lands past an old
 *    partial last sector, that sector is first re-encrypted for its new (full) length (or
 *    zeroed, when its plaintext is all zero). pwrite is looped until done or error. If the
 *    backing file stores only part of the encrypted region (ENOSPC, EDQUOT, EFBIG, ...),
 *    the write returns the count of the user bytes that lie in completely stored sectors,
 *    or the errno if there are none, and leaves the file well-formed: its size is put back
 *    (the old size, or the end of the last complete stored sector if that is larger), a
 *    re-encoded old tail sector gets its old encoding back, and a torn sector (stored in
 *    part) gets its old ciphertext back when the old ciphertext was read (edge sectors, the
 *    old partial last sector), else it is punched to a hole and the fault is logged (on
 *    block filesystems a torn interior sector can only be one that was a hole, i.e. zeros).
 *  - a plain file (no cipher) is a pread/pwrite passthrough, looped, with the same
 *    short-count rule (a count if anything was written, else the errno).
 *  - a revoked file refuses reads and writes with -EACCES.
 *
 * Locking: each file state has a reader/writer lock (many readers or one writer; a waiting
 * writer holds off new readers; not recursive) and sector spans under it. Reads and plain
 * writes take a shared span of their sectors (an online encrypt may give a plain file a
 * cipher: it takes the whole-file write lock), encrypted writes that keep the file size an
 * exclusive span (disjoint writes run in parallel; a read never sees a sector half
 * written), writes that grow the file the whole-file write lock. Code outside (Python's
 * truncate/fallocate, the online operation) takes the whole-file lock through vc_file_lock_*.
 *
 * All functions return >= 0 or a negative errno. No Python here.
 */
#ifndef VC_DATAPATH_H
#define VC_DATAPATH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "xts_batch.h"

typedef struct vc_file vc_file;
typedef struct vc_handle vc_handle;

/* -- file state --------------------------------------------------------------------- */
/* `cipher` NULL: a plain file. Takes its own reference on `cipher`. `name` (the display
 * name used in log records) is copied; it must not contain NUL. */
int vc_file_new(vc_xts *cipher, const char *name, vc_file **out);
void vc_file_ref(vc_file *f);
void vc_file_unref(vc_file *f);
vc_xts *vc_file_cipher(const vc_file *f); /* borrowed; NULL for a plain file */
/* Serve an encrypted file under another cipher from now on (a file emptied and given a new
 * DEK: issue 7, case 8). The caller must hold the file's write lock: -EPERM otherwise, and
 * for a plain file; -EINVAL for a NULL cipher. Takes a reference on `cipher`. */
int vc_file_set_cipher(vc_file *f, vc_xts *cipher);
void vc_file_set_revoked(vc_file *f, int revoked);
int vc_file_revoked(const vc_file *f);
int vc_file_set_name(vc_file *f, const char *name);
/* Copies the name (NUL-terminated, truncated to n-1 bytes); returns its full length. */
size_t vc_file_name(vc_file *f, char *buf, size_t n);

void vc_file_lock_read(vc_file *f);
int vc_file_unlock_read(vc_file *f); /* -EPERM if no reader holds it */
void vc_file_lock_write(vc_file *f);
int vc_file_unlock_write(vc_file *f); /* -EPERM if no writer holds it */
/* The hot zone of an online re-encryption (issue 10): while set, the *_span functions (the
 * data path's: vc_file_read/write take them) wait as long as the request touches a sector
 * of bytes [lo, hi); the plain lock functions ignore it (the operation itself, and
 * control-plane code). Set and cleared by the holder of the write lock (-EPERM otherwise);
 * -EINVAL unless lo < hi and lo is a sector boundary. Waiters wake at the write unlock. */
void vc_file_lock_read_span(vc_file *f, uint64_t off, uint64_t size);
void vc_file_lock_write_span(vc_file *f, uint64_t off, uint64_t size);
/* Sector-span locks of the data path (issue 13): the sectors of bytes [off, off + size),
 * shared (excl 0: a read, a plain write) or exclusive (a write that keeps the file size).
 * Spans exclude each other only where they overlap and one is exclusive; they wait for
 * the hot zone like the *_span functions; the whole-file write lock waits for every span
 * and holds off new ones while it waits; an exclusive span also waits for whole-file
 * readers (vc_file_lock_read). At most VC_SPAN_SLOTS at once (more wait). Returns the slot
 * to pass to vc_file_unlock_sectors (-EPERM for a slot not held). */
#define VC_SPAN_SLOTS 32
int vc_file_lock_sectors(vc_file *f, uint64_t off, uint64_t size, int excl);
int vc_file_unlock_sectors(vc_file *f, int slot);
int vc_file_set_hot(vc_file *f, uint64_t lo, uint64_t hi);
int vc_file_clear_hot(vc_file *f);

/* The data path on a file and a descriptor (the handle functions below call these). */
ssize_t vc_file_read(vc_file *f, int fd, void *buf, size_t size, int64_t off);
ssize_t vc_file_write(vc_file *f, int fd, const void *buf, size_t size, int64_t off);

/* -- handle table: FUSE fh -> {fd, file state} -------------------------------------- */
/* Registers a duplicate of `fd` (F_DUPFD_CLOEXEC) with `f` (a new reference) under `fh`:
 * the caller may close its own descriptor at any time. -EEXIST if `fh` is registered. */
int vc_register(uint64_t fh, int fd, vc_file *f);
/* Removes `fh`; requests in flight on it finish on their own references (the duplicate
 * descriptor closes with the last one). -ENOENT if not registered. */
int vc_unregister(uint64_t fh);
vc_handle *vc_handle_get(uint64_t fh); /* a new reference, or NULL if not registered */
void vc_handle_put(vc_handle *h);
ssize_t vc_handle_read(vc_handle *h, void *buf, size_t size, int64_t off);
ssize_t vc_handle_write(vc_handle *h, const void *buf, size_t size, int64_t off);
int vc_handle_size(vc_handle *h, int64_t *size); /* fstat size of the backing file */

/* -- log hook and counters ---------------------------------------------------------- */
/* Called (from the thread that hit it, with no lock held) with one line describing a
 * data fault: file display name, operation, byte offset and sector. No key material.
 * NULL restores the default (a line on stderr). */
typedef void (*vc_log_fn)(const char *message);
void vc_set_log_hook(vc_log_fn fn);

struct vc_stats {
    uint64_t reads, writes;                  /* requests served natively */
    uint64_t fallback_reads, fallback_writes; /* requests passed to the fallback */
    uint64_t faults;                          /* data faults logged */
    uint64_t short_writes;                    /* writes that stored less than asked */
    uint64_t split_requests;                  /* requests served on two threads (the helper) */
};
void vc_stats_get(struct vc_stats *out);
void vc_stats_count_fallback(int write);

#endif
