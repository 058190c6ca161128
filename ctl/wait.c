// SPDX-License-Identifier: MIT
/*
 * `streamfsctl wait`: polls a disk's (or a whole mount's) status through
 * the control file until it is complete, drawing progress on stderr: a
 * live one-line bar on a terminal, a plain line every few seconds
 * otherwise.  Single-threaded; sleeps between polls.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "ctl_i.h"

#define POLL_NS 500000000ull       /* status poll interval */
#define PLAIN_EVERY_NS 5000000000ull /* plain progress line at least this often */
#define BAR_MAX 30

/* Everything waited on, summed into one status. */
static void aggregate(const struct ctl_status *list, size_t n, const char *shown,
		      struct ctl_status *ret, const struct ctl_status **ret_failed)
{
	bool all_complete = true, any_streaming = false, any_paused = false;

	memset(ret, 0, sizeof(*ret));
	*ret_failed = NULL;
	if (n == 1)
		snprintf(ret->name, sizeof(ret->name), "%s", list[0].name);
	else
		snprintf(ret->name, sizeof(ret->name), "%s (%zu disks)", shown, n);
	for (size_t i = 0; i < n; i++) {
		const struct ctl_status *s = &list[i];
		ret->size += s->size;
		ret->cached += s->cached;
		if (!strcmp(s->state, "streaming")) {
			ret->rate += s->rate;
			any_streaming = true;
		}
		if (!strcmp(s->state, "error") && !*ret_failed)
			*ret_failed = s;
		if (!strcmp(s->state, "paused"))
			any_paused = true;
		if (strcmp(s->state, "complete"))
			all_complete = false;
	}
	snprintf(ret->state, sizeof(ret->state), "%s",
		 *ret_failed ? "error" : all_complete ? "complete" : any_streaming ? "streaming"
				       : any_paused ? "paused" : "idle");
}

/*
 * "42.17%  27.0 MiB / 64.0 MiB  5.0 MiB/s  ETA 7s", ASCII only.  With
 * fixed, every field has a constant width so a redrawn line keeps its
 * layout; otherwise the text is compact and leaves out what is unknown.
 */
static void progress_text(char *buf, size_t size, const struct ctl_status *s, double pct,
			  bool fixed)
{
	char a[24], b[24], r[32] = "-", eta[16];

	format_bytes(a, sizeof(a), (double)s->cached);
	format_bytes(b, sizeof(b), (double)s->size);
	if (!strcmp(s->state, "streaming") && s->rate > 0) {
		format_bytes(r, sizeof(r) - 2, (double)s->rate);
		snprintf(r + strlen(r), sizeof(r) - strlen(r), "/s");
	}
	ctl_eta(eta, sizeof(eta), s);
	if (fixed) {
		snprintf(buf, size, "%6.2f%%  %10s / %-10s  %12s  ETA %-6s", pct, a, b, r, eta);
		return;
	}
	int n = snprintf(buf, size, "%.2f%% (%s / %s)", pct, a, b);
	if (n > 0 && (size_t)n < size && strcmp(r, "-"))
		n += snprintf(buf + n, size - (size_t)n, ", %s", r);
	if (n > 0 && (size_t)n < size && strcmp(eta, "-"))
		snprintf(buf + n, size - (size_t)n, ", ETA %s", eta);
}

/* Redraws the live line on the terminal. */
static void draw_tty(const struct ctl_status *s, double pct)
{
	unsigned cols = ctl_term_columns(STDERR_FILENO);
	char text[160], bar[BAR_MAX * 4 + 1];

	progress_text(text, sizeof(text), s, pct, true);
	if (!cols)
		cols = 80;
	/* name, state, bar and text must fit in one line, or \r cannot
	 * redraw it: shrink the bar, then drop it, then cut the text. */
	size_t fixed = strlen(s->name) + 1 + strlen(s->state) + 2 + strlen(text) + 2;
	int cells = (int)cols - 1 - (int)fixed;
	cells = cells > BAR_MAX ? BAR_MAX : cells;
	if (cells >= 5) {
		ctl_bar(bar, sizeof(bar), pct, (unsigned)cells, ctl_term.utf8_err);
		fprintf(stderr, "\r%s %s  %s  %s\033[K", s->name, s->state, bar, text);
	} else {
		char line[512];
		snprintf(line, sizeof(line), "%s %s  %s", s->name, s->state, text);
		if (strlen(line) > cols - 1)
			line[cols - 1] = '\0';
		fprintf(stderr, "\r%s\033[K", line);
	}
	fflush(stderr);
}

static void draw_plain(const struct ctl_status *s, double pct)
{
	char text[160];

	progress_text(text, sizeof(text), s, pct, false);
	fprintf(stderr, "%s: %s %s\n", s->name, s->state, text);
	fflush(stderr);
}

static void sleep_ns(uint64_t ns)
{
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull),
			      .tv_nsec = (long)(ns % 1000000000ull)};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static int parse_timeout(const char *s, double *ret)
{
	char *end;

	errno = 0;
	double d = strtod(s, &end);
	if (end == s || *end || errno || !isfinite(d) || d < 0 || d > 1e9)
		return -EINVAL;
	*ret = d;
	return 0;
}

int ctl_cmd_wait(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"timeout", required_argument, NULL, 't'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	double timeout = -1;
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":ht:", longopts, NULL)) != -1) {
		switch (c) {
		case 't':
			if (parse_timeout(optarg, &timeout) < 0) {
				ctl_error("wait: bad timeout '%s': use a number of seconds", optarg);
				return CTL_EXIT_USAGE;
			}
			break;
		case 'h':
			ctl_help(stdout);
			return CTL_EXIT_OK;
		default:
			return ctl_bad_option("wait", c, argc, argv);
		}
	}
	if (argc - optind != 1) {
		ctl_error("wait: %s (usage: " CTL_PROG " wait <path> [--timeout SECONDS])",
			  optind >= argc ? "missing path" : "too many arguments");
		return CTL_EXIT_USAGE;
	}
	const char *path = argv[optind];
	struct ctl_target t;
	char why[1024];
	if (ctl_target_resolve(path, &t, why, sizeof(why)) < 0) {
		ctl_error("%s", why);
		return CTL_EXIT_FAIL;
	}

	bool tty = isatty(STDERR_FILENO);
	bool drawn = false, noted = false;
	uint64_t start = now_ns();
	uint64_t deadline = timeout < 0 ? UINT64_MAX : start + (uint64_t)(timeout * 1e9);
	uint64_t last_print = 0;
	double last_pct = -100;
	char last_state[16] = "";

	for (;;) {
		struct ctl_status *list = NULL;
		int n = ctl_status_query(&t, 0, &list, why, sizeof(why));
		if (n < 0) {
			if (drawn && tty)
				fputc('\n', stderr);
			ctl_error("%s", why);
			return CTL_EXIT_FAIL;
		}
		struct ctl_status sum;
		const struct ctl_status *failed;
		aggregate(list, (size_t)n, path, &sum, &failed);
		bool complete = !strcmp(sum.state, "complete");
		double pct = ctl_percent(sum.cached, sum.size, complete);
		uint64_t now = now_ns();

		if (!noted && (!strcmp(sum.state, "idle") || !strcmp(sum.state, "paused"))) {
			fprintf(stderr, CTL_PROG ": note: %s is %s; 'streamfsctl start %s' streams it\n",
				sum.name, sum.state, path);
			noted = true;
		}
		if (tty) {
			draw_tty(&sum, pct);
		} else if (!drawn || complete || failed || strcmp(sum.state, last_state) ||
			   (pct > last_pct ? pct - last_pct : last_pct - pct) >= 1.0 || now - last_print >= PLAIN_EVERY_NS) {
			draw_plain(&sum, pct);
			last_print = now;
			last_pct = pct;
		}
		drawn = true;
		snprintf(last_state, sizeof(last_state), "%s", sum.state);

		int rc = -1;
		if (failed) {
			if (tty)
				fputc('\n', stderr);
			ctl_error("%s: %s", failed->name,
				  failed->error[0] ? failed->error : "the disk is in state error");
			rc = CTL_EXIT_FAIL;
		} else if (complete) {
			if (tty)
				fputc('\n', stderr);
			rc = CTL_EXIT_OK;
		} else if (now >= deadline) {
			if (tty)
				fputc('\n', stderr);
			ctl_error("wait: %s: timed out after %g s at %.2f%%", path, timeout, pct);
			rc = CTL_EXIT_FAIL;
		}
		ctl_status_list_free(list, (size_t)n);
		if (rc >= 0)
			return rc;
		sleep_ns(MIN(POLL_NS, deadline - now));
	}
}
