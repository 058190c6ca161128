// SPDX-License-Identifier: MIT
/*
 * Unit tests for the control-file command parser (fs/control_parse.h):
 * every verb with valid arguments, and every way a line can be wrong,
 * each with the reason it must give.  Inputs are passed in exact-size,
 * unterminated buffers, as a write(2) delivers them, so a read past len
 * trips ASan.  Single-threaded, no I/O.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unit.h"

#include "fs/control_parse.h"



#define KIB UINT64_C(1024)
#define MIB (KIB * 1024)

/* Parses len bytes of in from an exact-size heap copy. */
static int parse(const char *in, size_t len, struct control_cmd *cmd, char *why, size_t why_size)
{
	char *copy = malloc(len ? len : 1);

	assert_non_null(copy);
	memcpy(copy, in, len);
	int r = control_parse(copy, len, cmd, why, why_size);
	free(copy);
	return r;
}

/* Prints a line with its control characters visible, for messages. */
static const char *show(const char *in, size_t len)
{
	static char buf[160];
	size_t o = 0;

	for (size_t i = 0; i < len && o + 8 < sizeof(buf); i++) {
		unsigned char c = (unsigned char)in[i];
		if (c == '\n')
			o += (size_t)snprintf(buf + o, sizeof(buf) - o, "\\n");
		else if (c == '\r')
			o += (size_t)snprintf(buf + o, sizeof(buf) - o, "\\r");
		else if (c < 0x20 || c >= 0x7f)
			o += (size_t)snprintf(buf + o, sizeof(buf) - o, "\\x%02x", c);
		else
			buf[o++] = (char)c;
	}
	if (len > 0 && o + 8 >= sizeof(buf))
		o += (size_t)snprintf(buf + o, sizeof(buf) - o, "...");
	buf[o] = '\0';
	return buf;
}

/* --- valid commands --- */

struct ok_row {
	const char *in;
	enum control_verb verb;
	const char *name;
	const char *url;
	const char *manifest;
	uint64_t number;
	uint64_t chunk_size;
};

static int check_ok(const char *in, size_t len, const struct ok_row *row)
{
	struct control_cmd cmd;
	char why[256] = "";
	int bad = 0;

	memset(&cmd, 0x5a, sizeof(cmd));
	int r = parse(in, len, &cmd, why, sizeof(why));
	EXPECT(bad, r == 0, "\"%s\": %d (%s)", show(in, len), r, why);
	if (r != 0)
		return bad;
	EXPECT(bad, cmd.verb == row->verb, "\"%s\": verb %d, want %d", show(in, len), cmd.verb,
	       row->verb);
	EXPECT(bad, strcmp(cmd.name, row->name) == 0, "\"%s\": name \"%.40s\", want \"%.40s\"",
	       show(in, len), cmd.name, row->name);
	EXPECT(bad, strcmp(cmd.url, row->url) == 0, "\"%s\": url \"%.60s\", want \"%.60s\"",
	       show(in, len), cmd.url, row->url);
	EXPECT(bad, strcmp(cmd.manifest, row->manifest) == 0,
	       "\"%s\": manifest \"%s\", want \"%s\"", show(in, len), cmd.manifest, row->manifest);
	EXPECT(bad, cmd.number == row->number, "\"%s\": number %" PRIu64 ", want %" PRIu64,
	       show(in, len), cmd.number, row->number);
	EXPECT(bad, cmd.chunk_size == row->chunk_size,
	       "\"%s\": chunk_size %" PRIu64 ", want %" PRIu64, show(in, len), cmd.chunk_size,
	       row->chunk_size);
	return bad;
}

static void test_control_parse__valid(void **state)
{
	static const struct ok_row rows[] = {
		{"add d http://h/t.raw\n", CONTROL_ADD, "d", "http://h/t.raw", "", 0, 0},
		{"add d https://u:p@h:8443/t.raw?x=1\n", CONTROL_ADD, "d",
		 "https://u:p@h:8443/t.raw?x=1", "", 0, 0},
		{"add d file:///srv/t.raw\n", CONTROL_ADD, "d", "file:///srv/t.raw", "", 0, 0},
		{"add d HTTP://h/t\n", CONTROL_ADD, "d", "HTTP://h/t", "", 0, 0},
		{"add d Https://h/t\n", CONTROL_ADD, "d", "Https://h/t", "", 0, 0},
		{"add vm-1.img http://h/t chunk_size=1M\n", CONTROL_ADD, "vm-1.img", "http://h/t", "",
		 0, MIB},
		{"add d http://h/t manifest=http://h/t.sha\n", CONTROL_ADD, "d", "http://h/t",
		 "http://h/t.sha", 0, 0},
		{"add d http://h/t chunk_size=4M manifest=https://h/m\n", CONTROL_ADD, "d",
		 "http://h/t", "https://h/m", 0, 4 * MIB},
		{"add d http://h/t manifest=https://h/m chunk_size=4M\n", CONTROL_ADD, "d",
		 "http://h/t", "https://h/m", 0, 4 * MIB},
		{"start d\n", CONTROL_START, "d", "", "", 0, 0},
		{"stop d\n", CONTROL_STOP, "d", "", "", 0, 0},
		{"verify d\n", CONTROL_VERIFY, "d", "", "", 0, 0},
		{"status\n", CONTROL_STATUS, "", "", "", 0, 0},
		{"status d\n", CONTROL_STATUS, "d", "", "", 0, 0},
		{"speed d 0\n", CONTROL_SPEED, "d", "", "", 0, 0},
		{"speed d 1500\n", CONTROL_SPEED, "d", "", "", 1500, 0},
		{"speed d 10M\n", CONTROL_SPEED, "d", "", "", 10 * MIB, 0},
		{"speed d 1g\n", CONTROL_SPEED, "d", "", "", 1024 * MIB, 0},
		{"speed d 9223372036854775807\n", CONTROL_SPEED, "d", "", "", INT64_MAX, 0},
		{"chunk d 0\n", CONTROL_CHUNK, "d", "", "", 0, 0},
		{"chunk d 1048576\n", CONTROL_CHUNK, "d", "", "", MIB, 0},
		{"chunk d 18446744073709551615\n", CONTROL_CHUNK, "d", "", "", UINT64_MAX, 0},
		/* CRLF, and blanks around and between words */
		{"start d\r\n", CONTROL_START, "d", "", "", 0, 0},
		{"status\r\n", CONTROL_STATUS, "", "", "", 0, 0},
		{"add d http://h/t chunk_size=64K\r\n", CONTROL_ADD, "d", "http://h/t", "", 0,
		 64 * KIB},
		{"  start \t d  \n", CONTROL_START, "d", "", "", 0, 0},
		{"speed\td\t5K\n", CONTROL_SPEED, "d", "", "", 5 * KIB, 0},
		{"stop d \r\n", CONTROL_STOP, "d", "", "", 0, 0},
		/* map NAME [WIDTH]: 64 cells unless given, 1..CONTROL_MAP_MAX */
		{"map d\n", CONTROL_MAP, "d", "", "", 64, 0},
		{"map d 1\n", CONTROL_MAP, "d", "", "", 1, 0},
		{"map d 100\n", CONTROL_MAP, "d", "", "", 100, 0},
		{"map d 4096\n", CONTROL_MAP, "d", "", "", CONTROL_MAP_MAX, 0},
		{"map d 007\r\n", CONTROL_MAP, "d", "", "", 7, 0},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++)
		bad += check_ok(rows[i].in, strlen(rows[i].in), &rows[i]);
	assert_int_equal(bad, 0);
}

/* chunk_size=: every power of two from 64K to 16M, spelled several ways. */
static void test_control_parse__chunk_size_valid(void **state)
{
	static const char *const suffixes[] = {"", "K", "k", "KiB", "KB"};
	int bad = 0;

	(void)state;
	for (uint64_t cs = 64 * KIB; cs <= 16 * MIB; cs *= 2) {
		for (size_t s = 0; s < N_ELEMENTS(suffixes); s++) {
			char line[128];
			uint64_t v = *suffixes[s] ? cs / KIB : cs;
			int n = snprintf(line, sizeof(line), "add d http://h/t chunk_size=%" PRIu64 "%s\n",
					 v, suffixes[s]);
			struct ok_row row = {line, CONTROL_ADD, "d", "http://h/t", "", 0, cs};
			bad += check_ok(line, (size_t)n, &row);
		}
		if (cs >= MIB) {
			char line[128];
			int n = snprintf(line, sizeof(line), "add d http://h/t chunk_size=%" PRIu64 "M\n",
					 cs / MIB);
			struct ok_row row = {line, CONTROL_ADD, "d", "http://h/t", "", 0, cs};
			bad += check_ok(line, (size_t)n, &row);
		}
	}
	assert_int_equal(bad, 0);
}

/* Names and lines at their largest allowed size. */
static void test_control_parse__limits(void **state)
{
	char name[DISK_NAME_MAX + 1], line[CONTROL_LINE_MAX + 1], url[CONTROL_LINE_MAX];
	int bad = 0, n;

	(void)state;
	memset(name, 'n', DISK_NAME_MAX);
	name[DISK_NAME_MAX] = '\0';
	n = snprintf(line, sizeof(line), "start %s\n", name);
	struct ok_row start = {line, CONTROL_START, name, "", "", 0, 0};
	bad += check_ok(line, (size_t)n, &start);

	/* exactly CONTROL_LINE_MAX bytes, newline included */
	const char *head = "add d http://";
	size_t fill = CONTROL_LINE_MAX - strlen(head) - 1;
	memcpy(line, head, strlen(head));
	memset(line + strlen(head), 'a', fill);
	line[CONTROL_LINE_MAX - 1] = '\n';
	snprintf(url, sizeof(url), "%.*s", (int)(CONTROL_LINE_MAX - 1 - strlen("add d ")),
		 line + strlen("add d "));
	struct ok_row add = {line, CONTROL_ADD, "d", url, "", 0, 0};
	bad += check_ok(line, CONTROL_LINE_MAX, &add);

	/* the same length ending in CRLF */
	line[CONTROL_LINE_MAX - 2] = '\r';
	url[strlen(url) - 1] = '\0';
	bad += check_ok(line, CONTROL_LINE_MAX, &add);
	assert_int_equal(bad, 0);
}

/* --- bad commands --- */

struct bad_row {
	const char *in;
	size_t len;       /* 0: strlen(in) */
	const char *why;  /* text the reason must contain */
	const char *why2; /* and this too, when set */
};

static int check_bad(const char *in, size_t len, const char *want, const char *want2)
{
	struct control_cmd cmd, before;
	char why[256];
	int bad = 0;

	memset(&cmd, 0x5a, sizeof(cmd));
	before = cmd;
	memset(why, 0, sizeof(why));
	int r = parse(in, len, &cmd, why, sizeof(why));
	EXPECT(bad, r == -EINVAL, "\"%s\": %d, want -EINVAL", show(in, len), r);
	EXPECT(bad, why[0] != '\0', "\"%s\": empty reason", show(in, len));
	EXPECT(bad, strstr(why, want) != NULL, "\"%s\": reason \"%s\" lacks \"%s\"", show(in, len),
	       why, want);
	if (want2)
		EXPECT(bad, strstr(why, want2) != NULL, "\"%s\": reason \"%s\" lacks \"%s\"",
		       show(in, len), why, want2);
	EXPECT(bad, memcmp(&cmd, &before, sizeof(cmd)) == 0, "\"%s\": *ret written on failure",
	       show(in, len));
	return bad;
}

static void test_control_parse__rejects(void **state)
{
	static const struct bad_row rows[] = {
		/* framing */
		{"", 0, "newline", NULL},
		{"start d", 0, "newline", NULL},
		{"start d\r", 0, "newline", NULL},
		{"start d\nx", 0, "newline", NULL},
		{"start a\nstop b\n", 0, "one command", NULL},
		{"start a\n\n", 0, "one command", NULL},
		{"\nstart a\n", 0, "one command", NULL},
		{"\n", 0, "empty", NULL},
		{"\r\n", 0, "empty", NULL},
		{"   \t \n", 0, "empty", NULL},
		{"start d\x01\n", 0, "control character", NULL},
		{"start d\rx\n", 0, "control character", NULL},
		{"start d\r\r\n", 0, "control character", NULL},
		{"start d\0x\n", 10, "control character", NULL},
		{"\0\n", 2, "control character", NULL},
		{"start \x1b[0md\n", 0, "control character", NULL},
		/* verbs */
		{"frobnicate d\n", 0, "unknown command", "frobnicate"},
		{"START d\n", 0, "unknown command", "START"},
		{"starts d\n", 0, "unknown command", "starts"},
		{"sta d\n", 0, "unknown command", "sta"},
		{"d start\n", 0, "unknown command", NULL},
		/* missing arguments */
		{"start\n", 0, "missing disk name", NULL},
		{"stop\n", 0, "missing disk name", NULL},
		{"verify\n", 0, "missing disk name", NULL},
		{"add\n", 0, "missing disk name", NULL},
		{"add d\n", 0, "missing template URL", NULL},
		{"speed\n", 0, "missing disk name", NULL},
		{"speed d\n", 0, "missing rate", NULL},
		{"chunk\n", 0, "missing disk name", NULL},
		{"map\n", 0, "missing disk name", NULL},
		{"chunk d\n", 0, "missing offset", NULL},
		/* too many arguments */
		{"start a b\n", 0, "too many arguments", NULL},
		{"stop a b\n", 0, "too many arguments", NULL},
		{"verify a b\n", 0, "too many arguments", NULL},
		{"status a b\n", 0, "too many arguments", NULL},
		{"speed d 1 2\n", 0, "too many arguments", NULL},
		{"chunk d 1 2\n", 0, "too many arguments", NULL},
		{"map d 1 2\n", 0, "too many arguments", NULL},
		{"add d http://h/t chunk_size=64K manifest=http://h/m x\n", 0, "too many arguments",
		 NULL},
		{"start a b c d e f g h i\n", 0, "too many arguments", NULL},
		/* disk names */
		{"start .d\n", 0, "bad disk name", ".d"},
		{"start .\n", 0, "bad disk name", NULL},
		{"start ..\n", 0, "bad disk name", NULL},
		{"start ../x\n", 0, "bad disk name", NULL},
		{"start a/b\n", 0, "bad disk name", "a/b"},
		{"start /a\n", 0, "bad disk name", NULL},
		{"start a:b\n", 0, "bad disk name", NULL},
		{"start \xc3\xa9\n", 0, "bad disk name", NULL},
		{"status .x\n", 0, "bad disk name", NULL},
		{"add .d http://h/t\n", 0, "bad disk name", NULL},
		{"speed a/b 1\n", 0, "bad disk name", NULL},
		{"chunk .d 0\n", 0, "bad disk name", NULL},
		{"verify a*b\n", 0, "bad disk name", NULL},
		{"map .d\n", 0, "bad disk name", NULL},
		/* arguments swapped: a URL, which may hold a credential, is not shown */
		{"add https://u:tok@h/x d\n", 0, "bad disk name", "not shown"},
		{"start http://h/x\n", 0, "bad disk name", "not shown"},
		/* numbers */
		{"speed d fast\n", 0, "bad rate", "fast"},
		{"speed d -1\n", 0, "bad rate", NULL},
		{"speed d 1.5M\n", 0, "bad rate", NULL},
		{"speed d 10Q\n", 0, "bad rate", NULL},
		{"speed d 18446744073709551616\n", 0, "bad rate", NULL},
		{"speed d 17179869184G\n", 0, "bad rate", NULL},
		/* more than curl's rate cap can hold */
		{"speed d 9223372036854775808\n", 0, "bad rate", "too large"},
		{"speed d 8388608T\n", 0, "bad rate", NULL},
		{"chunk d x\n", 0, "bad offset", "x"},
		{"chunk d -5\n", 0, "bad offset", NULL},
		{"chunk d 0x10\n", 0, "bad offset", NULL},
		{"chunk d 18446744073709551616\n", 0, "bad offset", NULL},
		{"map d 0\n", 0, "bad width", NULL},
		{"map d 4097\n", 0, "bad width", "4097"},
		{"map d x\n", 0, "bad width", "x"},
		{"map d -1\n", 0, "bad width", NULL},
		{"map d 1K\n", 0, "bad width", NULL},
		{"map d 18446744073709551616\n", 0, "bad width", NULL},
		/* template URL */
		{"add d ftp://h/t\n", 0, "URL", "http://"},
		{"add d h/t\n", 0, "URL", NULL},
		{"add d http:/h/t\n", 0, "URL", NULL},
		{"add d //h/t\n", 0, "URL", NULL},
		{"add d httpx://h/t\n", 0, "URL", NULL},
		{"add d chunk_size=64K\n", 0, "URL", NULL},
		/* add options */
		{"add d http://h/t chunk_size=32K\n", 0, "chunk_size", "32K"},
		{"add d http://h/t chunk_size=65535\n", 0, "chunk_size", NULL},
		{"add d http://h/t chunk_size=65537\n", 0, "chunk_size", NULL},
		{"add d http://h/t chunk_size=100K\n", 0, "chunk_size", "100K"},
		{"add d http://h/t chunk_size=96K\n", 0, "chunk_size", NULL},
		{"add d http://h/t chunk_size=32M\n", 0, "chunk_size", NULL},
		{"add d http://h/t chunk_size=1G\n", 0, "chunk_size", NULL},
		{"add d http://h/t chunk_size=0\n", 0, "chunk_size", NULL},
		{"add d http://h/t chunk_size=\n", 0, "chunk_size", NULL},
		{"add d http://h/t chunk_size=abc\n", 0, "chunk_size", "abc"},
		{"add d http://h/t chunk_size=64KX\n", 0, "chunk_size", NULL},
		{"add d http://h/t chunk_size=-64K\n", 0, "chunk_size", NULL},
		{"add d http://h/t chunk_size=99999999999999999999999\n", 0, "chunk_size", NULL},
		{"add d http://h/t foo=bar\n", 0, "unknown option", "foo=bar"},
		{"add d http://h/t chunk_size\n", 0, "unknown option", NULL},
		{"add d http://h/t CHUNK_SIZE=64K\n", 0, "unknown option", NULL},
		{"add d http://h/t manifest\n", 0, "unknown option", NULL},
		{"add d http://h/t manifest=\n", 0, "manifest", NULL},
		{"add d http://h/t speed=1M\n", 0, "unknown option", "speed=1M"},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		size_t len = rows[i].len ? rows[i].len : strlen(rows[i].in);
		bad += check_bad(rows[i].in, len, rows[i].why, rows[i].why2);
	}
	assert_int_equal(bad, 0);
}

/* Lines and names one byte past their limit. */
static void test_control_parse__overlong(void **state)
{
	char line[CONTROL_LINE_MAX + 64];
	char name[DISK_NAME_MAX + 2];
	int bad = 0, n;

	(void)state;
	/* CONTROL_LINE_MAX + 1 bytes, newline-terminated */
	memcpy(line, "add d http://", 13);
	memset(line + 13, 'a', CONTROL_LINE_MAX - 13);
	line[CONTROL_LINE_MAX] = '\n';
	bad += check_bad(line, CONTROL_LINE_MAX + 1, "too long", NULL);
	/* far longer */
	memset(line + 13, 'a', sizeof(line) - 13);
	line[sizeof(line) - 1] = '\n';
	bad += check_bad(line, sizeof(line), "too long", NULL);
	/* CRLF does not buy a byte: CONTROL_LINE_MAX + 1 with "\r\n" */
	line[CONTROL_LINE_MAX - 1] = '\r';
	line[CONTROL_LINE_MAX] = '\n';
	bad += check_bad(line, CONTROL_LINE_MAX + 1, "too long", NULL);

	/* a name one byte too long */
	memset(name, 'n', DISK_NAME_MAX + 1);
	name[DISK_NAME_MAX + 1] = '\0';
	static const char *const fmts[] = {"start %s\n", "status %s\n", "add %s http://h/t\n",
					   "speed %s 1\n"};
	for (size_t i = 0; i < N_ELEMENTS(fmts); i++) {
		n = snprintf(line, sizeof(line), fmts[i], name);
		bad += check_bad(line, (size_t)n, "bad disk name", NULL);
	}
	assert_int_equal(bad, 0);
}

/* A small why buffer is filled, terminated and never overrun. */
static void test_control_parse__why_buffer(void **state)
{
	static const size_t sizes[] = {1, 2, 8, 16};
	struct control_cmd cmd;
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(sizes); i++) {
		char why[32];
		memset(why, 'x', sizeof(why));
		int r = parse("frobnicate\n", 11, &cmd, why, sizes[i]);
		EXPECT(bad, r == -EINVAL, "why_size %zu: %d", sizes[i], r);
		EXPECT(bad, memchr(why, '\0', sizes[i]) != NULL, "why_size %zu: not terminated",
		       sizes[i]);
		for (size_t k = sizes[i]; k < sizeof(why); k++)
			if (why[k] != 'x') {
				EXPECT(bad, 0, "why_size %zu: byte %zu written", sizes[i], k);
				break;
			}
	}
	assert_int_equal(parse("frobnicate\n", 11, &cmd, NULL, 0), -EINVAL);
	assert_int_equal(bad, 0);
}

static void test_control_parse__verb_name(void **state)
{
	static const struct {
		enum control_verb verb;
		const char *name;
	} rows[] = {
		{CONTROL_ADD, "add"},     {CONTROL_START, "start"},   {CONTROL_STOP, "stop"},
		{CONTROL_SPEED, "speed"}, {CONTROL_CHUNK, "chunk"},   {CONTROL_STATUS, "status"},
		{CONTROL_VERIFY, "verify"}, {CONTROL_MAP, "map"},     {(enum control_verb)99, "?"},
	};

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++)
		assert_string_equal(control_verb_name(rows[i].verb), rows[i].name);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_control_parse__valid),
		cmocka_unit_test(test_control_parse__chunk_size_valid),
		cmocka_unit_test(test_control_parse__limits),
		cmocka_unit_test(test_control_parse__rejects),
		cmocka_unit_test(test_control_parse__overlong),
		cmocka_unit_test(test_control_parse__why_buffer),
		cmocka_unit_test(test_control_parse__verb_name),
	};

	return cmocka_run_group_tests_name("control-parse", tests, NULL, NULL);
}
