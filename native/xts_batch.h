/*
 * xts_batch: the vmfs-crypt sector cipher (docs/FORMAT.md section 3) over libcrypto EVP.
 *
 * XTS-AES-256 with 512-byte sectors, tweak = sector number as a 128-bit little-endian
 * integer (dm-crypt aes-xts-plain64). Only the last sector of a run may be partial:
 *   r >= 16 bytes: one XTS data unit of r bytes (ciphertext stealing), EVP aes-256-xts;
 *   1 <= r < 16:   XOR with the first r bytes of XTS-Encrypt(tweak(n), 16 zero bytes).
 * Byte-identical to vmfs_crypt/xts.py SectorCipher.
 *
 * Whole sectors are batched: one AES-256-ECB call under K2 encrypts the tweaks of up to
 * VC_XTS_BATCH_SECTORS sectors, the masks T_j = T_0 * alpha^j are computed by doubling in
 * GF(2^128), and the masked data goes through one AES-256-ECB pass under K1.
 *
 * Thread safety: a vc_xts may be used by any number of threads at once. Each call takes a
 * set of EVP contexts from a small mutex-protected pool (new sets are copies of template
 * contexts). The DEK itself is not kept: after key setup only the key schedules inside the
 * EVP contexts hold key material; EVP_CIPHER_CTX_free cleanses them.
 *
 * Pure C (no Python); every function returns 0 or a negative errno:
 *   -EINVAL  bad argument (equal DEK halves, sector range beyond 2^64-1, overlapping buffers)
 *   -ENOMEM  out of memory
 *   -EIO     libcrypto failed (the error queue is cleared)
 */
#ifndef VC_XTS_BATCH_H
#define VC_XTS_BATCH_H

#include <stddef.h>
#include <stdint.h>

#define VC_SECTOR_SIZE 512u
#define VC_XTS_BLOCK 16u
#define VC_DEK_SIZE 64u
#define VC_XTS_BATCH_SECTORS 32u /* 16 KiB per ECB pass: masks and data stay in L1/L2 */

typedef struct vc_xts vc_xts;

/* A new key object with one reference. `dek` = K1 || K2 (64 bytes); the caller should
 * cleanse its own copy. Returns -EINVAL if K1 == K2. */
int vc_xts_new(const uint8_t dek[VC_DEK_SIZE], vc_xts **out);
void vc_xts_ref(vc_xts *x);
void vc_xts_unref(vc_xts *x); /* frees (cleansing) on the last reference; NULL is a no-op */

/* A split key for a file in the middle of an in-place re-encryption (docs/FORMAT.md 7.8):
 * sectors below `boundary_sector` under `below`, the others under `above`; NULL stands for
 * plaintext (bytes copied unchanged). Takes a reference to each non-NULL part. */
int vc_xts_split_new(vc_xts *below, vc_xts *above, uint64_t boundary_sector, vc_xts **out);

/* Encrypt / decrypt `len` bytes of consecutive sectors starting at `first_sector`; only the
 * last may be partial. `in` and `out` must be the same buffer or not overlap. len == 0 is a
 * no-op (any first_sector). Sector numbers first_sector .. first_sector + ceil(len/512) - 1
 * must lie in 0 .. 2^64-1. */
int vc_xts_encrypt(vc_xts *x, uint64_t first_sector, const uint8_t *in, uint8_t *out, size_t len);
int vc_xts_decrypt(vc_xts *x, uint64_t first_sector, const uint8_t *in, uint8_t *out, size_t len);

/* Known-answer self-test (NIST CAVP XTSGenAES256 vectors and a whole-sector vector
 * cross-checked against one EVP XTS data unit per sector). 0 if it passes. */
int vc_xts_selftest(void);

/* The libcrypto version string in use (runtime, not headers). */
const char *vc_xts_openssl_version(void);

#endif
