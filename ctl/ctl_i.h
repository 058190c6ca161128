/* SPDX-License-Identifier: MIT */
/*
 * Private declarations of streamfsctl, the management tool: resolving a
 * user's PATH to a mount and disk, the control-file client, the parsed
 * form of a status line, and the command entry points.  streamfsctl is
 * single-threaded; nothing here keeps state between calls except the
 * output settings chosen once by main().
 */
#ifndef STREAMFS_CTL_I_H
#define STREAMFS_CTL_I_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "util.h"

#define CTL_PROG "streamfsctl"
#define CTL_CONTROL_NAME ".control"
#define CTL_LINE_MAX 4096 /* longest command the control file accepts, '\n' included */
#define CTL_MAP_MAX 4096  /* widest map the control file draws */

/* Exit codes. */
#define CTL_EXIT_OK 0
#define CTL_EXIT_FAIL 1  /* the command ran and failed */
#define CTL_EXIT_USAGE 2 /* bad command line */

/* What a PATH on the command line names. */
struct ctl_target {
	char mnt[PATH_MAX];           /* the mount point, absolute */
	char name[DISK_NAME_MAX + 1]; /* the disk, "" = every disk of the mount */
	const char *shown;            /* PATH as the user wrote it; borrowed */
};

/* One disk's status, from a status line or the xattrs. */
struct ctl_status {
	char name[DISK_NAME_MAX + 1];
	char state[16];           /* idle|streaming|paused|complete|error */
	uint64_t size;            /* bytes */
	uint64_t cached;          /* bytes present locally */
	double progress;          /* percent, 0..100 */
	uint64_t position;        /* streamer offset, bytes */
	uint64_t rate;            /* measured, bytes/s */
	uint64_t speed;           /* limit, bytes/s, 0 = none */
	uint64_t chunk_size;      /* bytes */
	uint64_t fetched;         /* bytes received from the template */
	uint64_t errors;          /* network errors seen */
	uint64_t waiting;         /* demand reads waiting on the network */
	char template_url[CTL_LINE_MAX]; /* credentials already removed by the fs */
	char error[1024];         /* "" when none */
	char *map;                /* map cells (--map only), owned; NULL when not asked */
};

/* Output settings, chosen once in main() from the terminal and locale. */
struct ctl_term {
	bool utf8_out; /* stdout is a terminal with a UTF-8 locale */
	bool utf8_err; /* the same for stderr */
};
extern struct ctl_term ctl_term;

/* --- target.c: PATH resolution and the control-file client --- */

/*
 * Resolves path to a mount point and disk: a directory holding .control
 * is a mount point (every disk); a regular file whose directory holds
 * .control is the disk of that name.  Returns 0 and fills *ret, or -errno
 * with one user-facing line in why naming path and the cause.
 */
int ctl_target_resolve(const char *path, struct ctl_target *ret, char *why, size_t why_size)
	_wur_;

/*
 * Whether directory dir is a streamfs mount point (holds a .control
 * file): returns 1 when it is, 0 when it is not, or -errno with a reason
 * in why when that cannot be told (a mount whose daemon died: ENOTCONN).
 */
int ctl_mount_point_check(const char *dir, char *why, size_t why_size) _wur_;

/*
 * Sends one command line (without its '\n') to MNT/.control in a single
 * write and reads the reply.  On success returns 0 and *ret_reply (caller
 * frees; never NULL, may be "").  On failure returns -errno and writes a
 * one-line reason to why: the filesystem's reply without "error: ", or
 * what went wrong reaching the control file.  Commands with newlines or
 * longer than CTL_LINE_MAX are refused with -EINVAL before sending.
 */
int ctl_request(const char *mnt, const char *cmd, char **ret_reply, char *why,
		size_t why_size) _wur_;

/* As ctl_request with a printf-style command. */
int ctl_requestf(const char *mnt, char **ret_reply, char *why, size_t why_size,
		 const char *fmt, ...) __attribute__((format(printf, 5, 6))) _wur_;

/* --- status_query.c: reading status --- */

/*
 * Parses one status line (without '\n') into *ret (map left NULL).
 * Unknown keys are ignored so newer daemons keep working; error= runs to
 * the end of the line.  Returns 0, or -EINVAL when name= is missing.
 */
int ctl_status_parse(const char *line, struct ctl_status *ret) _wur_;

/*
 * Reads the status of t's disk (or every disk of its mount) through the
 * control file; when the control file is not writable by this user,
 * through the xattrs instead.  With map_cells > 0 also fetches each
 * disk's map (control file only).  Returns the number of disks and
 * *ret_list (caller frees with ctl_status_list_free), or -errno with a
 * reason in why.
 */
int ctl_status_query(const struct ctl_target *t, unsigned map_cells,
		     struct ctl_status **ret_list, char *why, size_t why_size) _wur_;

/* Frees a list from ctl_status_query (and each map); NULL is a no-op. */
void ctl_status_list_free(struct ctl_status *list, size_t n);

/* --- status.c: rendering --- */

/* Writes a bar of cells cells for percent into buf (UTF-8 or ASCII). */
const char *ctl_bar(char *buf, size_t bufsize, double percent, unsigned cells, bool utf8);

/* Formats seconds left as "42s", "3m05s", "2h07m", "5d03h" or "-". */
const char *ctl_eta(char *buf, size_t bufsize, const struct ctl_status *s);

/* Percent of s present, never 100 before the disk is complete. */
double ctl_percent(uint64_t cached, uint64_t size, bool complete);

/* Width of the terminal on fd, or 0 when fd is not a terminal. */
unsigned ctl_term_columns(int fd);

/* --- commands: each takes argv with argv[0] = the command word --- */

int ctl_cmd_status(int argc, char **argv); /* status.c */
int ctl_cmd_wait(int argc, char **argv);   /* wait.c */
int ctl_cmd_start(int argc, char **argv);  /* commands.c */
int ctl_cmd_stop(int argc, char **argv);
int ctl_cmd_speed(int argc, char **argv);
int ctl_cmd_chunk(int argc, char **argv);
int ctl_cmd_verify(int argc, char **argv);

/* Prints "streamfsctl: <msg>" and a newline on stderr. */
void ctl_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * Reports the getopt failure c (':' missing value, '?' unknown option;
 * getopt_long called with a leading ':') of command cmd; returns
 * CTL_EXIT_USAGE.
 */
int ctl_bad_option(const char *cmd, int c, int argc, char **argv);

/* Prints the help text to f. */
void ctl_help(FILE *f);

#endif
