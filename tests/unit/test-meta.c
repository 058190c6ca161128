// SPDX-License-Identifier: MIT
/*
 * Unit tests for the metadata codec and file updates of cache/meta.c
 * (cache/cache_i.h): encode/decode of one header slot, rejection of
 * corrupt or unknown-version slots, and meta_load/meta_store_header on a
 * real temporary file (A/B slots, fallback to the older slot, truncation).
 * Single-threaded; files live in $TMPDIR (or /tmp) and are unlinked.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "unit.h"

#include "cache.h"
#include "cache/cache_i.h"
#include "util.h"



/* Header field offsets, from the layout in cache/cache_i.h. */
enum {
	OFF_MAGIC = 0,
	OFF_VERSION = 8,
	OFF_LENGTH = 12,
	OFF_GENERATION = 16,
	OFF_SIZE = 24,
	OFF_CHUNK = 32,
	OFF_FLAGS = 36,
	OFF_SPEED = 40,
	OFF_URL_LEN = 48,
	OFF_ETAG_LEN = 50,
	OFF_LM_LEN = 52,
	OFF_MAN_LEN = 54,
	OFF_CRC = 56,
	OFF_RESERVED = 60,
};

static void put_le(uint8_t *p, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, int n)
{
	uint64_t v = 0;
	for (int i = n - 1; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

/* Recomputes the CRC of a slot after a deliberate patch. */
static void reseal(uint8_t *slot)
{
	uint32_t len = (uint32_t)get_le(slot + OFF_LENGTH, 4);

	assert_true(len <= META_SLOT_SIZE);
	put_le(slot + OFF_CRC, 0, 4);
	put_le(slot + OFF_CRC, meta_crc32c(slot, len), 4);
}

static char *repeat(char c, size_t n)
{
	char *s = malloc(n + 1);

	assert_non_null(s);
	memset(s, c, n);
	s[n] = '\0';
	return s;
}

static const struct meta base = {
	.version = META_VERSION,
	.generation = 0,
	.size = 10 * 65536 + 1, /* 11 chunks: a 2-byte bitmap with padding */
	.chunk_size = 65536,
	.flags = 0,
	.speed = 0,
	.url = (char *)"https://images.example/t/debian-12.raw",
	.etag = (char *)"\"5f2b-1a\"",
	.last_modified = (char *)"Tue, 03 Jan 2023 10:00:00 GMT",
	.manifest_url = (char *)"https://images.example/t/debian-12.raw.manifest",
};

static void encode_base(uint8_t *slot)
{
	assert_int_equal(meta_encode(&base, slot), 0);
}

/* --- CRC and layout --- */

static void test_meta__crc32c(void **state)
{
	static const struct {
		const char *in;
		uint32_t crc;
	} rows[] = {
		{"", 0x00000000u},
		{"a", 0xc1d04330u},
		{"123456789", 0xe3069283u}, /* the CRC-32C check value */
	};

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++)
		assert_int_equal(meta_crc32c(rows[i].in, strlen(rows[i].in)), rows[i].crc);
	uint8_t zeros[32] = {0};
	assert_int_equal(meta_crc32c(zeros, sizeof(zeros)), 0x8a9136aau);
}

/* Fixed-width little-endian fields where the layout says. */
static void test_meta__layout(void **state)
{
	uint8_t slot[META_SLOT_SIZE];
	struct meta m = base;
	size_t ul = strlen(m.url), el = strlen(m.etag), ll = strlen(m.last_modified),
	       ml = strlen(m.manifest_url);
	size_t total = META_FIXED_SIZE + ul + el + ll + ml;

	(void)state;
	m.generation = UINT64_C(0x0102030405060708);
	m.size = UINT64_C(0x1112131415161718);
	m.chunk_size = 1u << 20;
	m.flags = META_FLAG_COMPLETE;
	m.speed = UINT64_C(0x2122232425262728);
	memset(slot, 0xaa, sizeof(slot));
	assert_int_equal(meta_encode(&m, slot), 0);

	assert_memory_equal(slot + OFF_MAGIC, "STRMFSMD", 8);
	assert_int_equal(get_le(slot + OFF_VERSION, 4), META_VERSION);
	assert_int_equal(get_le(slot + OFF_LENGTH, 4), total);
	static const uint8_t gen_le[8] = {8, 7, 6, 5, 4, 3, 2, 1};
	assert_memory_equal(slot + OFF_GENERATION, gen_le, 8);
	assert_int_equal(get_le(slot + OFF_SIZE, 8), m.size);
	assert_int_equal(get_le(slot + OFF_CHUNK, 4), 1u << 20);
	assert_int_equal(get_le(slot + OFF_FLAGS, 4), META_FLAG_COMPLETE);
	assert_int_equal(get_le(slot + OFF_SPEED, 8), m.speed);
	assert_int_equal(get_le(slot + OFF_URL_LEN, 2), ul);
	assert_int_equal(get_le(slot + OFF_ETAG_LEN, 2), el);
	assert_int_equal(get_le(slot + OFF_LM_LEN, 2), ll);
	assert_int_equal(get_le(slot + OFF_MAN_LEN, 2), ml);
	assert_int_equal(get_le(slot + OFF_RESERVED, 4), 0);
	/* strings back to back, no terminators */
	const uint8_t *s = slot + META_FIXED_SIZE;
	assert_memory_equal(s, m.url, ul);
	assert_memory_equal(s + ul, m.etag, el);
	assert_memory_equal(s + ul + el, m.last_modified, ll);
	assert_memory_equal(s + ul + el + ll, m.manifest_url, ml);
	/* CRC over the header with the CRC field zero */
	uint8_t copy[META_SLOT_SIZE];
	memcpy(copy, slot, total);
	put_le(copy + OFF_CRC, 0, 4);
	assert_int_equal(get_le(slot + OFF_CRC, 4), meta_crc32c(copy, total));
	/* unused bytes zeroed */
	for (size_t k = total; k < META_SLOT_SIZE; k++)
		if (slot[k])
			fail_msg("byte %zu past the header is 0x%02x, want 0", k, slot[k]);
}

/* --- round trip --- */

static void test_meta__round_trip(void **state)
{
	char *url_max = repeat('u', META_URL_MAX), *etag_max = repeat('e', META_ETAG_MAX),
	     *lm_max = repeat('l', META_LASTMOD_MAX), *man_max = repeat('m', META_MANIFEST_MAX);
	memcpy(url_max, "http://", 7);
	const struct meta rows[] = {
		base,
		/* minimal: NULL validators decode as "" */
		{.size = 1, .chunk_size = CACHE_CHUNK_MIN, .url = (char *)"file:///t.raw"},
		{.size = 1, .chunk_size = CACHE_CHUNK_MAX, .url = (char *)"u", .etag = (char *)"",
		 .last_modified = (char *)"", .manifest_url = (char *)""},
		/* every numeric field at its extreme */
		{.generation = UINT64_MAX, .size = INT64_MAX, .chunk_size = 1u << 20,
		 .flags = META_FLAG_COMPLETE, .speed = UINT64_MAX, .url = (char *)"http://h/x"},
		{.size = 2, .chunk_size = 1u << 21, .flags = META_FLAG_MANIFEST,
		 .url = (char *)"http://h/x", .manifest_url = (char *)"http://h/x.manifest"},
		{.size = 3, .chunk_size = 1u << 22, .flags = META_FLAGS_KNOWN,
		 .url = (char *)"http://h/x"},
		{.generation = 1, .size = (UINT64_C(1) << 40) + 12345, .chunk_size = 4u << 20,
		 .flags = 0, .speed = 10 * 1024 * 1024, .url = (char *)"https://u:p@h/x?t=1",
		 .etag = (char *)"W/\"x\""},
		/* every string at its maximum length */
		{.size = 123, .chunk_size = 65536, .url = url_max, .etag = etag_max,
		 .last_modified = lm_max, .manifest_url = man_max},
		/* bytes outside ASCII pass through */
		{.size = 5, .chunk_size = 131072, .url = (char *)"http://h/\xc3\xa9\x01\x7f\xff",
		 .etag = (char *)"\t \xff"},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		const struct meta *m = &rows[i];
		uint8_t slot[META_SLOT_SIZE];
		struct meta d = {0};

		assert_int_equal(meta_encode(m, slot), 0);
		size_t total = (size_t)get_le(slot + OFF_LENGTH, 4);
		/* decodes from the full slot and from exactly the header bytes */
		for (int exact = 0; exact < 2; exact++) {
			int r = meta_decode(slot, exact ? total : META_SLOT_SIZE, &d);
			EXPECT(bad, r == 0, "row %zu (exact %d): decode = %d", i, exact, r);
			if (r)
				continue;
			EXPECT(bad, d.version == META_VERSION, "row %zu: version %u", i, d.version);
			EXPECT(bad, d.generation == m->generation, "row %zu: generation", i);
			EXPECT(bad, d.size == m->size, "row %zu: size", i);
			EXPECT(bad, d.chunk_size == m->chunk_size, "row %zu: chunk_size", i);
			EXPECT(bad, d.flags == m->flags, "row %zu: flags", i);
			EXPECT(bad, d.speed == m->speed, "row %zu: speed", i);
			EXPECT(bad, d.url && !strcmp(d.url, m->url), "row %zu: url", i);
			EXPECT(bad, d.etag && !strcmp(d.etag, m->etag ? m->etag : ""), "row %zu: etag",
			       i);
			EXPECT(bad,
			       d.last_modified &&
				       !strcmp(d.last_modified, m->last_modified ? m->last_modified : ""),
			       "row %zu: last_modified", i);
			EXPECT(bad,
			       d.manifest_url &&
				       !strcmp(d.manifest_url, m->manifest_url ? m->manifest_url : ""),
			       "row %zu: manifest_url", i);
			meta_clear(&d);
			EXPECT(bad, !d.url && !d.etag && !d.last_modified && !d.manifest_url,
			       "row %zu: meta_clear left pointers", i);
		}
	}
	free(url_max);
	free(etag_max);
	free(lm_max);
	free(man_max);
	assert_int_equal(bad, 0);
}

/* --- encode rejects --- */

static void test_meta__encode_rejects(void **state)
{
	char *url_long = repeat('u', META_URL_MAX + 1), *etag_long = repeat('e', META_ETAG_MAX + 1),
	     *lm_long = repeat('l', META_LASTMOD_MAX + 1),
	     *man_long = repeat('m', META_MANIFEST_MAX + 1);
	struct {
		const char *what;
		struct meta m;
		int ret;
	} rows[] = {
		{"NULL url", base, -EINVAL},
		{"empty url", base, -EINVAL},
		{"size 0", base, -EINVAL},
		{"chunk 0", base, -EINVAL},
		{"chunk 32K", base, -EINVAL},
		{"chunk 32M", base, -EINVAL},
		{"chunk 64K+1", base, -EINVAL},
		{"chunk 100000", base, -EINVAL},
		{"chunk 3<<16", base, -EINVAL},
		{"chunk 2^31", base, -EINVAL},
		{"url too long", base, -ENAMETOOLONG},
		{"etag too long", base, -ENAMETOOLONG},
		{"last-modified too long", base, -ENAMETOOLONG},
		{"manifest too long", base, -ENAMETOOLONG},
	};
	int bad = 0;

	(void)state;
	rows[0].m.url = NULL;
	rows[1].m.url = (char *)"";
	rows[2].m.size = 0;
	rows[3].m.chunk_size = 0;
	rows[4].m.chunk_size = 32768;
	rows[5].m.chunk_size = 32u << 20;
	rows[6].m.chunk_size = 65537;
	rows[7].m.chunk_size = 100000;
	rows[8].m.chunk_size = 3u << 16;
	rows[9].m.chunk_size = 1u << 31;
	rows[10].m.url = url_long;
	rows[11].m.etag = etag_long;
	rows[12].m.last_modified = lm_long;
	rows[13].m.manifest_url = man_long;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		uint8_t slot[META_SLOT_SIZE];
		int r = meta_encode(&rows[i].m, slot);
		EXPECT(bad, r == rows[i].ret, "meta_encode(%s) = %d, want %d", rows[i].what, r,
		       rows[i].ret);
	}
	free(url_long);
	free(etag_long);
	free(lm_long);
	free(man_long);
	assert_int_equal(bad, 0);
}

/* --- decode rejects --- */

struct patch_row {
	const char *what;
	int off;       /* field offset, or a string offset past META_FIXED_SIZE */
	int width;     /* bytes */
	uint64_t value;
	bool reseal;   /* recompute the CRC, so that only the field is wrong */
	int ret;
};

static void check_patch_rows(const struct patch_row *rows, size_t n)
{
	int bad = 0;

	for (size_t i = 0; i < n; i++) {
		uint8_t slot[META_SLOT_SIZE];
		struct meta d = {0};

		encode_base(slot);
		put_le(slot + rows[i].off, rows[i].value, rows[i].width);
		if (rows[i].reseal)
			reseal(slot);
		int r = meta_decode(slot, sizeof(slot), &d);
		EXPECT(bad, r == rows[i].ret, "decode with %s = %d, want %d", rows[i].what, r,
		       rows[i].ret);
		if (r == 0)
			meta_clear(&d);
		else
			EXPECT(bad, d.url == NULL, "decode with %s filled *ret on failure",
			       rows[i].what);
	}
	assert_int_equal(bad, 0);
}

/* The lowest flag bit this build does not know. */
#define LOWEST_UNKNOWN_FLAG ((uint32_t)~META_FLAGS_KNOWN & (0u - (uint32_t)~META_FLAGS_KNOWN))

static void test_meta__decode_rejects_fields(void **state)
{
	size_t ul = strlen(base.url), el = strlen(base.etag);
	const struct patch_row rows[] = {
		/* magic: every byte matters, checksum or not */
		{"magic byte 0", OFF_MAGIC, 1, 's', true, -EBADMSG},
		{"magic byte 7", OFF_MAGIC + 7, 1, 'X', true, -EBADMSG},
		{"zero magic", OFF_MAGIC, 8, 0, true, -EBADMSG},
		/* a known version with a valid checksum is the control row */
		{"version 1, resealed", OFF_VERSION, 4, 1, true, 0},
		{"version 0", OFF_VERSION, 4, 0, true, -EPROTONOSUPPORT},
		{"version 2", OFF_VERSION, 4, 2, true, -EPROTONOSUPPORT},
		{"version 0xffffffff", OFF_VERSION, 4, 0xffffffffu, true, -EPROTONOSUPPORT},
		/* but an unsealed version change is corruption */
		{"version 2, not resealed", OFF_VERSION, 4, 2, false, -EBADMSG},
		/* sizes */
		{"size 0", OFF_SIZE, 8, 0, true, -EBADMSG},
		{"chunk 0", OFF_CHUNK, 4, 0, true, -EBADMSG},
		{"chunk 32K", OFF_CHUNK, 4, 32768, true, -EBADMSG},
		{"chunk 32M", OFF_CHUNK, 4, 32u << 20, true, -EBADMSG},
		{"chunk 65537", OFF_CHUNK, 4, 65537, true, -EBADMSG},
		{"chunk 3<<16", OFF_CHUNK, 4, 3u << 16, true, -EBADMSG},
		{"chunk 16M", OFF_CHUNK, 4, 16u << 20, true, 0},
		/* flags: any bit outside META_FLAGS_KNOWN, sealed, is a newer
		 * streamfs's; unsealed, corruption */
		{"lowest unknown flag", OFF_FLAGS, 4, LOWEST_UNKNOWN_FLAG, true, -EPROTONOSUPPORT},
		{"flag 0x80000000", OFF_FLAGS, 4, 0x80000000u, true, -EPROTONOSUPPORT},
		{"all unknown flags", OFF_FLAGS, 4, (uint32_t)~META_FLAGS_KNOWN, true,
		 -EPROTONOSUPPORT},
		{"flags 0xffffffff", OFF_FLAGS, 4, 0xffffffffu, true, -EPROTONOSUPPORT},
		{"lowest unknown flag, not resealed", OFF_FLAGS, 4, LOWEST_UNKNOWN_FLAG, false,
		 -EBADMSG},
		{"flag COMPLETE", OFF_FLAGS, 4, META_FLAG_COMPLETE, true, 0},
		{"flag MANIFEST", OFF_FLAGS, 4, META_FLAG_MANIFEST, true, 0},
		{"flag STALE", OFF_FLAGS, 4, META_FLAG_STALE, true, 0},
		{"flag WRITTEN", OFF_FLAGS, 4, META_FLAG_WRITTEN, true, 0},
		{"all known flags", OFF_FLAGS, 4, META_FLAGS_KNOWN, true, 0},
		/* header length */
		{"length 0", OFF_LENGTH, 4, 0, false, -EBADMSG},
		{"length 63", OFF_LENGTH, 4, 63, false, -EBADMSG},
		{"length 4097", OFF_LENGTH, 4, META_SLOT_SIZE + 1, false, -EBADMSG},
		{"length 0xffffffff", OFF_LENGTH, 4, 0xffffffffu, false, -EBADMSG},
		{"length +1, resealed", OFF_LENGTH, 4, META_FIXED_SIZE + 1, true, -EBADMSG},
		/* string lengths disagreeing with the header length */
		{"url length +1", OFF_URL_LEN, 2, ul + 1, true, -EBADMSG},
		{"url length -1", OFF_URL_LEN, 2, ul - 1, true, -EBADMSG},
		{"etag length +1", OFF_ETAG_LEN, 2, el + 1, true, -EBADMSG},
		{"manifest length 0xffff", OFF_MAN_LEN, 2, 0xffff, true, -EBADMSG},
		/* an empty URL, lengths still summing up */
		{"url length 0", OFF_URL_LEN, 4, (uint64_t)(ul + el) << 16, true, -EBADMSG},
		/* NUL inside each string */
		{"NUL in url", META_FIXED_SIZE + 3, 1, 0, true, -EBADMSG},
		{"NUL at url end", META_FIXED_SIZE + (int)ul - 1, 1, 0, true, -EBADMSG},
		{"NUL in etag", META_FIXED_SIZE + (int)ul, 1, 0, true, -EBADMSG},
		{"NUL in last-modified", META_FIXED_SIZE + (int)(ul + el) + 1, 1, 0, true,
		 -EBADMSG},
		{"NUL in manifest", META_FIXED_SIZE + (int)(ul + el + strlen(base.last_modified)),
		 1, 0, true, -EBADMSG},
		/* the CRC field itself */
		{"crc + 1", OFF_CRC, 1, 0, false, -EBADMSG},
		{"crc zero", OFF_CRC, 4, 0, false, -EBADMSG},
	};

	(void)state;
	check_patch_rows(rows, N_ELEMENTS(rows));
}

/* Every single-bit and whole-byte flip inside the header is caught. */
static void test_meta__decode_rejects_any_flip(void **state)
{
	static const uint8_t masks[] = {0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff};
	uint8_t good[META_SLOT_SIZE], slot[META_SLOT_SIZE];
	int bad = 0;

	(void)state;
	encode_base(good);
	size_t total = (size_t)get_le(good + OFF_LENGTH, 4);
	for (size_t k = 0; k < total; k++) {
		for (size_t mi = 0; mi < N_ELEMENTS(masks); mi++) {
			struct meta d = {0};
			memcpy(slot, good, sizeof(slot));
			slot[k] ^= masks[mi];
			int r = meta_decode(slot, sizeof(slot), &d);
			EXPECT(bad, r == -EBADMSG, "byte %zu ^ 0x%02x: decode = %d, want -EBADMSG", k,
			       masks[mi], r);
			if (r == 0)
				meta_clear(&d);
		}
	}
	assert_int_equal(bad, 0);
}

/* A slot shorter than its header (or than the fixed part) is refused. */
static void test_meta__decode_rejects_truncated(void **state)
{
	uint8_t slot[META_SLOT_SIZE];
	int bad = 0;

	(void)state;
	encode_base(slot);
	size_t total = (size_t)get_le(slot + OFF_LENGTH, 4);
	const size_t lens[] = {0, 1, 8, META_FIXED_SIZE - 1, META_FIXED_SIZE, total - 1};
	for (size_t i = 0; i < N_ELEMENTS(lens); i++) {
		/* an exact-size copy, so a read past len trips ASan */
		uint8_t *p = malloc(lens[i] ? lens[i] : 1);
		struct meta d = {0};
		assert_non_null(p);
		memcpy(p, slot, lens[i]);
		int r = meta_decode(p, lens[i], &d);
		EXPECT(bad, r == -EBADMSG, "decode of %zu of %zu bytes = %d", lens[i], total, r);
		if (r == 0)
			meta_clear(&d);
		free(p);
	}
	assert_int_equal(bad, 0);
}

/* Strings past their maximum, even when consistent and sealed. */
static void test_meta__decode_rejects_overlong(void **state)
{
	static const struct {
		const char *what;
		int len_off;
		size_t len;
	} rows[] = {
		{"url", OFF_URL_LEN, META_URL_MAX + 1},
		{"etag", OFF_ETAG_LEN, META_ETAG_MAX + 1},
		{"last-modified", OFF_LM_LEN, META_LASTMOD_MAX + 1},
		{"manifest", OFF_MAN_LEN, META_MANIFEST_MAX + 1},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		uint8_t slot[META_SLOT_SIZE];
		struct meta m = {.size = 1, .chunk_size = 65536, .url = (char *)"u"};
		struct meta d = {0};

		assert_int_equal(meta_encode(&m, slot), 0);
		/* the url "u" stays; the patched string follows it */
		size_t url_len = rows[i].len_off == OFF_URL_LEN ? rows[i].len : 1;
		size_t total = META_FIXED_SIZE + url_len + (rows[i].len_off == OFF_URL_LEN ? 0
											     : rows[i].len);
		assert_true(total <= META_SLOT_SIZE);
		memset(slot + META_FIXED_SIZE, 'x', total - META_FIXED_SIZE);
		put_le(slot + rows[i].len_off, rows[i].len, 2);
		put_le(slot + OFF_LENGTH, total, 4);
		reseal(slot);
		int r = meta_decode(slot, sizeof(slot), &d);
		EXPECT(bad, r == -EBADMSG, "overlong %s (%zu bytes): decode = %d", rows[i].what,
		       rows[i].len, r);
		if (r == 0)
			meta_clear(&d);

		/* the same at the maximum is accepted: the control row */
		put_le(slot + rows[i].len_off, rows[i].len - 1, 2);
		put_le(slot + OFF_LENGTH, total - 1, 4);
		slot[total - 1] = 0;
		reseal(slot);
		r = meta_decode(slot, sizeof(slot), &d);
		EXPECT(bad, r == 0, "%s at its maximum: decode = %d", rows[i].what, r);
		if (r == 0)
			meta_clear(&d);
	}
	assert_int_equal(bad, 0);
}

/*
 * meta_chunks() is the bitmap's length: ceil(size / chunk_size), for any
 * size the decoder accepts.
 */
static void test_meta__chunks(void **state)
{
	static const struct {
		uint64_t size;
		uint32_t chunk;
		uint64_t chunks;
	} rows[] = {
		{1, 65536, 1},
		{65535, 65536, 1},
		{65536, 65536, 1},
		{65537, 65536, 2},
		{UINT64_C(1) << 40, 1u << 20, UINT64_C(1) << 20},
		{(UINT64_C(1) << 40) + 1, 1u << 20, (UINT64_C(1) << 20) + 1},
		{UINT64_C(1) << 63, 65536, UINT64_C(1) << 47},
		{UINT64_MAX - 65535, 65536, (UINT64_C(1) << 48) - 1}, /* exact multiple */
		/* sizes within one chunk of 2^64: size + chunk - 1 must not wrap */
		{UINT64_MAX - 65534, 65536, UINT64_C(1) << 48},
		{UINT64_MAX, 65536, UINT64_C(1) << 48},
		{UINT64_MAX, 16u << 20, UINT64_C(1) << 40},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		struct meta m = {.size = rows[i].size, .chunk_size = rows[i].chunk};
		uint64_t c = meta_chunks(&m);
		EXPECT(bad, c == rows[i].chunks,
		       "meta_chunks(size %" PRIu64 ", chunk %" PRIu32 ") = %" PRIu64 ", want %" PRIu64,
		       rows[i].size, rows[i].chunk, c, rows[i].chunks);
	}
	assert_int_equal(bad, 0);
}

/* --- meta_load / meta_store_header on a real file --- */

/* bits 0, 3 and 10 of base's 11 chunks */
static const uint8_t base_bitmap[2] = {0x09, 0x04};

static int tmp_fd(void)
{
	const char *dir = getenv("TMPDIR");
	char path[4096];

	snprintf(path, sizeof(path), "%s/streamfs-test-meta-XXXXXX", dir && *dir ? dir : "/tmp");
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(unlink(path), 0);
	return fd;
}

/* slot 0 = base at generation 0, slot 1 zero, then the bitmap */
static int make_file(void)
{
	uint8_t slots[2 * META_SLOT_SIZE] = {0};
	int fd = tmp_fd();

	encode_base(slots);
	assert_int_equal(full_pwrite(fd, slots, sizeof(slots), 0), 0);
	assert_int_equal(full_pwrite(fd, base_bitmap, sizeof(base_bitmap), META_BITMAP_OFFSET), 0);
	return fd;
}

static uint64_t slot_generation(int fd, int slot, int *ret)
{
	uint8_t buf[META_SLOT_SIZE];
	struct meta d = {0};

	assert_int_equal(full_pread(fd, buf, sizeof(buf), (uint64_t)slot * META_SLOT_SIZE), 0);
	*ret = meta_decode(buf, sizeof(buf), &d);
	meta_clear(&d);
	return d.generation;
}

static void corrupt_slot(int fd, int slot, int byte)
{
	uint8_t c;
	uint64_t off = (uint64_t)slot * META_SLOT_SIZE + (uint64_t)byte;

	assert_int_equal(full_pread(fd, &c, 1, off), 0);
	c ^= 0x10;
	assert_int_equal(full_pwrite(fd, &c, 1, off), 0);
}

static void test_meta__load(void **state)
{
	int fd = make_file();
	struct meta m = {0};
	struct bitmap b = {0};
	char why[256] = "";

	(void)state;
	assert_int_equal(meta_load(fd, &m, &b, why, sizeof(why)), 0);
	assert_int_equal(m.generation, 0);
	assert_int_equal(m.size, base.size);
	assert_int_equal(m.chunk_size, base.chunk_size);
	assert_string_equal(m.url, base.url);
	assert_string_equal(m.etag, base.etag);
	assert_string_equal(m.last_modified, base.last_modified);
	assert_string_equal(m.manifest_url, base.manifest_url);
	assert_int_equal(b.nbits, 11);
	assert_int_equal(b.count, 3);
	for (uint64_t k = 0; k < 11; k++)
		assert_int_equal(bitmap_get(&b, k), k == 0 || k == 3 || k == 10);
	bitmap_destroy(&b);
	meta_clear(&m);
	close(fd);
}

/* The written-bitmap follows the present-bitmap when the flag says so. */
static void test_meta__load_written(void **state)
{
	/* bits 3 and 5 of base's 11 chunks */
	static const uint8_t written_bitmap[2] = {0x28, 0x00};
	uint8_t slots[2 * META_SLOT_SIZE] = {0};
	struct meta with = base, m = {0};
	struct bitmap b = {0}, w = {0};
	char why[256] = "";
	int fd;

	(void)state;
	/* Without the flag: no written chunk known, and no bytes needed. */
	assert_int_equal(meta_file_size(&base), META_BITMAP_OFFSET + 2);
	fd = make_file();
	assert_int_equal(meta_load(fd, &m, &b, why, sizeof(why)), 0);
	assert_int_equal(meta_load_written(fd, &m, &w, why, sizeof(why)), 0);
	assert_int_equal(w.nbits, 11);
	assert_int_equal(w.count, 0);
	bitmap_destroy(&b);
	bitmap_destroy(&w);
	meta_clear(&m);
	close(fd);

	with.flags = META_FLAG_WRITTEN;
	assert_int_equal(meta_file_size(&with), META_BITMAP_OFFSET + 4);
	fd = tmp_fd();
	assert_int_equal(meta_encode(&with, slots), 0);
	assert_int_equal(full_pwrite(fd, slots, sizeof(slots), 0), 0);
	assert_int_equal(full_pwrite(fd, base_bitmap, sizeof(base_bitmap), META_BITMAP_OFFSET), 0);
	/* One byte short of the written-bitmap: truncated, named as such. */
	assert_int_equal(full_pwrite(fd, written_bitmap, 1, META_BITMAP_OFFSET + 2), 0);
	assert_int_equal(meta_load(fd, &m, &b, why, sizeof(why)), -EBADMSG);
	assert_non_null(strstr(why, "truncated"));
	assert_int_equal(full_pwrite(fd, written_bitmap, 2, META_BITMAP_OFFSET + 2), 0);
	assert_int_equal(meta_load(fd, &m, &b, why, sizeof(why)), 0);
	assert_int_equal(m.flags, META_FLAG_WRITTEN);
	assert_int_equal(b.count, 3);
	assert_int_equal(meta_load_written(fd, &m, &w, why, sizeof(why)), 0);
	assert_int_equal(w.count, 2);
	for (uint64_t k = 0; k < 11; k++)
		assert_int_equal(bitmap_get(&w, k), k == 3 || k == 5);
	bitmap_destroy(&b);
	bitmap_destroy(&w);
	meta_clear(&m);
	close(fd);
}

static void test_meta__store_header_alternates(void **state)
{
	/* generation after each store, and where it must land */
	static const struct {
		uint64_t generation;
		int slot;
	} rows[] = {{1, 1}, {2, 0}, {3, 1}, {4, 0}};
	int fd = make_file();
	struct meta m = {0};
	struct bitmap b = {0};
	char why[256] = "";
	int r;

	(void)state;
	assert_int_equal(meta_load(fd, &m, &b, why, sizeof(why)), 0);
	bitmap_destroy(&b);
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		uint64_t prev = m.generation;

		m.speed = 1000 * (i + 1); /* a change to see on reload */
		m.flags = i == N_ELEMENTS(rows) - 1 ? META_FLAG_COMPLETE : 0;
		assert_int_equal(meta_store_header(fd, &m), 0);
		assert_int_equal(m.generation, rows[i].generation);
		/* the new header is in its slot, the previous one untouched */
		assert_int_equal(slot_generation(fd, rows[i].slot, &r), rows[i].generation);
		assert_int_equal(r, 0);
		assert_int_equal(slot_generation(fd, 1 - rows[i].slot, &r), prev);
		assert_int_equal(r, 0);

		struct meta l = {0};
		assert_int_equal(meta_load(fd, &l, &b, why, sizeof(why)), 0);
		assert_int_equal(l.generation, rows[i].generation);
		assert_int_equal(l.speed, m.speed);
		assert_int_equal(l.flags, m.flags);
		assert_string_equal(l.url, base.url);
		assert_int_equal(b.count, 3);
		bitmap_destroy(&b);
		meta_clear(&l);
	}
	meta_clear(&m);
	close(fd);
}

/* A torn or corrupt newest slot falls back to the older generation. */
static void test_meta__load_falls_back(void **state)
{
	static const int bytes[] = {0, OFF_VERSION, OFF_GENERATION, OFF_CRC, META_FIXED_SIZE + 5};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(bytes); i++) {
		int fd = make_file();
		struct meta m = {0};
		struct bitmap b = {0};
		char why[256] = "";

		assert_int_equal(meta_load(fd, &m, &b, why, sizeof(why)), 0);
		bitmap_destroy(&b);
		m.speed = 111;
		assert_int_equal(meta_store_header(fd, &m), 0); /* gen 1, slot 1 */
		m.speed = 222;
		assert_int_equal(meta_store_header(fd, &m), 0); /* gen 2, slot 0 */
		meta_clear(&m);

		corrupt_slot(fd, 0, bytes[i]);
		int r = meta_load(fd, &m, &b, why, sizeof(why));
		EXPECT(bad, r == 0, "slot 0 byte %d corrupt: load = %d (%s)", bytes[i], r, why);
		if (r == 0) {
			EXPECT(bad, m.generation == 1 && m.speed == 111,
			       "slot 0 byte %d corrupt: loaded generation %" PRIu64 " speed %" PRIu64,
			       bytes[i], m.generation, m.speed);
			/* the next store repairs the corrupt slot, never the good one */
			assert_int_equal(meta_store_header(fd, &m), 0);
			EXPECT(bad, m.generation == 2, "store after fallback: generation %" PRIu64,
			       m.generation);
			slot_generation(fd, 0, &r);
			EXPECT(bad, r == 0, "store after fallback did not rewrite slot 0");
			EXPECT(bad, slot_generation(fd, 1, &r) == 1 && r == 0,
			       "store after fallback touched slot 1");
			bitmap_destroy(&b);
			meta_clear(&m);
		}
		close(fd);
	}
	assert_int_equal(bad, 0);
}

/* Files that cannot be served: the error and a reason naming the problem. */
static void test_meta__load_rejects(void **state)
{
	enum { TRUNCATE, ZERO_SLOTS, CORRUPT_BOTH, VERSION_BOTH, FLAGS_NEWEST, PADDING };
	static const struct {
		const char *what;
		int action;
		uint64_t arg;
		int ret;
		const char *why; /* a word the reason must contain */
	} rows[] = {
		{"empty file", TRUNCATE, 0, -EBADMSG, "truncated"},
		{"one slot", TRUNCATE, META_SLOT_SIZE, -EBADMSG, "truncated"},
		{"8191 bytes", TRUNCATE, META_BITMAP_OFFSET - 1, -EBADMSG, "truncated"},
		{"no bitmap", TRUNCATE, META_BITMAP_OFFSET, -EBADMSG, "truncated"},
		{"bitmap short by one", TRUNCATE, META_BITMAP_OFFSET + 1, -EBADMSG, "truncated"},
		{"no magic", ZERO_SLOTS, 0, -EBADMSG, "magic"},
		{"both slots corrupt", CORRUPT_BOTH, 0, -EBADMSG, "corrupt"},
		{"unknown version", VERSION_BOTH, 2, -EPROTONOSUPPORT, "version"},
		/* never the older slot beside a newer streamfs's header */
		{"unknown flag in the newest slot", FLAGS_NEWEST, LOWEST_UNKNOWN_FLAG,
		 -EPROTONOSUPPORT, "newer"},
		{"bitmap padding set", PADDING, 0, -EBADMSG, "bitmap"},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		int fd = make_file();
		uint8_t slot[META_SLOT_SIZE];
		struct meta m = {0};
		struct bitmap b = {0};
		char why[256];

		switch (rows[i].action) {
		case TRUNCATE:
			assert_int_equal(ftruncate(fd, (off_t)rows[i].arg), 0);
			break;
		case ZERO_SLOTS:
			memset(slot, 0, sizeof(slot));
			assert_int_equal(full_pwrite(fd, slot, sizeof(slot), 0), 0);
			break;
		case CORRUPT_BOTH:
			encode_base(slot);
			put_le(slot + OFF_GENERATION, 1, 8);
			reseal(slot);
			assert_int_equal(full_pwrite(fd, slot, sizeof(slot), META_SLOT_SIZE), 0);
			corrupt_slot(fd, 0, META_FIXED_SIZE);
			corrupt_slot(fd, 1, OFF_SIZE);
			break;
		case VERSION_BOTH:
			for (int s = 0; s < 2; s++) {
				encode_base(slot);
				put_le(slot + OFF_GENERATION, (uint64_t)s, 8);
				put_le(slot + OFF_VERSION, rows[i].arg, 4);
				reseal(slot);
				assert_int_equal(
					full_pwrite(fd, slot, sizeof(slot), (uint64_t)s * META_SLOT_SIZE), 0);
			}
			break;
		case FLAGS_NEWEST:
			encode_base(slot);
			put_le(slot + OFF_GENERATION, 1, 8);
			put_le(slot + OFF_FLAGS, rows[i].arg, 4);
			reseal(slot);
			assert_int_equal(full_pwrite(fd, slot, sizeof(slot), META_SLOT_SIZE), 0);
			break;
		case PADDING: {
			const uint8_t bytes[2] = {base_bitmap[0], base_bitmap[1] | 0x08};
			assert_int_equal(full_pwrite(fd, bytes, 2, META_BITMAP_OFFSET), 0);
			break;
		}
		}
		memset(why, 0, sizeof(why));
		int r = meta_load(fd, &m, &b, why, sizeof(why));
		EXPECT(bad, r == rows[i].ret, "%s: meta_load = %d, want %d", rows[i].what, r,
		       rows[i].ret);
		EXPECT(bad, why[0] != '\0', "%s: empty reason", rows[i].what);
		EXPECT(bad, strstr(why, rows[i].why) != NULL, "%s: reason \"%s\" lacks \"%s\"",
		       rows[i].what, why, rows[i].why);
		if (r == 0) {
			bitmap_destroy(&b);
			meta_clear(&m);
		} else {
			EXPECT(bad, m.url == NULL && b.bits == NULL,
			       "%s: outputs left allocated on failure", rows[i].what);
		}
		close(fd);
	}
	assert_int_equal(bad, 0);
}

/* A file with trailing bytes past the bitmap still loads. */
static void test_meta__load_longer_file(void **state)
{
	int fd = make_file();
	struct meta m = {0};
	struct bitmap b = {0};
	char why[256] = "";

	(void)state;
	assert_int_equal(ftruncate(fd, META_BITMAP_OFFSET + 4096), 0);
	assert_int_equal(meta_load(fd, &m, &b, why, sizeof(why)), 0);
	assert_int_equal(b.count, 3);
	bitmap_destroy(&b);
	meta_clear(&m);
	close(fd);
}

/*
 * A header whose size is within one chunk of 2^64 must not load with a
 * bitmap that covers none of it: either the bitmap covers the size or the
 * file is refused.
 */
static void test_meta__load_huge_size(void **state)
{
	static const uint64_t sizes[] = {UINT64_MAX - 65534, UINT64_MAX};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(sizes); i++) {
		int fd = make_file();
		uint8_t slot[META_SLOT_SIZE];
		struct meta m = {0};
		struct bitmap b = {0};
		char why[256] = "";

		encode_base(slot);
		put_le(slot + OFF_SIZE, sizes[i], 8);
		reseal(slot);
		assert_int_equal(full_pwrite(fd, slot, sizeof(slot), 0), 0);
		int r = meta_load(fd, &m, &b, why, sizeof(why));
		if (r == 0) {
			EXPECT(bad, b.nbits >= sizes[i] / m.chunk_size,
			       "size %" PRIu64 " loaded with a %" PRIu64 "-bit bitmap", sizes[i],
			       b.nbits);
			bitmap_destroy(&b);
			meta_clear(&m);
		} else {
			EXPECT(bad, why[0] != '\0', "size %" PRIu64 ": refused with no reason",
			       sizes[i]);
		}
		close(fd);
	}
	assert_int_equal(bad, 0);
}

/* A failing store leaves the generation as it was. */
static void test_meta__store_header_fails(void **state)
{
	char path[] = "/tmp/streamfs-test-meta-XXXXXX";
	int fd = mkstemp(path);
	struct meta m = base;

	(void)state;
	assert_true(fd >= 0);
	int ro = open(path, O_RDONLY | O_CLOEXEC);
	unlink(path);
	assert_true(ro >= 0);
	m.generation = 7;
	assert_int_equal(meta_store_header(ro, &m), -EBADF);
	assert_int_equal(m.generation, 7);
	m.size = 0; /* unencodable */
	assert_int_equal(meta_store_header(fd, &m), -EINVAL);
	assert_int_equal(m.generation, 7);
	close(ro);
	close(fd);
}

/* A syscall failure is returned as -errno, and why still says something. */
static void test_meta__load_bad_fd(void **state)
{
	struct meta m = {0};
	struct bitmap b = {0};
	char why[256];

	(void)state;
	memset(why, 0, sizeof(why));
	assert_int_equal(meta_load(-1, &m, &b, why, sizeof(why)), -EBADF);
	if (why[0] == '\0')
		fail_msg("meta_load(-1) gave -EBADF with an empty reason");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_meta__crc32c),
		cmocka_unit_test(test_meta__layout),
		cmocka_unit_test(test_meta__round_trip),
		cmocka_unit_test(test_meta__encode_rejects),
		cmocka_unit_test(test_meta__decode_rejects_fields),
		cmocka_unit_test(test_meta__decode_rejects_any_flip),
		cmocka_unit_test(test_meta__decode_rejects_truncated),
		cmocka_unit_test(test_meta__decode_rejects_overlong),
		cmocka_unit_test(test_meta__chunks),
		cmocka_unit_test(test_meta__load),
		cmocka_unit_test(test_meta__load_written),
		cmocka_unit_test(test_meta__store_header_alternates),
		cmocka_unit_test(test_meta__load_falls_back),
		cmocka_unit_test(test_meta__load_rejects),
		cmocka_unit_test(test_meta__load_longer_file),
		cmocka_unit_test(test_meta__load_huge_size),
		cmocka_unit_test(test_meta__store_header_fails),
		cmocka_unit_test(test_meta__load_bad_fd),
	};

	return cmocka_run_group_tests_name("meta", tests, NULL, NULL);
}
