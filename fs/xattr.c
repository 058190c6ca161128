// SPDX-License-Identifier: MIT
/*
 * Progress xattrs (user.streamfs.*) on each disk.  Values are plain ASCII
 * without a trailing NUL.  Only user.streamfs.speed is writable.  Called
 * from FUSE worker threads; reads copy a stats snapshot and never wait for
 * I/O.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "fs_i.h"
#include "util.h"

#define PREFIX "user.streamfs."

static const char *const names[] = {
	"state", "size", "position", "cached", "progress", "rate", "speed",
	"template", "chunk_size", "error", "fetched", "errors", "waiting",
};

/* Formats xattr name of md into buf; returns length, or -ENODATA. */
static int xattr_value(struct mount_disk *md, const char *name, char *buf, size_t n)
{
	struct cache_disk_stats st;

	if (strncmp(name, PREFIX, strlen(PREFIX)))
		return -ENODATA;
	name += strlen(PREFIX);
	cache_disk_get_stats(md->disk, &st);
	if (!strcmp(name, "state"))
		return snprintf(buf, n, "%s", cache_state_name(st.state));
	if (!strcmp(name, "size"))
		return snprintf(buf, n, "%" PRIu64, st.size);
	if (!strcmp(name, "position"))
		return snprintf(buf, n, "%" PRIu64, st.position);
	if (!strcmp(name, "cached"))
		return snprintf(buf, n, "%" PRIu64, st.cached);
	if (!strcmp(name, "progress")) {
		fs_format_progress(buf, n, &st);
		return (int)strlen(buf);
	}
	if (!strcmp(name, "rate"))
		return snprintf(buf, n, "%" PRIu64, st.rate);
	if (!strcmp(name, "speed"))
		return snprintf(buf, n, "%" PRIu64, st.speed);
	if (!strcmp(name, "template")) {
		_cleanup_free_ char *shown = url_redact(cache_disk_url(md->disk));
		if (!shown)
			return -ENOMEM;
		return snprintf(buf, n, "%s", shown);
	}
	if (!strcmp(name, "chunk_size"))
		return snprintf(buf, n, "%" PRIu32, st.chunk_size);
	if (!strcmp(name, "error"))
		return snprintf(buf, n, "%s", st.error);
	if (!strcmp(name, "fetched"))
		return snprintf(buf, n, "%" PRIu64, st.fetched);
	if (!strcmp(name, "errors"))
		return snprintf(buf, n, "%" PRIu64, st.errors);
	if (!strcmp(name, "waiting"))
		return snprintf(buf, n, "%" PRIu64, st.waiting);
	return -ENODATA;
}

int fs_getxattr(const char *path, const char *name, char *value, size_t size)
{
	struct mount_disk *md = mount_find_path(mount_ctx_get(), path);
	char buf[4096];

	if (!md)
		return -ENODATA;
	int n = xattr_value(md, name, buf, sizeof(buf));
	if (n < 0)
		return n;
	if ((size_t)n >= sizeof(buf))
		n = sizeof(buf) - 1;
	if (size == 0)
		return n;
	if ((size_t)n > size)
		return -ERANGE;
	memcpy(value, buf, (size_t)n);
	return n;
}

int fs_setxattr(const char *path, const char *name, const char *value, size_t size, int flags)
{
	struct mount_disk *md = mount_find_path(mount_ctx_get(), path);
	char buf[64];
	uint64_t rate;

	(void)flags;
	if (!md)
		return -ENOTSUP;
	if (strcmp(name, PREFIX "speed"))
		return -EPERM; /* every other name is read-only or unknown */
	while (size && (value[size - 1] == '\n' || value[size - 1] == '\0'))
		size--;
	if (size == 0 || size >= sizeof(buf))
		return -EINVAL;
	memcpy(buf, value, size);
	buf[size] = '\0';
	if (parse_rate(buf, &rate) < 0)
		return -EINVAL;
	return cache_disk_stream_set_speed(md->disk, rate);
}

int fs_listxattr(const char *path, char *list, size_t size)
{
	struct mount_disk *md = mount_find_path(mount_ctx_get(), path);
	size_t need = 0;

	if (!md)
		return 0;
	for (size_t i = 0; i < ARRAY_SIZE(names); i++)
		need += strlen(PREFIX) + strlen(names[i]) + 1;
	if (size == 0)
		return (int)need;
	if (size < need)
		return -ERANGE;
	char *p = list;
	for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
		size_t n = strlen(names[i]);
		memcpy(p, PREFIX, strlen(PREFIX));
		memcpy(p + strlen(PREFIX), names[i], n + 1);
		p += strlen(PREFIX) + n + 1;
	}
	return (int)need;
}
