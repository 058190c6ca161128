// SPDX-License-Identifier: MIT
/*
 * Chunk manifest text format, parser and generator; see
 * include/manifest.h and streamfs-manifest(5).  The parser is fuzzed
 * (tests/fuzz/fuzz-manifest.c).  Any thread.
 *
 * Format:
 *   streamfs-manifest 1
 *   size <bytes>
 *   chunk_size <bytes>
 *   <64 hex digits> | zero      one line per chunk, in order
 * Lines end in '\n'; '#' lines and blank lines are ignored.
 */
#include <errno.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "manifest.h"
#include "util.h"

#define MANIFEST_CHUNK_MIN (64u * 1024)
#define MANIFEST_CHUNK_MAX (16u * 1024 * 1024)
/* A sanity bound: 2^32 chunks of 64 KiB is 256 TiB. */
#define MANIFEST_MAX_CHUNKS (1ull << 32)

void manifest_clear(struct manifest *m)
{
	free(m->hashes);
	memset(m, 0, sizeof(*m));
}

bool manifest_chunk_is_zero(const struct manifest *m, uint64_t idx)
{
	return idx < m->chunks &&
	       buf_is_zero(m->hashes + idx * MANIFEST_HASH_LEN, MANIFEST_HASH_LEN);
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Parses "key <u64>" exactly. */
static int keyed_number(const char *line, size_t n, const char *key, uint64_t *ret)
{
	char buf[32];
	size_t k = strlen(key);

	if (n <= k + 1 || strncmp(line, key, k) || line[k] != ' ' || n - k - 1 >= sizeof(buf))
		return -EBADMSG;
	memcpy(buf, line + k + 1, n - k - 1);
	buf[n - k - 1] = '\0';
	return parse_u64(buf, ret) < 0 ? -EBADMSG : 0;
}

int manifest_parse(const char *text, size_t len, struct manifest *ret, char *why,
		   size_t why_size)
{
	struct manifest m = {0};
	uint64_t lineno = 0, chunk = 0, v;
	unsigned header = 0;
	size_t pos = 0;

	while (pos < len) {
		const char *line = text + pos;
		const char *nl = memchr(line, '\n', len - pos);
		size_t n = nl ? (size_t)(nl - line) : len - pos;
		pos += n + (nl ? 1 : 0);
		lineno++;
		if (n && line[n - 1] == '\r')
			n--;
		if (n == 0 || line[0] == '#')
			continue;
		if (header == 0) {
			if (n != strlen(MANIFEST_MAGIC_LINE) || memcmp(line, MANIFEST_MAGIC_LINE, n)) {
				snprintf(why, why_size, "line %" PRIu64 ": not a streamfs manifest "
					 "(want '%s')", lineno, MANIFEST_MAGIC_LINE);
				goto bad;
			}
			header = 1;
			continue;
		}
		if (header == 1) {
			if (keyed_number(line, n, "size", &v) < 0 || v == 0) {
				snprintf(why, why_size, "line %" PRIu64 ": want 'size <bytes>'", lineno);
				goto bad;
			}
			m.size = v;
			header = 2;
			continue;
		}
		if (header == 2) {
			if (keyed_number(line, n, "chunk_size", &v) < 0 || v < MANIFEST_CHUNK_MIN ||
			    v > MANIFEST_CHUNK_MAX || (v & (v - 1))) {
				snprintf(why, why_size,
					 "line %" PRIu64 ": want 'chunk_size <power of two, 64K..16M>'",
					 lineno);
				goto bad;
			}
			m.chunk_size = (uint32_t)v;
			m.chunks = DIV_ROUND_UP(m.size, v);
			/* Each chunk line takes at least 5 bytes ("zero\n"): a
			 * size the text cannot back is refused before allocating. */
			if (m.chunks > MANIFEST_MAX_CHUNKS || m.chunks > (len - pos) / 4 + 1) {
				snprintf(why, why_size, "line %" PRIu64 ": the manifest is too short for "
					 "%" PRIu64 " chunks", lineno, m.chunks);
				goto bad;
			}
			m.hashes = calloc(m.chunks, MANIFEST_HASH_LEN);
			if (!m.hashes) {
				manifest_clear(&m);
				return -ENOMEM;
			}
			header = 3;
			continue;
		}
		if (chunk >= m.chunks) {
			snprintf(why, why_size, "line %" PRIu64 ": more chunk lines than the %" PRIu64
				 " chunks of %" PRIu64 " bytes", lineno, m.chunks, m.size);
			goto bad;
		}
		uint8_t *h = m.hashes + chunk * MANIFEST_HASH_LEN;
		if (n == 4 && !memcmp(line, "zero", 4)) {
			memset(h, 0, MANIFEST_HASH_LEN);
		} else if (n == 2 * MANIFEST_HASH_LEN) {
			for (unsigned i = 0; i < MANIFEST_HASH_LEN; i++) {
				int hi = hexval(line[2 * i]), lo = hexval(line[2 * i + 1]);
				if (hi < 0 || lo < 0) {
					snprintf(why, why_size, "line %" PRIu64 ": bad hex digit", lineno);
					goto bad;
				}
				h[i] = (uint8_t)(hi << 4 | lo);
			}
			if (buf_is_zero(h, MANIFEST_HASH_LEN)) {
				/* Reserved as the zero mark; no real chunk hashes to it. */
				snprintf(why, why_size, "line %" PRIu64 ": all-zero hash", lineno);
				goto bad;
			}
		} else {
			snprintf(why, why_size, "line %" PRIu64 ": want a SHA-256 in hex or 'zero'",
				 lineno);
			goto bad;
		}
		chunk++;
	}
	if (header < 3 || chunk != m.chunks) {
		snprintf(why, why_size, "manifest ends early: %s",
			 header < 3 ? "header incomplete" : "chunk lines missing");
		goto bad;
	}
	*ret = m;
	return 0;
bad:
	manifest_clear(&m);
	return -EBADMSG;
}

int manifest_sha256(const void *data, size_t len, uint8_t *out)
{
	unsigned int n = 0;

	if (!EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) || n != MANIFEST_HASH_LEN)
		return -EIO;
	return 0;
}

/* write(2) all of buf to a pipe, terminal or file; 0 or -errno. */
static int write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

int manifest_generate(int fd, uint64_t size, uint32_t chunk_size, int out_fd)
{
	char line[160];
	uint8_t h[MANIFEST_HASH_LEN];
	int r, n;

	_cleanup_free_ uint8_t *buf = malloc(chunk_size);
	if (!buf)
		return -ENOMEM;
	n = snprintf(line, sizeof(line), "%s\nsize %" PRIu64 "\nchunk_size %" PRIu32 "\n",
		     MANIFEST_MAGIC_LINE, size, chunk_size);
	r = write_all(out_fd, line, (size_t)n);
	for (uint64_t off = 0; r >= 0 && off < size; off += chunk_size) {
		size_t len = (size_t)MIN((uint64_t)chunk_size, size - off);
		r = full_pread(fd, buf, len, off);
		if (r < 0)
			break;
		if (buf_is_zero(buf, len)) {
			n = snprintf(line, sizeof(line), "zero\n");
		} else {
			r = manifest_sha256(buf, len, h);
			if (r < 0)
				break;
			for (unsigned i = 0; i < MANIFEST_HASH_LEN; i++)
				snprintf(line + 2 * i, 3, "%02x", h[i]);
			line[2 * MANIFEST_HASH_LEN] = '\n';
			n = 2 * MANIFEST_HASH_LEN + 1;
		}
		r = write_all(out_fd, line, (size_t)n);
	}
	return r;
}
