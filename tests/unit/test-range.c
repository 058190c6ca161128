// SPDX-License-Identifier: MIT
/*
 * Unit tests for the HTTP byte-range helpers of common/range.c
 * (include/util.h): building the Range request header, whose end is
 * inclusive, and parsing Content-Range response values.  Single-threaded,
 * no I/O.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "unit.h"

#include "util.h"



#define MAX UINT64_MAX
#define SENTINEL UINT64_C(0x5a5a5a5a5a5a5a5a)

/* --- range_header_build --- */

struct build_row {
	uint64_t off, len;
	int ret;
	const char *out; /* when ret == 0 */
};

static void test_range__header_build(void **state)
{
	static const struct build_row rows[] = {
		/* the end is inclusive: off + len - 1 */
		{0, 1, 0, "bytes=0-0"},
		{1, 1, 0, "bytes=1-1"},
		{0, 2, 0, "bytes=0-1"},
		{0, 512, 0, "bytes=0-511"},
		{4096, 65536, 0, "bytes=4096-69631"},
		{65536, 65536, 0, "bytes=65536-131071"},
		{UINT64_C(1) << 40, UINT64_C(16) << 20, 0, "bytes=1099511627776-1099528404991"},
		/* the largest ranges that do not overflow */
		{MAX - 1, 1, 0, "bytes=18446744073709551614-18446744073709551614"},
		{0, MAX, 0, "bytes=0-18446744073709551614"},
		{1, MAX - 1, 0, "bytes=1-18446744073709551614"},
		/* empty */
		{0, 0, -EINVAL, NULL},
		{5, 0, -EINVAL, NULL},
		{MAX, 0, -EINVAL, NULL},
		/* off + len past 2^64 - 1 */
		{MAX, 1, -EINVAL, NULL},
		{1, MAX, -EINVAL, NULL},
		{2, MAX - 1, -EINVAL, NULL},
		{MAX, MAX, -EINVAL, NULL},
		{UINT64_C(1) << 63, UINT64_C(1) << 63, -EINVAL, NULL},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		char buf[64];
		memset(buf, 'x', sizeof(buf));
		int r = range_header_build(buf, sizeof(buf), rows[i].off, rows[i].len);
		EXPECT(bad, r == rows[i].ret,
		       "range_header_build(off %" PRIu64 ", len %" PRIu64 ") = %d, want %d",
		       rows[i].off, rows[i].len, r, rows[i].ret);
		if (r == 0 && rows[i].out)
			EXPECT(bad, strcmp(buf, rows[i].out) == 0,
			       "range_header_build(off %" PRIu64 ", len %" PRIu64
			       ") wrote \"%s\", want \"%s\"",
			       rows[i].off, rows[i].len, buf, rows[i].out);
	}
	assert_int_equal(bad, 0);
}

/* The buffer must hold the text and its NUL; nothing is written past it. */
static void test_range__header_build_small_buffer(void **state)
{
	static const struct {
		uint64_t off, len;
		size_t bufsize;
		int ret;
	} rows[] = {
		{0, 1, 10, 0},       /* "bytes=0-0" is 9 bytes + NUL */
		{0, 1, 9, -ENOSPC},
		{0, 1, 1, -ENOSPC},
		{0, 1, 0, -ENOSPC},
		{MAX - 1, 1, 48, 0}, /* 47 bytes + NUL: the longest value */
		{MAX - 1, 1, 47, -ENOSPC},
		{0, MAX, 29, 0},
		{0, MAX, 28, -ENOSPC},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		char buf[64];
		memset(buf, 'x', sizeof(buf));
		int r = range_header_build(rows[i].bufsize ? buf : NULL, rows[i].bufsize,
					   rows[i].off, rows[i].len);
		EXPECT(bad, r == rows[i].ret, "row %zu: bufsize %zu gave %d, want %d", i,
		       rows[i].bufsize, r, rows[i].ret);
		for (size_t k = rows[i].bufsize; k < sizeof(buf); k++)
			if (buf[k] != 'x') {
				EXPECT(bad, 0, "row %zu: wrote byte %zu past bufsize %zu", i, k,
				       rows[i].bufsize);
				break;
			}
		if (r == 0)
			EXPECT(bad, strlen(buf) == rows[i].bufsize - 1,
			       "row %zu: text \"%s\" does not fill bufsize %zu exactly", i, buf,
			       rows[i].bufsize);
		else if (rows[i].bufsize > 0)
			EXPECT(bad, memchr(buf, '\0', rows[i].bufsize) != NULL,
			       "row %zu: truncated text is not terminated", i);
	}
	assert_int_equal(bad, 0);
}

/* --- content_range_parse --- */

struct cr_row {
	const char *in;
	int ret;
	uint64_t start, end, total; /* when ret == 0 */
};

static void check_cr_rows(const struct cr_row *rows, size_t n)
{
	int bad = 0;

	for (size_t i = 0; i < n; i++) {
		const struct cr_row *row = &rows[i];
		uint64_t s = SENTINEL, e = SENTINEL, t = SENTINEL;
		int r = content_range_parse(row->in, &s, &e, &t);

		EXPECT(bad, r == row->ret, "content_range_parse(\"%s\") = %d, want %d",
		       row->in ? row->in : "(null)", r, row->ret);
		if (r == 0 && row->ret == 0)
			EXPECT(bad, s == row->start && e == row->end && t == row->total,
			       "content_range_parse(\"%s\") gave %" PRIu64 "-%" PRIu64 "/%" PRIu64
			       ", want %" PRIu64 "-%" PRIu64 "/%" PRIu64,
			       row->in, s, e, t, row->start, row->end, row->total);
		if (r != 0)
			EXPECT(bad, s == SENTINEL && e == SENTINEL && t == SENTINEL,
			       "content_range_parse(\"%s\") wrote outputs on failure",
			       row->in ? row->in : "(null)");
	}
	assert_int_equal(bad, 0);
}

static void test_range__content_range_parse(void **state)
{
	static const struct cr_row rows[] = {
		/* valid */
		{"bytes 0-99/1000", 0, 0, 99, 1000},
		{"bytes 0-0/1", 0, 0, 0, 1},
		{"bytes 4-4/10", 0, 4, 4, 10},
		{"bytes 0-9/10", 0, 0, 9, 10},
		{"bytes 65536-131071/1099511627776", 0, 65536, 131071, UINT64_C(1099511627776)},
		{"bytes 0-18446744073709551614/18446744073709551615", 0, 0, MAX - 1, MAX},
		{"bytes 007-010/011", 0, 7, 10, 11},
		/* unsatisfied range */
		{"bytes */1000", 0, MAX, MAX, 1000},
		{"bytes */0", 0, MAX, MAX, 0},
		{"bytes */18446744073709551615", 0, MAX, MAX, MAX},
		/* whitespace around the value, CRLF as a header callback sees it */
		{" bytes 0-99/1000", 0, 0, 99, 1000},
		{"\tbytes 0-99/1000", 0, 0, 99, 1000},
		{"bytes 0-99/1000 ", 0, 0, 99, 1000},
		{"bytes 0-99/1000\r\n", 0, 0, 99, 1000},
		{"  bytes\t0-99/1000 \t\r\n", 0, 0, 99, 1000},
		{"bytes  0-99/1000", 0, 0, 99, 1000},
		/* the unit is case-insensitive */
		{"BYTES 0-99/1000", 0, 0, 99, 1000},
		{"Bytes 0-99/1000", 0, 0, 99, 1000},
		{"bYtEs */5", 0, MAX, MAX, 5},
		/* missing parts */
		{NULL, -EINVAL, 0, 0, 0},
		{"", -EINVAL, 0, 0, 0},
		{"   ", -EINVAL, 0, 0, 0},
		{"bytes", -EINVAL, 0, 0, 0},
		{"bytes ", -EINVAL, 0, 0, 0},
		{"0-99/1000", -EINVAL, 0, 0, 0},
		{"bytes0-99/1000", -EINVAL, 0, 0, 0},
		{"bytes=0-99/1000", -EINVAL, 0, 0, 0},
		{"bytes 0-99", -EINVAL, 0, 0, 0},
		{"bytes 0-99/", -EINVAL, 0, 0, 0},
		{"bytes 0-/1000", -EINVAL, 0, 0, 0},
		{"bytes -99/1000", -EINVAL, 0, 0, 0},
		{"bytes 0/1000", -EINVAL, 0, 0, 0},
		{"bytes /1000", -EINVAL, 0, 0, 0},
		{"bytes */", -EINVAL, 0, 0, 0},
		{"bytes *", -EINVAL, 0, 0, 0},
		/* unknown total is refused */
		{"bytes 0-99/*", -EINVAL, 0, 0, 0},
		{"bytes */*", -EINVAL, 0, 0, 0},
		/* end before start; end at or past total */
		{"bytes 5-4/10", -EINVAL, 0, 0, 0},
		{"bytes 1-0/10", -EINVAL, 0, 0, 0},
		{"bytes 0-10/10", -EINVAL, 0, 0, 0},
		{"bytes 0-0/0", -EINVAL, 0, 0, 0},
		{"bytes 9-11/10", -EINVAL, 0, 0, 0},
		{"bytes 0-18446744073709551615/18446744073709551615", -EINVAL, 0, 0, 0},
		/* overflow of any number */
		{"bytes 18446744073709551616-1/2", -EINVAL, 0, 0, 0},
		{"bytes 0-18446744073709551616/2", -EINVAL, 0, 0, 0},
		{"bytes 0-1/18446744073709551616", -EINVAL, 0, 0, 0},
		{"bytes */99999999999999999999", -EINVAL, 0, 0, 0},
		/* garbage */
		{"bits 0-1/2", -EINVAL, 0, 0, 0},
		{"bytesx 0-1/2", -EINVAL, 0, 0, 0},
		{"bytes 0 - 99/1000", -EINVAL, 0, 0, 0},
		{"bytes 0-99 /1000", -EINVAL, 0, 0, 0},
		{"bytes +0-99/1000", -EINVAL, 0, 0, 0},
		{"bytes 0x0-0x63/1000", -EINVAL, 0, 0, 0},
		{"bytes 0-99/1000x", -EINVAL, 0, 0, 0},
		{"bytes 0-99/1000 x", -EINVAL, 0, 0, 0},
		{"bytes 0-99/1000/", -EINVAL, 0, 0, 0},
		{"bytes 0-99/-1000", -EINVAL, 0, 0, 0},
		{"bytes 0-99,200-299/1000", -EINVAL, 0, 0, 0},
		{"bytes 0-99/1000\r\nX-Other: 1", -EINVAL, 0, 0, 0},
	};

	(void)state;
	check_cr_rows(rows, N_ELEMENTS(rows));
}

/*
 * A numeric start of 2^64 - 1 must not be taken for the "*" form: such a
 * range can never satisfy end < total and must be refused.
 */
static void test_range__content_range_parse_max_start(void **state)
{
	static const struct cr_row rows[] = {
		{"bytes 18446744073709551615-18446744073709551615/5", -EINVAL, 0, 0, 0},
		{"bytes 18446744073709551615-18446744073709551615/18446744073709551615", -EINVAL,
		 0, 0, 0},
	};

	(void)state;
	check_cr_rows(rows, N_ELEMENTS(rows));
}

/* What the fetch layer relies on: a built header and its echo agree. */
static void test_range__round_trip(void **state)
{
	static const struct {
		uint64_t off, len, total;
	} rows[] = {
		{0, 1, 1},
		{0, 65536, 65536},
		{65536, 65536, 1000000},
		{999999, 1, 1000000},
		{MAX - 2, 1, MAX},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		char req[64], resp[128];
		uint64_t s, e, t;

		assert_int_equal(range_header_build(req, sizeof(req), rows[i].off, rows[i].len), 0);
		assert_true(strncmp(req, "bytes=", 6) == 0);
		snprintf(resp, sizeof(resp), "bytes %s/%" PRIu64, req + 6, rows[i].total);
		int r = content_range_parse(resp, &s, &e, &t);
		EXPECT(bad, r == 0, "\"%s\" not parsed (%d)", resp, r);
		if (r == 0)
			EXPECT(bad, s == rows[i].off && e - s + 1 == rows[i].len && t == rows[i].total,
			       "\"%s\" gave %" PRIu64 "-%" PRIu64 "/%" PRIu64, resp, s, e, t);
	}
	assert_int_equal(bad, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_range__header_build),
		cmocka_unit_test(test_range__header_build_small_buffer),
		cmocka_unit_test(test_range__content_range_parse),
		cmocka_unit_test(test_range__content_range_parse_max_start),
		cmocka_unit_test(test_range__round_trip),
	};

	return cmocka_run_group_tests_name("range", tests, NULL, NULL);
}
