// SPDX-License-Identifier: MIT
/*
 * `streamfsctl status`: a table (or a JSON array) of disk status, with an
 * optional map of the present regions under each row, plus the small
 * formatting helpers that `wait` shares (progress bar, ETA, percent).
 * Single-threaded; writes only to stdout and stderr.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "ctl_i.h"

#define BAR_CELLS 20
#define MAP_DEFAULT 64

double ctl_percent(uint64_t cached, uint64_t size, bool complete)
{
	if (complete)
		return 100.0;
	if (size == 0 || cached == 0)
		return 0.0;
	/* Truncate to hundredths as the filesystem's progress does, so a
	 * disk still lacking a byte never shows 100.00. */
	uint64_t bp = (uint64_t)((long double)cached * 10000.0L / (long double)size);
	if (bp >= 10000)
		bp = cached >= size ? 10000 : 9999;
	return (double)bp / 100.0;
}

const char *ctl_bar(char *buf, size_t bufsize, double percent, unsigned cells, bool utf8)
{
	unsigned full = (unsigned)(percent * cells / 100.0);
	size_t used = 0;

	if (full > cells)
		full = cells;
	buf[0] = '\0';
	for (unsigned i = 0; i < cells; i++) {
		const char *g = i < full ? (utf8 ? "\u2588" : "#") : (utf8 ? "\u2591" : ".");
		size_t n = strlen(g);
		if (used + n + 1 > bufsize)
			break;
		memcpy(buf + used, g, n + 1);
		used += n;
	}
	return buf;
}

const char *ctl_eta(char *buf, size_t bufsize, const struct ctl_status *s)
{
	if (strcmp(s->state, "streaming") || s->rate == 0 || s->cached >= s->size) {
		snprintf(buf, bufsize, "-");
		return buf;
	}
	uint64_t t = DIV_ROUND_UP(s->size - s->cached, s->rate);
	if (t < 60)
		snprintf(buf, bufsize, "%" PRIu64 "s", t);
	else if (t < 3600)
		snprintf(buf, bufsize, "%" PRIu64 "m%02" PRIu64 "s", t / 60, t % 60);
	else if (t < 86400)
		snprintf(buf, bufsize, "%" PRIu64 "h%02" PRIu64 "m", t / 3600, t / 60 % 60);
	else if (t < 100 * 86400)
		snprintf(buf, bufsize, "%" PRIu64 "d%02" PRIu64 "h", t / 86400, t / 3600 % 24);
	else
		snprintf(buf, bufsize, ">99d");
	return buf;
}

unsigned ctl_term_columns(int fd)
{
	struct winsize ws;

	if (!isatty(fd) || ioctl(fd, TIOCGWINSZ, &ws) < 0 || ws.ws_col == 0)
		return 0;
	return ws.ws_col;
}

/* Prints text with control characters shown as '?': error texts come
 * from remote servers and must not drive the terminal. */
static void put_sanitized(FILE *f, const char *text)
{
	for (const unsigned char *p = (const unsigned char *)text; *p; p++)
		fputc(*p < 0x20 || *p == 0x7f ? '?' : *p, f);
}

/* Length of the valid UTF-8 sequence at p, or 0 when it is not one. */
static size_t utf8_len(const unsigned char *p)
{
	unsigned char c = p[0];
	size_t n;
	unsigned char lo = 0x80, hi = 0xbf;

	if (c >= 0xc2 && c <= 0xdf)
		n = 2;
	else if (c >= 0xe0 && c <= 0xef)
		n = 3;
	else if (c >= 0xf0 && c <= 0xf4)
		n = 4;
	else
		return 0;
	/* Overlong forms, UTF-16 surrogates and code points past U+10FFFF. */
	if (c == 0xe0)
		lo = 0xa0;
	else if (c == 0xed)
		hi = 0x9f;
	else if (c == 0xf0)
		lo = 0x90;
	else if (c == 0xf4)
		hi = 0x8f;
	if (p[1] < lo || p[1] > hi)
		return 0;
	for (size_t i = 2; i < n; i++)
		if ((p[i] & 0xc0) != 0x80)
			return 0;
	return n;
}

/* Writes s as a JSON string; invalid UTF-8 becomes U+FFFD. */
static void json_string(FILE *f, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;

	fputc('"', f);
	while (*p) {
		unsigned char c = *p;
		if (c == '"' || c == '\\') {
			fputc('\\', f);
			fputc(c, f);
			p++;
		} else if (c < 0x20) {
			switch (c) {
			case '\n': fputs("\\n", f); break;
			case '\r': fputs("\\r", f); break;
			case '\t': fputs("\\t", f); break;
			case '\b': fputs("\\b", f); break;
			case '\f': fputs("\\f", f); break;
			default: fprintf(f, "\\u%04x", c); break;
			}
			p++;
		} else if (c < 0x80) {
			fputc(c, f);
			p++;
		} else {
			size_t n = utf8_len(p);
			if (n) {
				fwrite(p, 1, n, f);
				p += n;
			} else {
				fputs("\\ufffd", f);
				p++;
			}
		}
	}
	fputc('"', f);
}

static void print_json(const struct ctl_status *list, size_t n)
{
	fputs("[", stdout);
	for (size_t i = 0; i < n; i++) {
		const struct ctl_status *s = &list[i];
		fputs(i ? ",\n  {" : "\n  {", stdout);
		fputs("\"name\": ", stdout);
		json_string(stdout, s->name);
		fputs(", \"state\": ", stdout);
		json_string(stdout, s->state);
		printf(", \"size\": %" PRIu64 ", \"cached\": %" PRIu64 ", \"progress\": %.2f"
		       ", \"position\": %" PRIu64 ", \"rate\": %" PRIu64 ", \"speed\": %" PRIu64
		       ", \"chunk_size\": %" PRIu64 ", \"fetched\": %" PRIu64 ", \"errors\": %" PRIu64
		       ", \"waiting\": %" PRIu64,
		       s->size, s->cached, s->progress, s->position, s->rate, s->speed,
		       s->chunk_size, s->fetched, s->errors, s->waiting);
		fputs(", \"template\": ", stdout);
		json_string(stdout, s->template_url);
		fputs(", \"error\": ", stdout);
		if (s->error[0])
			json_string(stdout, s->error);
		else
			fputs("null", stdout);
		if (s->map) {
			fputs(", \"map\": ", stdout);
			json_string(stdout, s->map);
		}
		fputs("}", stdout);
	}
	fputs(n ? "\n]\n" : "]\n", stdout);
}

/* One map cell as a glyph: '0' none, '1'..'9' tenths, '#' all present. */
static const char *map_glyph(char cell, bool utf8)
{
	if (cell == '#')
		return utf8 ? "\u2588" : "#";
	if (cell <= '0' || cell > '9')
		return utf8 ? " " : ".";
	if (!utf8)
		return ":";
	return cell <= '3' ? "\u2591" : cell <= '6' ? "\u2592" : "\u2593";
}

static void print_map(const char *map, bool utf8)
{
	fputs("  [", stdout);
	for (const char *p = map; *p; p++)
		fputs(map_glyph(*p, utf8), stdout);
	fputs("]\n", stdout);
}

/* The cells of a row, formatted before printing so columns can align. */
struct row {
	char percent[16];
	char amount[64];
	char rate[32];
	char eta[16];
};

static void row_format(struct row *r, const struct ctl_status *s)
{
	char a[24], b[24];
	bool complete = !strcmp(s->state, "complete");

	snprintf(r->percent, sizeof(r->percent), "%.2f%%",
		 ctl_percent(s->cached, s->size, complete));
	snprintf(r->amount, sizeof(r->amount), "%s / %s", format_bytes(a, sizeof(a), (double)s->cached),
		 format_bytes(b, sizeof(b), (double)s->size));
	if (s->rate > 0 && !strcmp(s->state, "streaming"))
		snprintf(r->rate, sizeof(r->rate), "%s/s", format_bytes(a, sizeof(a), (double)s->rate));
	else
		snprintf(r->rate, sizeof(r->rate), "-");
	ctl_eta(r->eta, sizeof(r->eta), s);
}

static int print_table(const struct ctl_status *list, size_t n)
{
	bool utf8 = ctl_term.utf8_out;
	int wname = 4, wamount = 13, wrate = 4;

	_cleanup_free_ struct row *rows = calloc(n ? n : 1, sizeof(*rows));
	if (!rows) {
		ctl_error("status: out of memory");
		return CTL_EXIT_FAIL;
	}
	for (size_t i = 0; i < n; i++) {
		row_format(&rows[i], &list[i]);
		wname = MAX(wname, (int)strlen(list[i].name));
		wamount = MAX(wamount, (int)strlen(rows[i].amount));
		wrate = MAX(wrate, (int)strlen(rows[i].rate));
	}
	printf("%-*s  %-9s  %-*s  %7s  %*s  %*s  %s\n", wname, "NAME", "STATE", BAR_CELLS, "PROGRESS",
	       "PERCENT", wamount, "CACHED / SIZE", wrate, "RATE", "ETA");
	for (size_t i = 0; i < n; i++) {
		const struct ctl_status *s = &list[i];
		char bar[BAR_CELLS * 4 + 1];
		bool complete = !strcmp(s->state, "complete");

		ctl_bar(bar, sizeof(bar), ctl_percent(s->cached, s->size, complete), BAR_CELLS, utf8);
		printf("%-*s  %-9s  %s  %7s  %*s  %*s  %s\n", wname, s->name, s->state, bar,
		       rows[i].percent, wamount, rows[i].amount, wrate, rows[i].rate, rows[i].eta);
		if (s->error[0]) {
			fputs("  error: ", stdout);
			put_sanitized(stdout, s->error);
			fputc('\n', stdout);
		}
		if (s->map)
			print_map(s->map, utf8);
	}
	return CTL_EXIT_OK;
}

int ctl_cmd_status(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"json", no_argument, NULL, 'j'},
		{"map", no_argument, NULL, 'm'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	bool json = false, map = false;
	int c, rc = CTL_EXIT_OK;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case 'j':
			json = true;
			break;
		case 'm':
			map = true;
			break;
		case 'h':
			ctl_help(stdout);
			return CTL_EXIT_OK;
		default:
			return ctl_bad_option("status", c, argc, argv);
		}
	}
	if (optind >= argc) {
		ctl_error("status: missing path, a disk or a mount point (usage: " CTL_PROG
			  " status [--json] [--map] <path>...)");
		return CTL_EXIT_USAGE;
	}

	unsigned cells = 0;
	if (map) {
		unsigned cols = ctl_term_columns(STDOUT_FILENO);
		cells = cols ? (cols > 12 ? cols - 4 : 8) : MAP_DEFAULT;
		cells = MIN(cells, (unsigned)CTL_MAP_MAX);
	}

	struct ctl_status *all = NULL;
	size_t nall = 0;
	for (int i = optind; i < argc; i++) {
		struct ctl_target t;
		struct ctl_status *list = NULL;
		char why[1024];

		int r = ctl_target_resolve(argv[i], &t, why, sizeof(why));
		if (r >= 0)
			r = ctl_status_query(&t, cells, &list, why, sizeof(why));
		if (r < 0) {
			ctl_error("%s", why);
			rc = CTL_EXIT_FAIL;
			continue;
		}
		if (r == 0 && !json)
			fprintf(stderr, CTL_PROG ": %s: no disks\n", argv[i]);
		struct ctl_status *grown = realloc(all, (nall + (size_t)r + 1) * sizeof(*all));
		if (!grown) {
			ctl_status_list_free(list, (size_t)r);
			ctl_error("status: out of memory");
			rc = CTL_EXIT_FAIL;
			break;
		}
		all = grown;
		/* The maps move with their entries: free only the old array. */
		memcpy(all + nall, list, (size_t)r * sizeof(*all));
		nall += (size_t)r;
		free(list);
	}
	if (json)
		print_json(all, nall);
	else if (nall > 0 && print_table(all, nall) != CTL_EXIT_OK)
		rc = CTL_EXIT_FAIL;
	ctl_status_list_free(all, nall);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		ctl_error("status: cannot write to standard output: %s", strerror(errno));
		return CTL_EXIT_FAIL;
	}
	return rc;
}
