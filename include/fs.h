/* SPDX-License-Identifier: MIT */
/*
 * The glue between fetch/ and cache/ that both the daemon and streamfsctl
 * use: adding a disk (probe the template, create its local image) and the
 * image directory's owner lock.  Callable from any thread.
 */
#ifndef STREAMFS_FS_H
#define STREAMFS_FS_H

#include <stddef.h>
#include <stdint.h>

#include "fetch.h"

struct fs_add_params {
	const char *name;
	const char *url;
	const char *manifest; /* NULL when none */
	uint64_t chunk_size;  /* 0 = CACHE_CHUNK_DEFAULT */
	uint64_t speed;       /* bytes/s, 0 = none */
};

/*
 * Validates p, probes the template through pool (network), and creates the
 * disk's local image in dirfd.  dir_shown names the directory in messages.
 * Returns 0, or -errno with one user-facing line (no credentials) in why;
 * on failure nothing is left in the directory.
 */
int fs_disk_add(struct fetch_pool *pool, int dirfd, const char *dir_shown,
		const struct fs_add_params *p, char *why, size_t why_size)
	__attribute__((warn_unused_result));

/*
 * Takes the exclusive owner lock of the image directory dirfd (a flock on
 * the directory itself).  Returns the lock fd (close it to unlock), or
 * -EBUSY with why saying the directory is in use, or another -errno.
 */
int fs_dir_lock(int dirfd, const char *dir_shown, char *why, size_t why_size)
	__attribute__((warn_unused_result));

#endif
