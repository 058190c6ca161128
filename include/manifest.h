/* SPDX-License-Identifier: MIT */
/*
 * Chunk manifests (see streamfs-manifest(5)): the template's size, chunk
 * size, and per chunk its SHA-256 or a mark that it is all zeros.  Text
 * parser and writer, SHA-256 through OpenSSL's EVP interface.  Pure
 * functions apart from the fd I/O of manifest_generate; any thread.
 */
#ifndef STREAMFS_MANIFEST_H
#define STREAMFS_MANIFEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MANIFEST_HASH_LEN 32
#define MANIFEST_MAGIC_LINE "streamfs-manifest 1"

struct manifest {
	uint64_t size;       /* template size in bytes, > 0 */
	uint32_t chunk_size; /* bytes, power of two, 64 KiB..16 MiB */
	uint64_t chunks;     /* DIV_ROUND_UP(size, chunk_size) */
	uint8_t *hashes;     /* chunks * 32 bytes; all-zero entry = zero chunk; owned */
};

/*
 * Parses a text manifest of len bytes.  Returns 0 and fills *ret (free with
 * manifest_clear), -EBADMSG with a reason naming the line in why for any
 * malformed input, -ENOMEM.
 */
int manifest_parse(const char *text, size_t len, struct manifest *ret, char *why,
		   size_t why_size) __attribute__((warn_unused_result));

void manifest_clear(struct manifest *m);

/* True when chunk idx is marked all-zero. */
bool manifest_chunk_is_zero(const struct manifest *m, uint64_t idx);

/* SHA-256 of len bytes into out (32 bytes). Returns 0 or -EIO. */
int manifest_sha256(const void *data, size_t len, uint8_t *out) __attribute__((warn_unused_result));

/*
 * Reads the file fd (size bytes) chunk by chunk and writes its text
 * manifest to out_fd.  Returns 0 or -errno.
 */
int manifest_generate(int fd, uint64_t size, uint32_t chunk_size, int out_fd)
	__attribute__((warn_unused_result));

#endif
