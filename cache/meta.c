// SPDX-License-Identifier: MIT
/*
 * The metadata file codec and its on-disk updates: two checksummed header
 * slots (A/B, newest valid generation wins) followed by the bitmap.  See
 * cache/cache_i.h for the layout.  Pure functions plus fd I/O; callers
 * serialise updates of one file.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache.h"
#include "cache_i.h"
#include "common/cleanup.h"
#include "common/endian.h"
#include "util.h"

uint32_t meta_crc32c(const void *data, size_t len)
{
	const uint8_t *p = data;
	uint32_t crc = 0xffffffffu;

	/* Bitwise: headers are small and rarely written. */
	while (len--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0x82f63b78u & (0u - (crc & 1u)));
	}
	return ~crc;
}

void meta_clear(struct meta *m)
{
	free(m->url);
	free(m->etag);
	free(m->last_modified);
	free(m->manifest_url);
	m->url = m->etag = m->last_modified = m->manifest_url = NULL;
}

static bool chunk_size_valid(uint32_t cs)
{
	return cs >= CACHE_CHUNK_MIN && cs <= CACHE_CHUNK_MAX && !(cs & (cs - 1));
}

int meta_encode(const struct meta *m, uint8_t *out)
{
	const char *etag = m->etag ? m->etag : "";
	const char *lm = m->last_modified ? m->last_modified : "";
	const char *man = m->manifest_url ? m->manifest_url : "";
	size_t ul, el, ll, ml;

	if (!m->url || !*m->url || m->size == 0 || m->size > (uint64_t)INT64_MAX ||
	    !chunk_size_valid(m->chunk_size))
		return -EINVAL;
	ul = strlen(m->url);
	el = strlen(etag);
	ll = strlen(lm);
	ml = strlen(man);
	if (ul > META_URL_MAX || el > META_ETAG_MAX || ll > META_LASTMOD_MAX ||
	    ml > META_MANIFEST_MAX)
		return -ENAMETOOLONG;

	size_t total = META_FIXED_SIZE + ul + el + ll + ml;
	memset(out, 0, META_SLOT_SIZE);
	memcpy(out, META_MAGIC, 8);
	put_le32(out + 8, META_VERSION);
	put_le32(out + 12, (uint32_t)total);
	put_le64(out + 16, m->generation);
	put_le64(out + 24, m->size);
	put_le32(out + 32, m->chunk_size);
	put_le32(out + 36, m->flags);
	put_le64(out + 40, m->speed);
	put_le16(out + 48, (uint16_t)ul);
	put_le16(out + 50, (uint16_t)el);
	put_le16(out + 52, (uint16_t)ll);
	put_le16(out + 54, (uint16_t)ml);
	uint8_t *s = out + META_FIXED_SIZE;
	memcpy(s, m->url, ul);
	memcpy(s + ul, etag, el);
	memcpy(s + ul + el, lm, ll);
	memcpy(s + ul + el + ll, man, ml);
	put_le32(out + 56, meta_crc32c(out, total));
	return 0;
}

static char *dup_field(const uint8_t *p, size_t n)
{
	char *s = malloc(n + 1);

	if (!s)
		return NULL;
	memcpy(s, p, n);
	s[n] = '\0';
	return s;
}

int meta_decode(const uint8_t *in, size_t len, struct meta *ret)
{
	uint8_t tmp[META_SLOT_SIZE];
	struct meta m = {0};

	if (len < META_FIXED_SIZE || memcmp(in, META_MAGIC, 8))
		return -EBADMSG;
	uint32_t total = get_le32(in + 12);
	if (total < META_FIXED_SIZE || total > len || total > META_SLOT_SIZE)
		return -EBADMSG;
	memcpy(tmp, in, total);
	put_le32(tmp + 56, 0);
	if (meta_crc32c(tmp, total) != get_le32(in + 56))
		return -EBADMSG;
	m.version = get_le32(in + 8);
	m.flags = get_le32(in + 36);
	/* Sealed by a newer streamfs: what else changed is not known here. */
	if (m.version != META_VERSION || (m.flags & ~META_FLAGS_KNOWN))
		return -EPROTONOSUPPORT;
	m.generation = get_le64(in + 16);
	m.size = get_le64(in + 24);
	m.chunk_size = get_le32(in + 32);
	m.speed = get_le64(in + 40);
	size_t ul = get_le16(in + 48), el = get_le16(in + 50), ll = get_le16(in + 52),
	       ml = get_le16(in + 54);
	if (META_FIXED_SIZE + ul + el + ll + ml != total || ul == 0 || ul > META_URL_MAX ||
	    el > META_ETAG_MAX || ll > META_LASTMOD_MAX || ml > META_MANIFEST_MAX)
		return -EBADMSG;
	/* Sizes must fit off_t: the image is a plain file of that size. */
	if (m.size == 0 || m.size > (uint64_t)INT64_MAX || !chunk_size_valid(m.chunk_size) ||
	    get_le32(in + 60))
		return -EBADMSG;
	const uint8_t *s = in + META_FIXED_SIZE;
	if (memchr(s, '\0', total - META_FIXED_SIZE))
		return -EBADMSG;
	m.url = dup_field(s, ul);
	m.etag = dup_field(s + ul, el);
	m.last_modified = dup_field(s + ul + el, ll);
	m.manifest_url = dup_field(s + ul + el + ll, ml);
	if (!m.url || !m.etag || !m.last_modified || !m.manifest_url) {
		meta_clear(&m);
		return -ENOMEM;
	}
	*ret = m;
	return 0;
}

uint64_t meta_file_size(const struct meta *m)
{
	uint64_t bytes = bitmap_bytes(meta_chunks(m));

	return META_BITMAP_OFFSET + (m->flags & META_FLAG_WRITTEN ? 2 * bytes : bytes);
}

/* Reads the bitmap of nbits bits stored at off into b (initialised here). */
static int load_bitmap(int fd, uint64_t off, uint64_t nbits, struct bitmap *b, const char *what,
		       char *why, size_t why_size)
{
	uint64_t nbytes = bitmap_bytes(nbits);
	int r = bitmap_init(b, nbits);

	if (r < 0) {
		snprintf(why, why_size, "cannot hold the %s: %s", what, strerror(-r));
		return r;
	}
	_cleanup_free_ uint8_t *bytes = malloc(nbytes ? nbytes : 1);
	if (!bytes) {
		snprintf(why, why_size, "cannot load %s: %s", what, strerror(ENOMEM));
		bitmap_destroy(b);
		return -ENOMEM;
	}
	r = full_pread(fd, bytes, nbytes, off);
	if (r >= 0)
		r = bitmap_load(b, bytes, nbytes);
	if (r < 0) {
		snprintf(why, why_size, "cannot load %s: %s", what, strerror(-r));
		bitmap_destroy(b);
	}
	return r;
}

int meta_load(int fd, struct meta *ret, struct bitmap *b, char *why, size_t why_size)
{
	uint8_t slot[2][META_SLOT_SIZE];
	struct meta best = {0};
	int best_slot = -1, r;
	struct stat st;

	if (fstat(fd, &st) < 0) {
		int e = errno;
		snprintf(why, why_size, "cannot stat metadata: %s", strerror(e));
		return -e;
	}
	if ((uint64_t)st.st_size < META_BITMAP_OFFSET) {
		snprintf(why, why_size, "metadata truncated (%lld bytes)", (long long)st.st_size);
		return -EBADMSG;
	}
	r = full_pread(fd, slot, sizeof(slot), 0);
	if (r < 0) {
		snprintf(why, why_size, "cannot read metadata: %s", strerror(-r));
		return r;
	}
	for (int i = 0; i < 2; i++) {
		struct meta m;
		r = meta_decode(slot[i], META_SLOT_SIZE, &m);
		if (r == -EPROTONOSUPPORT) {
			/* A newer streamfs wrote this disk (the checksum held):
			 * never fall back to the older slot and write beside it. */
			uint32_t version = get_le32(slot[i] + 8), flags = get_le32(slot[i] + 36);
			meta_clear(&best);
			if (version != META_VERSION)
				snprintf(why, why_size,
					 "unknown metadata version %" PRIu32
					 " (this build reads version %u)",
					 version, META_VERSION);
			else
				snprintf(why, why_size,
					 "unknown metadata flags %#" PRIx32
					 ", from a newer streamfs (this build knows %#x)",
					 flags & ~META_FLAGS_KNOWN, META_FLAGS_KNOWN);
			return r;
		}
		if (r < 0)
			continue;
		if (best_slot < 0 || m.generation > best.generation) {
			meta_clear(&best);
			best = m;
			best_slot = i;
		} else {
			meta_clear(&m);
		}
	}
	if (best_slot < 0) {
		if (memcmp(slot[0], META_MAGIC, 8) && memcmp(slot[1], META_MAGIC, 8))
			snprintf(why, why_size, "not a streamfs metadata file (bad magic)");
		else
			snprintf(why, why_size, "metadata header is corrupt (bad checksum or fields)");
		return -EBADMSG;
	}

	if ((uint64_t)st.st_size < meta_file_size(&best)) {
		snprintf(why, why_size, "metadata truncated (its bitmaps need %llu bytes, file has %lld)",
			 (unsigned long long)meta_file_size(&best), (long long)st.st_size);
		meta_clear(&best);
		return -EBADMSG;
	}
	r = load_bitmap(fd, META_BITMAP_OFFSET, meta_chunks(&best), b, "present-bitmap", why,
			why_size);
	if (r < 0) {
		meta_clear(&best);
		return r;
	}
	*ret = best;
	return 0;
}

int meta_load_written(int fd, const struct meta *m, struct bitmap *w, char *why,
		      size_t why_size)
{
	uint64_t chunks = meta_chunks(m);

	if (!(m->flags & META_FLAG_WRITTEN)) {
		int r = bitmap_init(w, chunks);
		if (r < 0)
			snprintf(why, why_size, "cannot hold the written-bitmap: %s", strerror(-r));
		return r;
	}
	return load_bitmap(fd, META_BITMAP_OFFSET + bitmap_bytes(chunks), chunks, w,
			   "written-bitmap", why, why_size);
}

int meta_store_header(int fd, struct meta *m)
{
	uint8_t buf[META_SLOT_SIZE];
	struct meta next = *m;
	int r;

	next.generation = m->generation + 1;
	r = meta_encode(&next, buf);
	if (r < 0)
		return r;
	/* Even generations live in slot 0, odd in slot 1: the write never
	 * touches the slot holding the current header. */
	r = full_pwrite(fd, buf, sizeof(buf), (next.generation & 1) * META_SLOT_SIZE);
	if (r < 0)
		return r;
	if (fdatasync(fd) < 0)
		return -errno;
	m->generation = next.generation;
	return 0;
}
