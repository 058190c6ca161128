// SPDX-License-Identifier: MIT
/*
 * Unit tests for the parsing and formatting helpers of common/parse.c
 * (include/util.h): sizes, numbers, disk names, URL redaction, zero
 * detection, byte formatting and full-length pread/pwrite.
 *
 * Single-threaded.  pread(2) and pwrite(2) are interposed by this program
 * so that EINTR, short transfers and zero-byte returns can be scripted;
 * with no script active they pass straight through to libc.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "unit.h"

#include "util.h"


/*
 * Table rows are all checked before the test fails, so one wrong row does
 * not hide the others; each failure names its row.
 */

#define SENTINEL UINT64_C(0xdeadbeefcafef00d)

/* --- parse_u64 / parse_size --- */

struct num_row {
	const char *in;
	int ret;
	uint64_t value; /* when ret == 0 */
};

static const struct num_row u64_rows[] = {
	{"0", 0, 0},
	{"1", 0, 1},
	{"007", 0, 7},
	{"4294967296", 0, UINT64_C(4294967296)},
	{"18446744073709551614", 0, UINT64_MAX - 1},
	{"18446744073709551615", 0, UINT64_MAX},
	{"0000000000000000000000000000000000000001", 0, 1}, /* 40 digits */
	{"18446744073709551616", -ERANGE, 0},
	{"18446744073709551620", -ERANGE, 0},
	{"99999999999999999999", -ERANGE, 0},
	{"184467440737095516150", -ERANGE, 0},
	{"", -EINVAL, 0},
	{NULL, -EINVAL, 0},
	{"-1", -EINVAL, 0},
	{"+1", -EINVAL, 0},
	{" 1", -EINVAL, 0},
	{"1 ", -EINVAL, 0},
	{"1\n", -EINVAL, 0},
	{"1K", -EINVAL, 0},
	{"1B", -EINVAL, 0},
	{"0x10", -EINVAL, 0},
	{"1.5", -EINVAL, 0},
	{"1,000", -EINVAL, 0},
};

static const struct num_row size_rows[] = {
	{"0", 0, 0},
	{"1", 0, 1},
	{"0K", 0, 0},
	{"1K", 0, 1024},
	{"1k", 0, 1024},
	{"1KB", 0, 1024},
	{"1kb", 0, 1024},
	{"1KiB", 0, 1024},
	{"64K", 0, 65536},
	{"2M", 0, UINT64_C(2) << 20},
	{"2m", 0, UINT64_C(2) << 20},
	{"10MB", 0, UINT64_C(10) << 20},
	{"16MiB", 0, UINT64_C(16) << 20},
	{"3G", 0, UINT64_C(3) << 30},
	{"3GiB", 0, UINT64_C(3) << 30},
	{"4T", 0, UINT64_C(4) << 40},
	{"4t", 0, UINT64_C(4) << 40},
	{"1B", 0, 1},
	{"1b", 0, 1},
	{"18446744073709551615", 0, UINT64_MAX},
	{"18446744073709551615B", 0, UINT64_MAX},
	{"000000000000000000000000000001", 0, 1}, /* 30 digits */
	/* overflow of the shifted value, exactly at 2^64 */
	{"16777215T", 0, UINT64_C(16777215) << 40},
	{"16777216T", -ERANGE, 0},
	{"17179869183G", 0, UINT64_C(17179869183) << 30},
	{"17179869184G", -ERANGE, 0},
	{"17592186044415M", 0, UINT64_C(17592186044415) << 20},
	{"17592186044416M", -ERANGE, 0},
	{"18014398509481983K", 0, UINT64_C(18014398509481983) << 10},
	{"18014398509481984K", -ERANGE, 0},
	{"18446744073709551616", -ERANGE, 0},
	{"99999999999999999999999999999999999", -ERANGE, 0},
	/* syntax */
	{"", -EINVAL, 0},
	{NULL, -EINVAL, 0},
	{"K", -EINVAL, 0},
	{"B", -EINVAL, 0},
	{"-1", -EINVAL, 0},
	{"+1", -EINVAL, 0},
	{" 1", -EINVAL, 0},
	{"1 ", -EINVAL, 0},
	{"1 K", -EINVAL, 0},
	{"1.5M", -EINVAL, 0},
	{"1P", -EINVAL, 0},
	{"1E", -EINVAL, 0},
	{"1X", -EINVAL, 0},
	{"1KK", -EINVAL, 0},
	{"1Ki", -EINVAL, 0},
	{"1iB", -EINVAL, 0},
	{"1BB", -EINVAL, 0},
	{"1KBx", -EINVAL, 0},
	{"1KiBx", -EINVAL, 0},
	{"0x10", -EINVAL, 0},
};

static void check_num_rows(const char *fn_name, int (*fn)(const char *, uint64_t *),
			   const struct num_row *rows, size_t n)
{
	int bad = 0;

	for (size_t i = 0; i < n; i++) {
		const struct num_row *row = &rows[i];
		uint64_t v = SENTINEL;
		int r = fn(row->in, &v);

		EXPECT(bad, r == row->ret, "%s(\"%s\") returned %d, want %d", fn_name,
		       row->in ? row->in : "(null)", r, row->ret);
		if (row->ret == 0 && r == 0)
			EXPECT(bad, v == row->value, "%s(\"%s\") gave %" PRIu64 ", want %" PRIu64,
			       fn_name, row->in, v, row->value);
		else if (r != 0)
			EXPECT(bad, v == SENTINEL, "%s(\"%s\") wrote its output on failure",
			       fn_name, row->in ? row->in : "(null)");
	}
	assert_int_equal(bad, 0);
}

static void test_parse__u64(void **state)
{
	(void)state;
	check_num_rows("parse_u64", parse_u64, u64_rows, N_ELEMENTS(u64_rows));
}

static void test_parse__size(void **state)
{
	(void)state;
	check_num_rows("parse_size", parse_size, size_rows, N_ELEMENTS(size_rows));
}

/*
 * A long run of leading zeros is still a small number, not an overflow;
 * parse_u64 already accepts it, parse_size must agree.
 */
static void test_parse__size_leading_zeros(void **state)
{
	static const struct num_row rows[] = {
		{"0000000000000000000000000000001", 0, 1},          /* 31 digits */
		{"00000000000000000000000000000001", 0, 1},         /* 32 digits */
		{"00000000000000000000000000000000000000064K", 0, 65536},
		{"000000000000000000000000000000000000000000", 0, 0},
	};

	(void)state;
	check_num_rows("parse_size", parse_size, rows, N_ELEMENTS(rows));
}

/* A speed limit must fit curl's signed rate cap. */
static void test_parse__rate(void **state)
{
	static const struct num_row rows[] = {
		{"0", 0, 0},
		{"10M", 0, 10u << 20},
		{"9223372036854775807", 0, INT64_MAX},
		{"9223372036854775808", -ERANGE, 0},
		{"8388608T", -ERANGE, 0},
		{"fast", -EINVAL, 0},
	};

	(void)state;
	check_num_rows("parse_rate", parse_rate, rows, N_ELEMENTS(rows));
}

/* --- disk_name_valid --- */

static void test_parse__disk_name(void **state)
{
	char max_ok[DISK_NAME_MAX + 1], too_long[DISK_NAME_MAX + 2];
	const struct {
		const char *name;
		bool valid;
	} rows[] = {
		{"a", true},
		{"Z", true},
		{"0", true},
		{"disk.img", true},
		{"A-Z_a-z.0-9", true},
		{"a.", true},
		{"a..b", true},
		{"-a", true},
		{"_a", true},
		{max_ok, true},
		{too_long, false},
		{"", false},
		{NULL, false},
		{".", false},
		{"..", false},
		{".hidden", false},
		{"a/b", false},
		{"/a", false},
		{"a/", false},
		{"a b", false},
		{" a", false},
		{"a\tb", false},
		{"a\nb", false},
		{"a:b", false},
		{"a\\b", false},
		{"a*", false},
		{"a~", false},
		{"a%2f", false},
		{"\xc3\xa9", false}, /* UTF-8 e-acute */
		{"a\x7f", false},
	};
	int bad = 0;

	(void)state;
	memset(max_ok, 'a', DISK_NAME_MAX);
	max_ok[DISK_NAME_MAX] = '\0';
	memset(too_long, 'a', DISK_NAME_MAX + 1);
	too_long[DISK_NAME_MAX + 1] = '\0';
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		bool v = disk_name_valid(rows[i].name);
		EXPECT(bad, v == rows[i].valid, "disk_name_valid(row %zu \"%.40s\") = %d, want %d",
		       i, rows[i].name ? rows[i].name : "(null)", v, rows[i].valid);
	}
	assert_int_equal(bad, 0);
}

/* --- url_redact --- */

struct redact_row {
	const char *in;
	const char *out;
};

static void check_redact_rows(const struct redact_row *rows, size_t n)
{
	int bad = 0;

	for (size_t i = 0; i < n; i++) {
		char *out = url_redact(rows[i].in);

		EXPECT(bad, out != NULL, "url_redact(\"%s\") returned NULL", rows[i].in);
		if (out)
			EXPECT(bad, strcmp(out, rows[i].out) == 0,
			       "url_redact(\"%s\") = \"%s\", want \"%s\"", rows[i].in, out,
			       rows[i].out);
		free(out);
	}
	assert_int_equal(bad, 0);
}

static void test_parse__url_redact(void **state)
{
	static const struct redact_row rows[] = {
		{"http://host/path", "http://host/path"},
		{"https://host:8443/a/b.img", "https://host:8443/a/b.img"},
		{"https://user:pass@host/x", "https://host/x"},
		{"https://user@host/x", "https://host/x"},
		{"http://u:p@host", "http://host"},
		{"http://u:p@host:8080/a/b?x=1&y=2", "http://host:8080/a/b?<redacted>"},
		{"http://host/a?token=s3cr3t", "http://host/a?<redacted>"},
		{"http://host/a?", "http://host/a?<redacted>"},
		{"http://u:p@host?x=1", "http://host?<redacted>"},
		{"http://u:p@host#frag", "http://host"},
		{"http://host/p#frag", "http://host/p"},
		{"http://host/p?x=1#frag", "http://host/p?<redacted>"},
		/* an '@' outside the authority is not userinfo */
		{"http://host/a@b", "http://host/a@b"},
		{"http://host/p?q=a@b", "http://host/p?<redacted>"},
		/* an unencoded '@' in the password: the last one ends userinfo */
		{"http://u:p@ss@host/x", "http://host/x"},
		/* an unencoded '/' in the password ends the authority at a port
		 * that is no number: none of the password may show */
		{"https://u:ab/cd@host/x", "https://host/x"},
		{"https://u:ab/c@d@host/x?t=1", "https://host/x?<redacted>"},
		{"https://u:a/b#c@host/x", "https://u:a/b"},
		{"http://host:8080/a@b", "http://host:8080/a@b"},
		{"http://[::1]:8080/a@b", "http://[::1]:8080/a@b"},
		{"http://[::1]/a@b", "http://[::1]/a@b"},
		{"file:///var/lib/img/a.raw", "file:///var/lib/img/a.raw"},
		{"host/path", "host/path"},
		{"u:p@host/path", "host/path"},
		{"", ""},
	};

	(void)state;
	check_redact_rows(rows, N_ELEMENTS(rows));
}

/*
 * A '?' after '#' belongs to the fragment: there is no query string, so
 * nothing should claim one was redacted.
 */
static void test_parse__url_redact_question_mark_in_fragment(void **state)
{
	static const struct redact_row rows[] = {
		{"http://host/p#f?x", "http://host/p"},
		{"http://u:p@host#a?b", "http://host"},
	};

	(void)state;
	check_redact_rows(rows, N_ELEMENTS(rows));
}

/* curl's error text quoting a URL or proxy loses its userinfo. */
static void test_parse__url_scrub(void **state)
{
	static const struct {
		const char *msg, *url, *want;
	} rows[] = {
		{"Unsupported proxy scheme for 'htpp://alice:pw@px:3128'", "htpp://alice:pw@px:3128",
		 "Unsupported proxy scheme for 'htpp://<redacted>@px:3128'"},
		{"Could not resolve host: abc", "https://abc:xyz/def@host/x",
		 "Could not resolve host: <redacted>"},
		{"secret s3cr3t here", "http://u:s3cr3t@h/", "secret <redacted> here"},
		/* a piece that the mark itself holds does not loop */
		{"act act", "http://u:act@h/", "<redacted> <redacted>"},
		{"no credential", "http://host/x", "no credential"},
		{"Could not resolve proxy: px", NULL, "Could not resolve proxy: px"},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		char msg[128];

		snprintf(msg, sizeof(msg), "%s", rows[i].msg);
		url_scrub(msg, sizeof(msg), rows[i].url);
		EXPECT(bad, strcmp(msg, rows[i].want) == 0, "url_scrub(\"%s\", \"%s\") = \"%s\", want \"%s\"",
		       rows[i].msg, rows[i].url ? rows[i].url : "(null)", msg, rows[i].want);
	}
	assert_int_equal(bad, 0);
}

/* A mark that does not fit is cut, never leaving the secret. */
static void test_parse__url_scrub_small_buffer(void **state)
{
	char msg[16] = "xx pw0123 yy";

	(void)state;
	url_scrub(msg, sizeof(msg), "http://u:pw0123@h/");
	assert_string_equal(msg, "xx <redacted> y");
	snprintf(msg, sizeof(msg), "%s", "xxxxxx pw0123");
	url_scrub(msg, sizeof(msg), "http://u:pw0123@h/");
	assert_string_equal(msg, "xxxxxx ");
	snprintf(msg, sizeof(msg), "%s", "1234567890123pw");
	url_scrub(msg, sizeof(msg), "http://u:3pw@h/");
	assert_string_equal(msg, "123456789012");
}

static void test_parse__url_redact_null(void **state)
{
	(void)state;
	errno = 0;
	assert_null(url_redact(NULL));
	assert_int_equal(errno, EINVAL);
}

/* --- buf_is_zero --- */

static void test_parse__buf_is_zero(void **state)
{
	static const size_t lens[] = {0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 4096, 4097};
	int bad = 0;

	(void)state;
	for (size_t li = 0; li < N_ELEMENTS(lens); li++) {
		size_t len = lens[li];
		/* Exact-size allocation: a read past the end trips ASan.  The
		 * +1 offset checks an unaligned start too. */
		for (size_t shift = 0; shift < 2; shift++) {
			unsigned char *mem = calloc(len + shift ? len + shift : 1, 1);
			unsigned char *b = mem + shift;
			size_t pos[] = {0, 1, 15, 16, 17, len / 2, len ? len - 1 : 0};

			assert_non_null(mem);
			EXPECT(bad, buf_is_zero(b, len), "len %zu shift %zu: zeros not seen as zero",
			       len, shift);
			for (size_t pi = 0; pi < N_ELEMENTS(pos); pi++) {
				if (pos[pi] >= len)
					continue;
				for (unsigned v = 1; v <= 0x80; v <<= 1) {
					b[pos[pi]] = (unsigned char)v;
					EXPECT(bad, !buf_is_zero(b, len),
					       "len %zu shift %zu: byte %zu = 0x%02x not seen", len, shift,
					       pos[pi], v);
					b[pos[pi]] = 0;
				}
			}
			/* A nonzero byte just past len must not count. */
			if (shift == 0 && len > 0) {
				b[len - 1] = 1;
				EXPECT(bad, buf_is_zero(b, len - 1), "len %zu: byte past the end counted",
				       len - 1);
			}
			free(mem);
		}
	}
	/* every byte set: the 16-byte self-compare must not see equal nonzero */
	unsigned char ones[100];
	memset(ones, 0xff, sizeof(ones));
	EXPECT(bad, !buf_is_zero(ones, sizeof(ones)), "all-0xff buffer seen as zero");
	EXPECT(bad, buf_is_zero(NULL, 0), "empty buffer not zero");
	assert_int_equal(bad, 0);
}

/* --- format_bytes --- */

static void test_parse__format_bytes(void **state)
{
	static const struct {
		double bytes;
		const char *out;
	} rows[] = {
		{0, "0 B"},
		{1, "1 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{10.5 * 1024 * 1024, "10.5 MiB"},
		{1048576, "1.0 MiB"},
		{1073741824.0, "1.0 GiB"},
		{1099511627776.0, "1.0 TiB"},
		{1125899906842624.0, "1.0 PiB"},
		/* no unit past PiB: the number grows instead */
		{1152921504606846976.0, "1024.0 PiB"},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		char buf[32];
		const char *r = format_bytes(buf, sizeof(buf), rows[i].bytes);
		EXPECT(bad, r == buf, "format_bytes(%.1f) did not return buf", rows[i].bytes);
		EXPECT(bad, strcmp(buf, rows[i].out) == 0, "format_bytes(%.1f) = \"%s\", want \"%s\"",
		       rows[i].bytes, buf, rows[i].out);
	}
	assert_int_equal(bad, 0);
}

static void test_parse__format_bytes_small_buffer(void **state)
{
	char buf[8];

	(void)state;
	memset(buf, 'x', sizeof(buf));
	assert_ptr_equal(format_bytes(buf, 4, 1536), buf);
	assert_string_equal(buf, "1.5");
	assert_int_equal(buf[4], 'x');
	memset(buf, 'x', sizeof(buf));
	format_bytes(buf, 1, 1536);
	assert_int_equal(buf[0], '\0');
	assert_int_equal(buf[1], 'x');
}

/* --- full_pread / full_pwrite, with scripted pread/pwrite --- */

/*
 * One step of a script: err != 0 fails the call with that errno; otherwise
 * max > 0 caps the transfer at max bytes and max == 0 returns 0 at once.
 */
struct io_step {
	int err;
	size_t max;
};

static const struct io_step *io_script;
static size_t io_script_len, io_script_pos, io_calls;

static void io_script_set(const struct io_step *steps, size_t n)
{
	io_script = steps;
	io_script_len = n;
	io_script_pos = 0;
	io_calls = 0;
}

/* Applies the next step; returns 1 to fake the result in *ret. */
static int io_script_next(size_t *len, ssize_t *ret)
{
	io_calls++;
	if (io_script_pos >= io_script_len)
		return 0;
	const struct io_step *s = &io_script[io_script_pos++];
	if (s->err) {
		errno = s->err;
		*ret = -1;
		return 1;
	}
	if (s->max == 0) {
		*ret = 0;
		return 1;
	}
	if (*len > s->max)
		*len = s->max;
	return 0;
}

/* With _FILE_OFFSET_BITS=64 on ILP32 the libc symbols are pread64/pwrite64. */
#define IO_SYM(name) (sizeof(off_t) > sizeof(long) ? name "64" : name)

typedef ssize_t pread_fn(int, void *, size_t, off_t);
typedef ssize_t pwrite_fn(int, const void *, size_t, off_t);

ssize_t pread(int fd, void *buf, size_t len, off_t off)
{
	static pread_fn *real;
	ssize_t r;

	if (io_script_next(&len, &r))
		return r;
	if (!real)
		real = (pread_fn *)dlsym(RTLD_NEXT, IO_SYM("pread"));
	return real(fd, buf, len, off);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
	static pwrite_fn *real;
	ssize_t r;

	if (io_script_next(&len, &r))
		return r;
	if (!real)
		real = (pwrite_fn *)dlsym(RTLD_NEXT, IO_SYM("pwrite"));
	return real(fd, buf, len, off);
}

#define FILE_LEN 10000u

static int tmpfile_fd(void)
{
	char path[] = "/tmp/streamfs-test-parse-XXXXXX";
	int fd = mkstemp(path);

	assert_true(fd >= 0);
	assert_int_equal(unlink(path), 0);
	return fd;
}

static void fill_pattern(unsigned char *p, size_t len, uint64_t off)
{
	for (size_t i = 0; i < len; i++)
		p[i] = (unsigned char)((off + i) * 7 + ((off + i) >> 8));
}

static int setup_file(void **state)
{
	static unsigned char data[FILE_LEN];
	int *fd = malloc(sizeof(*fd));

	if (!fd)
		return -1;
	*fd = tmpfile_fd();
	fill_pattern(data, sizeof(data), 0);
	io_script_set(NULL, 0);
	if (full_pwrite(*fd, data, sizeof(data), 0) != 0) {
		close(*fd);
		free(fd);
		return -1;
	}
	*state = fd;
	return 0;
}

static int teardown_file(void **state)
{
	int *fd = *state;

	io_script_set(NULL, 0);
	close(*fd);
	free(fd);
	return 0;
}

static void test_parse__full_pread(void **state)
{
	static const struct {
		uint64_t off;
		size_t len;
		int ret;
	} rows[] = {
		{0, 0, 0},
		{0, 1, 0},
		{0, FILE_LEN, 0},
		{1, FILE_LEN - 1, 0},
		{FILE_LEN - 1, 1, 0},
		{4095, 2, 0},
		{FILE_LEN - 1, 2, -EIO}, /* EOF one byte early */
		{0, FILE_LEN + 1, -EIO},
		{FILE_LEN, 1, -EIO},
		{FILE_LEN, 0, 0},
		{UINT64_C(1) << 40, 1, -EIO},
	};
	int fd = *(int *)*state, bad = 0;

	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		unsigned char *buf = malloc(rows[i].len + 1), *want = malloc(rows[i].len + 1);
		assert_non_null(buf);
		assert_non_null(want);
		int r = full_pread(fd, buf, rows[i].len, rows[i].off);
		EXPECT(bad, r == rows[i].ret, "full_pread(off %" PRIu64 ", len %zu) = %d, want %d",
		       rows[i].off, rows[i].len, r, rows[i].ret);
		if (r == 0 && rows[i].ret == 0) {
			fill_pattern(want, rows[i].len, rows[i].off);
			EXPECT(bad, memcmp(buf, want, rows[i].len) == 0,
			       "full_pread(off %" PRIu64 ", len %zu): wrong data", rows[i].off,
			       rows[i].len);
		}
		free(buf);
		free(want);
	}
	assert_int_equal(bad, 0);
}

static void test_parse__full_pwrite(void **state)
{
	static const struct {
		uint64_t off;
		size_t len;
	} rows[] = {
		{0, 0},
		{0, 1},
		{FILE_LEN - 1, 1},
		{FILE_LEN, 100},         /* extends the file */
		{FILE_LEN + 5000, 3},    /* leaves a hole */
		{4095, 4097},
		{1u << 20, 8u << 20},    /* one large transfer */
	};
	int fd = *(int *)*state, bad = 0;

	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		size_t len = rows[i].len;
		unsigned char *data = malloc(len + 1), *back = malloc(len + 1);
		assert_non_null(data);
		assert_non_null(back);
		memset(data, (int)(0x41 + i), len);
		int r = full_pwrite(fd, data, len, rows[i].off);
		EXPECT(bad, r == 0, "full_pwrite(off %" PRIu64 ", len %zu) = %d", rows[i].off, len,
		       r);
		r = full_pread(fd, back, len, rows[i].off);
		EXPECT(bad, r == 0 && memcmp(back, data, len) == 0,
		       "read back after full_pwrite(off %" PRIu64 ", len %zu) differs (%d)",
		       rows[i].off, len, r);
		free(data);
		free(back);
	}
	/* the hole left by the row at FILE_LEN + 5000 reads as zeros */
	unsigned char hole[4900];
	assert_int_equal(full_pread(fd, hole, sizeof(hole), FILE_LEN + 100), 0);
	EXPECT(bad, buf_is_zero(hole, sizeof(hole)), "hole does not read as zeros");
	assert_int_equal(bad, 0);
}

/* Scripted EINTR, short transfers and zero returns, for both directions. */
static void test_parse__full_io_retries(void **state)
{
	static const struct io_step eintr[] = {{EINTR, 0}, {EINTR, 0}};
	static const struct io_step short3[] = {{0, 3}, {0, 3}, {0, 1}};
	static const struct io_step mixed[] = {{0, 1}, {EINTR, 0}, {0, 4000}, {EINTR, 0}};
	static const struct io_step eio[] = {{0, 10}, {EIO, 0}};
	static const struct io_step enospc[] = {{ENOSPC, 0}};
	static const struct io_step zero[] = {{0, 5}, {0, 0}};
	static const struct {
		const char *what;
		const struct io_step *steps;
		size_t nsteps;
		size_t len;
		int ret_read, ret_write;
		size_t calls; /* pread/pwrite calls made, when the call succeeds */
	} rows[] = {
		{"EINTR twice", eintr, N_ELEMENTS(eintr), 100, 0, 0, 3},
		{"short 3+3+1, rest", short3, N_ELEMENTS(short3), 100, 0, 0, 4},
		{"mixed", mixed, N_ELEMENTS(mixed), 5000, 0, 0, 5},
		{"EIO after progress", eio, N_ELEMENTS(eio), 100, -EIO, -EIO, 0},
		{"ENOSPC", enospc, N_ELEMENTS(enospc), 100, -ENOSPC, -ENOSPC, 0},
		{"zero-byte return", zero, N_ELEMENTS(zero), 100, -EIO, -EIO, 0},
	};
	int fd = *(int *)*state, bad = 0;
	unsigned char buf[5000], want[5000];

	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		size_t len = rows[i].len;
		uint64_t off = 17;

		memset(buf, 0, sizeof(buf));
		io_script_set(rows[i].steps, rows[i].nsteps);
		int r = full_pread(fd, buf, len, off);
		size_t calls = io_calls;
		io_script_set(NULL, 0);
		EXPECT(bad, r == rows[i].ret_read, "full_pread %s: %d, want %d", rows[i].what, r,
		       rows[i].ret_read);
		if (rows[i].ret_read == 0) {
			fill_pattern(want, len, off);
			EXPECT(bad, memcmp(buf, want, len) == 0, "full_pread %s: wrong data",
			       rows[i].what);
			EXPECT(bad, calls == rows[i].calls, "full_pread %s: %zu calls, want %zu",
			       rows[i].what, calls, rows[i].calls);
		}

		memset(buf, (int)(0x61 + i), len);
		io_script_set(rows[i].steps, rows[i].nsteps);
		r = full_pwrite(fd, buf, len, off);
		calls = io_calls;
		io_script_set(NULL, 0);
		EXPECT(bad, r == rows[i].ret_write, "full_pwrite %s: %d, want %d", rows[i].what, r,
		       rows[i].ret_write);
		if (rows[i].ret_write == 0) {
			assert_int_equal(full_pread(fd, want, len, off), 0);
			EXPECT(bad, memcmp(buf, want, len) == 0, "full_pwrite %s: wrong data on disk",
			       rows[i].what);
			EXPECT(bad, calls == rows[i].calls, "full_pwrite %s: %zu calls, want %zu",
			       rows[i].what, calls, rows[i].calls);
		}
		/* restore the pattern for the next row */
		fill_pattern(want, len, off);
		assert_int_equal(full_pwrite(fd, want, len, off), 0);
	}
	assert_int_equal(bad, 0);
}

/* Zeros between bytes left alone, and past the end of the file across
 * more than one 64 KiB piece. */
static void test_parse__full_pwrite_zeros(void **state)
{
	enum { FAR = FILE_LEN + 10, FAR_LEN = 3 * 65536 + 17 };
	static unsigned char got[FAR + FAR_LEN], want[FAR + FAR_LEN];
	static const struct {
		uint64_t off, len;
	} rows[] = {{0, 0}, {5, 1}, {100, 4096}, {FILE_LEN - 7, 7}, {FAR, FAR_LEN}};
	int fd = *(int *)*state;

	fill_pattern(want, FILE_LEN, 0); /* and zeros after: the gap is a hole */
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		assert_int_equal(full_pwrite_zeros(fd, rows[i].len, rows[i].off), 0);
		memset(want + rows[i].off, 0, rows[i].len);
	}
	assert_int_equal(lseek(fd, 0, SEEK_END), FAR + FAR_LEN);
	assert_int_equal(full_pread(fd, got, sizeof(got), 0), 0);
	assert_memory_equal(got, want, sizeof(got));
	assert_int_equal(full_pwrite_zeros(-1, 1, 0), -EBADF);
}

static void test_parse__full_io_bad_fd(void **state)
{
	char path[] = "/tmp/streamfs-test-parse-XXXXXX";
	unsigned char buf[16] = {0};
	int fd, ro, wo;

	(void)state;
	fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(full_pwrite(fd, "0123456789abcdef", 16, 0), 0);
	ro = open(path, O_RDONLY | O_CLOEXEC);
	wo = open(path, O_WRONLY | O_CLOEXEC);
	unlink(path);
	assert_true(ro >= 0);
	assert_true(wo >= 0);

	assert_int_equal(full_pread(-1, buf, sizeof(buf), 0), -EBADF);
	assert_int_equal(full_pwrite(-1, buf, sizeof(buf), 0), -EBADF);
	assert_int_equal(full_pwrite(ro, buf, sizeof(buf), 0), -EBADF);
	assert_int_equal(full_pread(wo, buf, sizeof(buf), 0), -EBADF);
	assert_int_equal(full_pread(ro, buf, sizeof(buf), 0), 0);
	assert_memory_equal(buf, "0123456789abcdef", 16);
	close(fd);
	close(ro);
	close(wo);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse__u64),
		cmocka_unit_test(test_parse__size),
		cmocka_unit_test(test_parse__size_leading_zeros),
		cmocka_unit_test(test_parse__disk_name),
		cmocka_unit_test(test_parse__url_redact),
		cmocka_unit_test(test_parse__url_redact_question_mark_in_fragment),
		cmocka_unit_test(test_parse__url_redact_null),
		cmocka_unit_test(test_parse__url_scrub),
		cmocka_unit_test(test_parse__rate),
		cmocka_unit_test(test_parse__url_scrub_small_buffer),
		cmocka_unit_test(test_parse__buf_is_zero),
		cmocka_unit_test(test_parse__format_bytes),
		cmocka_unit_test(test_parse__format_bytes_small_buffer),
		cmocka_unit_test_setup_teardown(test_parse__full_pread, setup_file, teardown_file),
		cmocka_unit_test_setup_teardown(test_parse__full_pwrite, setup_file, teardown_file),
		cmocka_unit_test_setup_teardown(test_parse__full_pwrite_zeros, setup_file,
						teardown_file),
		cmocka_unit_test_setup_teardown(test_parse__full_io_retries, setup_file,
						teardown_file),
		cmocka_unit_test(test_parse__full_io_bad_fd),
	};

	return cmocka_run_group_tests_name("parse", tests, NULL, NULL);
}
