// SPDX-License-Identifier: MIT
/*
 * Unit tests for the present-bitmap of cache/bitmap.c (cache/cache_i.h):
 * init, get/set/clear and the running count, next_set/next_clear across
 * byte and 64-bit word boundaries, and loading a stored copy.  Every scan
 * result is compared with a naive reference.  Single-threaded, no I/O.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unit.h"

#include "cache/cache_i.h"




/*
 * Impossible allocations must return NULL under ASan as they do in libc,
 * not abort the run (a fixed bitmap_init may still try one).
 */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
	return "allocator_may_return_null=1";
}

/* nbits around every byte and word boundary, and some odd ones */
static const uint64_t sizes[] = {1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 128,
				 129, 191, 192, 193, 200, 511, 512, 513, 1000};

static int64_t ref_next(const struct bitmap *b, uint64_t from, bool want)
{
	for (uint64_t i = from; i < b->nbits; i++)
		if (((b->bits[i / 8] >> (i % 8)) & 1) == want)
			return (int64_t)i;
	return -1;
}

/* Compares next_set/next_clear from every start (and past the end). */
static int check_scans(const struct bitmap *b, const char *what)
{
	int bad = 0;

	for (uint64_t from = 0; from <= b->nbits + 2; from++) {
		int64_t s = bitmap_next_set(b, from), c = bitmap_next_clear(b, from);
		int64_t rs = ref_next(b, from, true), rc = ref_next(b, from, false);
		EXPECT(bad, s == rs, "%s, nbits %" PRIu64 ": next_set(%" PRIu64 ") = %" PRId64
		       ", want %" PRId64, what, b->nbits, from, s, rs);
		EXPECT(bad, c == rc, "%s, nbits %" PRIu64 ": next_clear(%" PRIu64 ") = %" PRId64
		       ", want %" PRId64, what, b->nbits, from, c, rc);
		if (s != rs || c != rc)
			break; /* one report per bitmap is enough */
	}
	return bad;
}

static void test_cache_bitmap__init(void **state)
{
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(sizes); i++) {
		struct bitmap b;
		uint64_t n = sizes[i];

		assert_int_equal(bitmap_init(&b, n), 0);
		EXPECT(bad, b.nbits == n && b.count == 0, "nbits %" PRIu64 ": init state", n);
		EXPECT(bad, bitmap_bytes(n) == (n + 7) / 8, "bitmap_bytes(%" PRIu64 ")", n);
		for (uint64_t k = 0; k < n + 9; k++)
			if (bitmap_get(&b, k)) {
				EXPECT(bad, 0, "nbits %" PRIu64 ": bit %" PRIu64 " set after init", n, k);
				break;
			}
		EXPECT(bad, bitmap_next_set(&b, 0) == -1, "nbits %" PRIu64 ": next_set", n);
		EXPECT(bad, bitmap_next_clear(&b, 0) == 0, "nbits %" PRIu64 ": next_clear", n);
		EXPECT(bad, bitmap_next_clear(&b, n - 1) == (int64_t)(n - 1),
		       "nbits %" PRIu64 ": next_clear(last)", n);
		EXPECT(bad, bitmap_next_clear(&b, n) == -1, "nbits %" PRIu64 ": next_clear(end)", n);
		bitmap_destroy(&b);
		EXPECT(bad, b.bits == NULL && b.nbits == 0 && b.count == 0, "destroy state");
	}
	assert_int_equal(bad, 0);
}

static void test_cache_bitmap__empty(void **state)
{
	struct bitmap b;

	(void)state;
	assert_int_equal(bitmap_init(&b, 0), 0);
	assert_int_equal(bitmap_bytes(0), 0);
	assert_false(bitmap_get(&b, 0));
	assert_false(bitmap_set(&b, 0));
	assert_int_equal(b.count, 0);
	assert_int_equal(bitmap_next_set(&b, 0), -1);
	assert_int_equal(bitmap_next_clear(&b, 0), -1);
	assert_int_equal(bitmap_load(&b, (const uint8_t *)"", 0), 0);
	bitmap_destroy(&b);
}

/* set/clear return the previous value; the count follows; outside is inert */
static void test_cache_bitmap__set_clear(void **state)
{
	enum { SET, CLEAR, GET };
	static const struct {
		int op;
		uint64_t i;
		bool ret;
		uint64_t count; /* after the op */
	} rows[] = {
		{GET, 0, false, 0},
		{SET, 0, false, 1},
		{SET, 0, true, 1},     /* already set: count unchanged */
		{GET, 0, true, 1},
		{SET, 7, false, 2},    /* last bit of byte 0 */
		{SET, 8, false, 3},    /* first bit of byte 1 */
		{SET, 63, false, 4},   /* last bit of word 0 */
		{SET, 64, false, 5},   /* first bit of word 1 */
		{SET, 99, false, 6},   /* the last bit (nbits 100) */
		{GET, 1, false, 6},
		{GET, 63, true, 6},
		{CLEAR, 1, false, 6},  /* already clear */
		{CLEAR, 7, true, 5},
		{CLEAR, 7, false, 5},
		{GET, 7, false, 5},
		{GET, 8, true, 5},
		{SET, 100, false, 5},  /* out of range: ignored */
		{GET, 100, false, 5},
		{CLEAR, 100, false, 5},
		{SET, UINT64_MAX, false, 5},
		{CLEAR, UINT64_MAX, false, 5},
		{GET, UINT64_MAX, false, 5},
		{CLEAR, 99, true, 4},
		{CLEAR, 0, true, 3},
		{CLEAR, 8, true, 2},
		{CLEAR, 63, true, 1},
		{CLEAR, 64, true, 0},
		{CLEAR, 64, false, 0},
	};
	static const char *const names[] = {"set", "clear", "get"};
	struct bitmap b;
	int bad = 0;

	(void)state;
	assert_int_equal(bitmap_init(&b, 100), 0);
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		bool r = rows[i].op == SET ? bitmap_set(&b, rows[i].i) :
			 rows[i].op == CLEAR ? bitmap_clear(&b, rows[i].i) :
					       bitmap_get(&b, rows[i].i);
		EXPECT(bad, r == rows[i].ret, "row %zu: %s(%" PRIu64 ") = %d, want %d", i,
		       names[rows[i].op], rows[i].i, r, rows[i].ret);
		EXPECT(bad, b.count == rows[i].count,
		       "row %zu: count %" PRIu64 " after %s(%" PRIu64 "), want %" PRIu64, i, b.count,
		       names[rows[i].op], rows[i].i, rows[i].count);
	}
	/* the padding bits past nbits stay clear */
	EXPECT(bad, b.bits[12] >> 4 == 0, "padding bits touched: 0x%02x", b.bits[12]);
	bitmap_destroy(&b);
	assert_int_equal(bad, 0);
}

/*
 * Scans over patterns around byte and word edges, for every size, each
 * pattern laid on an empty and on a full bitmap.
 */
static void test_cache_bitmap__next_across_boundaries(void **state)
{
	/* positions flipped from the background; filtered to < nbits */
	static const uint64_t patterns[][4] = {
		{UINT64_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX}, /* nothing flipped */
		{0, UINT64_MAX, UINT64_MAX, UINT64_MAX},
		{7, 8, UINT64_MAX, UINT64_MAX},
		{8, UINT64_MAX, UINT64_MAX, UINT64_MAX},
		{63, UINT64_MAX, UINT64_MAX, UINT64_MAX},
		{64, UINT64_MAX, UINT64_MAX, UINT64_MAX},
		{63, 64, 127, 128},
		{65, 129, 193, UINT64_MAX},
		{120, 191, 192, 511},
		{999, UINT64_MAX, UINT64_MAX, UINT64_MAX},
		{0, 512, 999, UINT64_MAX},
	};
	int bad = 0;

	(void)state;
	for (size_t si = 0; si < N_ELEMENTS(sizes); si++) {
		uint64_t n = sizes[si];
		for (size_t pi = 0; pi < N_ELEMENTS(patterns); pi++) {
			for (int fill = 0; fill < 2; fill++) {
				struct bitmap b;
				char what[64];

				assert_int_equal(bitmap_init(&b, n), 0);
				if (fill)
					for (uint64_t k = 0; k < n; k++)
						bitmap_set(&b, k);
				for (int k = 0; k < 4; k++) {
					uint64_t p = patterns[pi][k];
					if (p >= n)
						continue;
					if (fill)
						bitmap_clear(&b, p);
					else
						bitmap_set(&b, p);
				}
				snprintf(what, sizeof(what), "pattern %zu on %s", pi,
					 fill ? "ones" : "zeros");
				bad += check_scans(&b, what);
				/* and the last bit of every size as an extra edge */
				if (fill == 0 && n > 1) {
					bitmap_set(&b, n - 1);
					snprintf(what, sizeof(what), "pattern %zu + last bit", pi);
					bad += check_scans(&b, what);
				}
				bitmap_destroy(&b);
			}
		}
	}
	assert_int_equal(bad, 0);
}

/* nbits == 1: the smallest real bitmap */
static void test_cache_bitmap__one_bit(void **state)
{
	struct bitmap b;

	(void)state;
	assert_int_equal(bitmap_init(&b, 1), 0);
	assert_int_equal(bitmap_next_clear(&b, 0), 0);
	assert_int_equal(bitmap_next_set(&b, 0), -1);
	assert_false(bitmap_set(&b, 0));
	assert_int_equal(b.count, 1);
	assert_int_equal(b.bits[0], 0x01);
	assert_int_equal(bitmap_next_clear(&b, 0), -1);
	assert_int_equal(bitmap_next_set(&b, 0), 0);
	assert_int_equal(bitmap_next_set(&b, 1), -1);
	assert_false(bitmap_set(&b, 1));
	assert_int_equal(b.bits[0], 0x01);
	assert_true(bitmap_clear(&b, 0));
	assert_int_equal(b.count, 0);
	bitmap_destroy(&b);
}

/* 1 TiB in 64 KiB chunks (plus a few, not a multiple of 8). */
static void test_cache_bitmap__large(void **state)
{
	const uint64_t n = (UINT64_C(1) << 24) + 3;
	struct bitmap b;

	(void)state;
	assert_int_equal(bitmap_init(&b, n), 0);
	assert_int_equal(bitmap_next_set(&b, 0), -1);
	assert_false(bitmap_set(&b, n - 1));
	assert_int_equal(bitmap_next_set(&b, 0), (int64_t)(n - 1));
	assert_int_equal(bitmap_next_set(&b, n - 1), (int64_t)(n - 1));
	assert_int_equal(bitmap_next_set(&b, n), -1);

	for (uint64_t k = 0; k < n; k++)
		bitmap_set(&b, k);
	assert_int_equal(b.count, n);
	assert_int_equal(bitmap_next_clear(&b, 0), -1);
	assert_true(bitmap_clear(&b, n / 2 + 5));
	assert_int_equal(bitmap_next_clear(&b, 0), (int64_t)(n / 2 + 5));
	assert_int_equal(bitmap_next_clear(&b, n / 2 + 6), -1);
	assert_true(bitmap_clear(&b, n - 1));
	assert_int_equal(bitmap_next_clear(&b, n / 2 + 6), (int64_t)(n - 1));
	assert_int_equal(b.count, n - 2);
	bitmap_destroy(&b);
}

static void test_cache_bitmap__init_enomem(void **state)
{
	struct bitmap b;

	(void)state;
#ifdef UNDER_SANITIZER
	/* ASan warns on stderr about the failed allocation, even when it
	 * returns NULL: keep sanitizer runs free of "==PID==" lines. */
	skip();
#endif
	assert_int_equal(bitmap_init(&b, BITMAP_MAX_BITS), -ENOMEM);
	/* Past the cap it is refused before any allocation. */
	assert_int_equal(bitmap_init(&b, BITMAP_MAX_BITS + 1), -EINVAL);
}

/*
 * nbits so large that bitmap_bytes() would wrap must fail, not allocate
 * a tiny buffer that later writes run past.
 */
static void test_cache_bitmap__init_overflow(void **state)
{
	static const uint64_t rows[] = {UINT64_MAX, UINT64_MAX - 6};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		struct bitmap b;
		int r = bitmap_init(&b, rows[i]);
		EXPECT(bad, r < 0, "bitmap_init(%" PRIu64 ") = %d (%" PRIu64 " bytes), want an error",
		       rows[i], r, bitmap_bytes(rows[i]));
		if (r == 0)
			bitmap_destroy(&b);
	}
	assert_int_equal(bad, 0);
}

static void test_cache_bitmap__load(void **state)
{
	static const struct {
		uint64_t nbits;
		size_t len;
		uint8_t bytes[4];
		int ret;
		uint64_t count; /* when ret == 0 */
	} rows[] = {
		{1, 1, {0x00}, 0, 0},
		{1, 1, {0x01}, 0, 1},
		{7, 1, {0x7f}, 0, 7},
		{8, 1, {0xff}, 0, 8},
		{9, 2, {0xff, 0x01}, 0, 9},
		{16, 2, {0xa5, 0x5a}, 0, 8},
		{17, 3, {0x00, 0x00, 0x01}, 0, 1},
		{0, 0, {0}, 0, 0},
		/* wrong length */
		{1, 0, {0}, -EBADMSG, 0},
		{1, 2, {0x01, 0x00}, -EBADMSG, 0},
		{8, 2, {0xff, 0x00}, -EBADMSG, 0},
		{9, 1, {0xff}, -EBADMSG, 0},
		{9, 3, {0xff, 0x01, 0x00}, -EBADMSG, 0},
		{0, 1, {0x00}, -EBADMSG, 0},
		/* nonzero padding bits past nbits */
		{1, 1, {0x02}, -EBADMSG, 0},
		{1, 1, {0x80}, -EBADMSG, 0},
		{7, 1, {0x80}, -EBADMSG, 0},
		{7, 1, {0xff}, -EBADMSG, 0},
		{9, 2, {0xff, 0x02}, -EBADMSG, 0},
		{9, 2, {0x00, 0x80}, -EBADMSG, 0},
		{17, 3, {0x00, 0x00, 0x03}, -EBADMSG, 0},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		struct bitmap b;
		uint8_t before[4] = {0};
		uint8_t *copy = malloc(rows[i].len ? rows[i].len : 1);

		assert_non_null(copy);
		memcpy(copy, rows[i].bytes, rows[i].len);
		assert_int_equal(bitmap_init(&b, rows[i].nbits), 0);
		/* something to keep on failure */
		if (rows[i].nbits)
			bitmap_set(&b, 0);
		memcpy(before, b.bits, bitmap_bytes(rows[i].nbits));
		uint64_t count_before = b.count;

		int r = bitmap_load(&b, copy, rows[i].len);
		EXPECT(bad, r == rows[i].ret, "row %zu: bitmap_load(nbits %" PRIu64 ", len %zu) = %d, want %d",
		       i, rows[i].nbits, rows[i].len, r, rows[i].ret);
		if (r == 0) {
			EXPECT(bad, b.count == rows[i].count, "row %zu: count %" PRIu64 ", want %" PRIu64,
			       i, b.count, rows[i].count);
			EXPECT(bad, memcmp(b.bits, rows[i].bytes, rows[i].len) == 0,
			       "row %zu: bits not copied", i);
			for (uint64_t k = 0; k < rows[i].nbits; k++)
				EXPECT(bad, bitmap_get(&b, k) == ((rows[i].bytes[k / 8] >> (k % 8)) & 1),
				       "row %zu: bit %" PRIu64, i, k);
		} else {
			EXPECT(bad, b.count == count_before &&
					    memcmp(b.bits, before, bitmap_bytes(rows[i].nbits)) == 0,
			       "row %zu: failed load changed the bitmap", i);
		}
		bitmap_destroy(&b);
		free(copy);
	}
	assert_int_equal(bad, 0);
}

/* The scans see loaded bits like set ones; the count is recomputed. */
static void test_cache_bitmap__load_then_scan(void **state)
{
	static const uint64_t rows[] = {65, 130, 1000};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		uint64_t n = rows[i], want_count = 0;
		size_t len = (size_t)bitmap_bytes(n);
		uint8_t *bytes = calloc(len, 1);
		struct bitmap b;

		assert_non_null(bytes);
		for (uint64_t k = 0; k < n; k++)
			if (k % 3 == 0 || (k >= 60 && k < 70)) {
				bytes[k / 8] |= (uint8_t)(1u << (k % 8));
				want_count++;
			}
		assert_int_equal(bitmap_init(&b, n), 0);
		bitmap_set(&b, 1); /* replaced by the load */
		assert_int_equal(bitmap_load(&b, bytes, len), 0);
		EXPECT(bad, b.count == want_count, "nbits %" PRIu64 ": count %" PRIu64 ", want %" PRIu64,
		       n, b.count, want_count);
		EXPECT(bad, !bitmap_get(&b, 1), "nbits %" PRIu64 ": old bit survived the load", n);
		bad += check_scans(&b, "loaded");
		bitmap_destroy(&b);
		free(bytes);
	}
	assert_int_equal(bad, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_cache_bitmap__init),
		cmocka_unit_test(test_cache_bitmap__empty),
		cmocka_unit_test(test_cache_bitmap__set_clear),
		cmocka_unit_test(test_cache_bitmap__next_across_boundaries),
		cmocka_unit_test(test_cache_bitmap__one_bit),
		cmocka_unit_test(test_cache_bitmap__large),
		cmocka_unit_test(test_cache_bitmap__init_enomem),
		cmocka_unit_test(test_cache_bitmap__init_overflow),
		cmocka_unit_test(test_cache_bitmap__load),
		cmocka_unit_test(test_cache_bitmap__load_then_scan),
	};

	return cmocka_run_group_tests_name("cache-bitmap", tests, NULL, NULL);
}
