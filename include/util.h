/* SPDX-License-Identifier: MIT */
/*
 * Small pure helpers shared by every module: number and size parsing, disk
 * name rules, URL redaction, HTTP range strings, full-length pread/pwrite.
 * No state; safe from any thread.
 */
#ifndef STREAMFS_UTIL_H
#define STREAMFS_UTIL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* A disk's longest file in the image directory is ".NAME.meta.tmp", and a
 * file name has at most 255 bytes (NAME_MAX). */
#define DISK_NAME_MAX (255 - 10)

/*
 * Parses a byte count: decimal digits, optionally followed by one of
 * K, M, G, T (powers of 1024, case-insensitive) and an optional "B" or
 * "iB".  "0" is valid.  Returns 0 and writes *ret, or -EINVAL for
 * anything else (empty, sign, spaces, unknown suffix) and -ERANGE on
 * overflow of uint64_t.
 */
int parse_size(const char *s, uint64_t *ret) __attribute__((warn_unused_result));

/* The largest speed limit, bytes/s: what curl's rate cap can hold. */
#define RATE_MAX ((uint64_t)INT64_MAX)

/* Parses a speed limit as parse_size; -ERANGE above RATE_MAX. */
int parse_rate(const char *s, uint64_t *ret) __attribute__((warn_unused_result));

/* Parses a plain unsigned decimal number (no suffix); as parse_size. */
int parse_u64(const char *s, uint64_t *ret) __attribute__((warn_unused_result));

/*
 * Checks a disk name: 1..DISK_NAME_MAX bytes of [A-Za-z0-9._-], not starting with
 * '.'.  Returns true when valid.
 */
bool disk_name_valid(const char *name);

/*
 * Writes a bad disk name as an error message shows it: quoted, cut at 64
 * bytes, or, when it looks like a URL (arguments swapped), not at all,
 * since a URL may carry a credential.
 */
void disk_name_quote(char *buf, size_t size, const char *name);

/*
 * Returns a copy of url fit to show to users: userinfo ("user:pass@")
 * removed and any query string replaced by "?<redacted>", since both may
 * carry credentials.  Caller frees.  NULL with errno=ENOMEM on failure.
 */
char *url_redact(const char *url);

/*
 * Replaces in msg (a NUL-terminated string in a buffer of size bytes)
 * every copy of url's userinfo, and of each of its ':'- or '/'-separated
 * pieces of 3 bytes or more, with "<redacted>": for text from libraries
 * (curl's error messages) that may quote a URL given to them.
 */
void url_scrub(char *msg, size_t size, const char *url);

/*
 * Writes the value of an HTTP Range header for [off, off+len) into buf:
 * "bytes=OFF-LAST" where LAST = off+len-1 (the end is inclusive).
 * Returns 0, -EINVAL when len is 0 or the range overflows, -ENOSPC when
 * buf is too small.
 */
int range_header_build(char *buf, size_t bufsize, uint64_t off, uint64_t len)
	__attribute__((warn_unused_result));

/*
 * Parses a Content-Range header value such as "bytes 0-99/1000" or
 * the unsatisfied-range form "bytes *" "/1000" (written without the
 * space; then *ret_start = *ret_end = UINT64_MAX).
 * A total of "*" (unknown) is rejected.  Leading/trailing whitespace is
 * allowed.  Returns 0 or -EINVAL; writes outputs only on success.
 */
int content_range_parse(const char *value, uint64_t *ret_start, uint64_t *ret_end,
			uint64_t *ret_total) __attribute__((warn_unused_result));

/* Formats bytes per second or sizes as "1.5 MiB"; returns buf. */
const char *format_bytes(char *buf, size_t bufsize, double bytes);

/*
 * pread/pwrite the whole length, retrying on EINTR and short transfers.
 * Return 0 or -errno; a read hitting EOF early returns -EIO.
 */
int full_pread(int fd, void *buf, size_t len, uint64_t off) __attribute__((warn_unused_result));
int full_pwrite(int fd, const void *buf, size_t len, uint64_t off)
	__attribute__((warn_unused_result));

/* Writes len zero bytes at off, as full_pwrite.  Returns 0 or -errno. */
int full_pwrite_zeros(int fd, uint64_t len, uint64_t off) __attribute__((warn_unused_result));

/* Returns true when len bytes at p are all zero. */
bool buf_is_zero(const void *p, size_t len);

/* Monotonic clock in nanoseconds. */
uint64_t now_ns(void);

/* Initialises c so that its timed waits run on now_ns()'s clock: a clock
 * set back must not stall a waiter. */
void cond_init_monotonic(pthread_cond_t *c);

/* Waits on c (made by cond_init_monotonic, lock held) until at_ns of
 * now_ns()'s clock at the latest. */
void cond_wait_until(pthread_cond_t *c, pthread_mutex_t *lock, uint64_t at_ns);

#endif
