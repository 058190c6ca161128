// SPDX-License-Identifier: MIT
/*
 * The one-shot streamfsctl commands: start, stop, speed, chunk and verify.
 * Each sends one control-file command per disk and stays quiet on
 * success, except chunk (the next offset) and verify (what it checked).
 * Single-threaded.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "ctl_i.h"

/*
 * Parses the options every one-shot command takes (only --help).
 * Returns -1 to go on with argv[optind...], or the exit code.
 */
static int parse_no_options(const char *cmd, int argc, char **argv)
{
	static const struct option longopts[] = {
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		if (c == 'h') {
			ctl_help(stdout);
			return CTL_EXIT_OK;
		}
		return ctl_bad_option(cmd, c, argc, argv);
	}
	return -1;
}

/* Checks the count of positional arguments; prints usage when wrong. */
static bool args_ok(const char *cmd, int argc, int want, const char *usage)
{
	if (argc - optind == want)
		return true;
	ctl_error("%s: %s (usage: " CTL_PROG " %s %s)", cmd,
		  argc - optind < want ? "missing arguments" : "too many arguments", cmd, usage);
	return false;
}

static int resolve(const char *path, struct ctl_target *t)
{
	char why[1024];

	if (ctl_target_resolve(path, t, why, sizeof(why)) < 0) {
		ctl_error("%s", why);
		return -EINVAL;
	}
	return 0;
}

/* Sends "VERB NAME[ ARG]" for one disk; returns an exit code. */
static int send_one(const char *mnt, const char *verb, const char *name, const char *arg)
{
	_cleanup_free_ char *reply = NULL;
	char why[1024];

	int r = ctl_requestf(mnt, &reply, why, sizeof(why), "%s %s%s%s", verb, name, arg ? " " : "",
			     arg ? arg : "");
	if (r < 0) {
		ctl_error("%s", why);
		return CTL_EXIT_FAIL;
	}
	if (!strcmp(verb, "start") && !strncmp(reply, "ok complete", 11))
		printf("%s: already complete\n", name);
	/* verify says what it checked: "ok 12 chunks verified". */
	if (!strcmp(verb, "verify") && !strncmp(reply, "ok ", 3))
		printf("%s: %.*s\n", name, (int)strcspn(reply + 3, "\n"), reply + 3);
	return CTL_EXIT_OK;
}

/* Sends the command to t's disk, or to every disk of t's mount. */
static int send_each(const struct ctl_target *t, const char *verb, const char *arg)
{
	if (t->name[0])
		return send_one(t->mnt, verb, t->name, arg);

	struct ctl_status *list = NULL;
	char why[1024];
	int n = ctl_status_query(t, 0, &list, why, sizeof(why));
	if (n < 0) {
		ctl_error("%s", why);
		return CTL_EXIT_FAIL;
	}
	if (n == 0)
		fprintf(stderr, CTL_PROG ": %s: no disks\n", t->shown);
	int rc = CTL_EXIT_OK;
	for (int i = 0; i < n; i++)
		if (send_one(t->mnt, verb, list[i].name, arg) != CTL_EXIT_OK)
			rc = CTL_EXIT_FAIL;
	ctl_status_list_free(list, (size_t)n);
	return rc;
}

/* start, stop, verify: one PATH, no arguments. */
static int simple(const char *verb, int argc, char **argv)
{
	struct ctl_target t;
	int r = parse_no_options(verb, argc, argv);

	if (r >= 0)
		return r;
	if (!args_ok(verb, argc, 1, "<path>"))
		return CTL_EXIT_USAGE;
	if (resolve(argv[optind], &t) < 0)
		return CTL_EXIT_FAIL;
	return send_each(&t, verb, NULL);
}

int ctl_cmd_start(int argc, char **argv)
{
	return simple("start", argc, argv);
}

int ctl_cmd_stop(int argc, char **argv)
{
	return simple("stop", argc, argv);
}

int ctl_cmd_verify(int argc, char **argv)
{
	return simple("verify", argc, argv);
}

int ctl_cmd_speed(int argc, char **argv)
{
	struct ctl_target t;
	uint64_t rate;
	char arg[32];
	int r = parse_no_options("speed", argc, argv);

	if (r >= 0)
		return r;
	if (!args_ok("speed", argc, 2, "<path> <rate>"))
		return CTL_EXIT_USAGE;
	const char *text = argv[optind + 1];
	r = parse_rate(text, &rate);
	if (r < 0) {
		ctl_error("speed: bad rate '%s': %s", text,
			  r == -ERANGE ? "too large"
				       : "use bytes per second with an optional K, M or G suffix");
		return CTL_EXIT_USAGE;
	}
	if (resolve(argv[optind], &t) < 0)
		return CTL_EXIT_FAIL;
	snprintf(arg, sizeof(arg), "%" PRIu64, rate);
	return send_each(&t, "speed", arg);
}

int ctl_cmd_chunk(int argc, char **argv)
{
	struct ctl_target t;
	uint64_t off;
	int r = parse_no_options("chunk", argc, argv);

	if (r >= 0)
		return r;
	if (!args_ok("chunk", argc, 2, "<path> <offset>"))
		return CTL_EXIT_USAGE;
	const char *text = argv[optind + 1];
	r = parse_size(text, &off);
	if (r < 0) {
		ctl_error("chunk: bad offset '%s': %s", text,
			  r == -ERANGE ? "too large"
				       : "use a byte offset with an optional K, M or G suffix");
		return CTL_EXIT_USAGE;
	}
	if (resolve(argv[optind], &t) < 0)
		return CTL_EXIT_FAIL;
	if (!t.name[0]) {
		ctl_error("chunk: %s is a mount point; name one of its disks", t.shown);
		return CTL_EXIT_FAIL;
	}

	_cleanup_free_ char *reply = NULL;
	char why[1024];
	r = ctl_requestf(t.mnt, &reply, why, sizeof(why), "chunk %s %" PRIu64, t.name, off);
	if (r < 0) {
		ctl_error("%s", why);
		return CTL_EXIT_FAIL;
	}
	reply[strcspn(reply, "\n")] = '\0';
	printf("%s\n", reply);
	return fflush(stdout) == 0 ? CTL_EXIT_OK : CTL_EXIT_FAIL;
}
