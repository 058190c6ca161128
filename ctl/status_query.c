// SPDX-License-Identifier: MIT
/*
 * Reading disk status for streamfsctl: the control file's `status` and
 * `map` replies, parsed into struct ctl_status, with the user.streamfs.*
 * xattrs as a read-only fallback for users who may look but not send
 * commands.  Single-threaded.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>

#include "common/cleanup.h"
#include "ctl_i.h"

#define XATTR_PREFIX "user.streamfs."

static void closedirp(DIR **d)
{
	if (*d)
		closedir(*d);
}

void ctl_status_list_free(struct ctl_status *list, size_t n)
{
	if (!list)
		return;
	for (size_t i = 0; i < n; i++)
		free(list[i].map);
	free(list);
}


/* Parses a decimal value of vlen bytes; a malformed one reads as 0. */
static uint64_t value_u64(const char *v, size_t vlen)
{
	char tmp[32];
	uint64_t x;

	if (vlen >= sizeof(tmp))
		return 0;
	memcpy(tmp, v, vlen);
	tmp[vlen] = '\0';
	return parse_u64(tmp, &x) < 0 ? 0 : x;
}

static double value_double(const char *v, size_t vlen)
{
	char tmp[32];
	char *end;

	if (vlen == 0 || vlen >= sizeof(tmp))
		return 0;
	memcpy(tmp, v, vlen);
	tmp[vlen] = '\0';
	double d = strtod(tmp, &end);
	if (*end || d != d || d < 0)
		return 0;
	return d > 100 ? 100 : d;
}

/* Stores key=value (value of vlen bytes) into s; unknown keys are ignored. */
static void status_set(struct ctl_status *s, const char *key, size_t klen, const char *v,
		       size_t vlen)
{
	static const struct {
		const char *key;
		size_t off;
	} numbers[] = {
		{"size", offsetof(struct ctl_status, size)},
		{"cached", offsetof(struct ctl_status, cached)},
		{"position", offsetof(struct ctl_status, position)},
		{"rate", offsetof(struct ctl_status, rate)},
		{"speed", offsetof(struct ctl_status, speed)},
		{"chunk_size", offsetof(struct ctl_status, chunk_size)},
		{"fetched", offsetof(struct ctl_status, fetched)},
		{"errors", offsetof(struct ctl_status, errors)},
		{"waiting", offsetof(struct ctl_status, waiting)},
	};

#define KEY_IS(k) (klen == strlen(k) && !memcmp(key, k, klen))
	for (size_t i = 0; i < ARRAY_SIZE(numbers); i++) {
		if (KEY_IS(numbers[i].key)) {
			*(uint64_t *)((char *)s + numbers[i].off) = value_u64(v, vlen);
			return;
		}
	}
	if (KEY_IS("name"))
		snprintf(s->name, sizeof(s->name), "%.*s", (int)vlen, v);
	else if (KEY_IS("state"))
		snprintf(s->state, sizeof(s->state), "%.*s", (int)vlen, v);
	else if (KEY_IS("progress"))
		s->progress = value_double(v, vlen);
	else if (KEY_IS("template"))
		snprintf(s->template_url, sizeof(s->template_url), "%.*s", (int)vlen, v);
	else if (KEY_IS("error"))
		snprintf(s->error, sizeof(s->error), "%.*s", (int)vlen, v);
#undef KEY_IS
}

int ctl_status_parse(const char *line, struct ctl_status *ret)
{
	struct ctl_status s = {0};
	const char *p = line;

	while (*p) {
		while (*p == ' ')
			p++;
		if (!*p)
			break;
		size_t tok = strcspn(p, " ");
		const char *eq = memchr(p, '=', tok);
		if (!eq) {
			p += tok;
			continue;
		}
		size_t klen = (size_t)(eq - p);
		const char *v = eq + 1;
		/* error= is free text and the last key: it runs to the end. */
		bool rest = klen == 5 && !memcmp(p, "error", 5);
		size_t vlen = rest ? strlen(v) : tok - klen - 1;
		status_set(&s, p, klen, v, vlen);
		p = v + vlen;
	}
	if (!s.name[0])
		return -EINVAL;
	*ret = s;
	return 0;
}

/* Fetches the map of s->name from mnt into s->map. */
static int query_map(const char *mnt, struct ctl_status *s, unsigned cells, char *why,
		     size_t why_size)
{
	char *reply = NULL;
	int r = ctl_requestf(mnt, &reply, why, why_size, "map %s %u", s->name, cells);
	if (r < 0)
		return r;
	reply[strcspn(reply, "\n")] = '\0';
	s->map = reply;
	return 0;
}

/* The value of xattr user.streamfs.NAME of path into buf (NUL-terminated). */
static int get_xattr(const char *path, const char *name, char *buf, size_t size)
{
	char key[64];

	snprintf(key, sizeof(key), XATTR_PREFIX "%s", name);
	ssize_t n = getxattr(path, key, buf, size - 1);
	if (n < 0) {
		if (errno == ENODATA)
			n = 0;
		else
			return -errno;
	}
	buf[n] = '\0';
	return 0;
}

/* Reads one disk's status from its xattrs. */
static int query_xattrs_disk(const char *mnt, const char *name, struct ctl_status *ret,
			     char *why, size_t why_size)
{
	static const char *const keys[] = {
		"state", "size", "cached", "progress", "position", "rate", "speed",
		"chunk_size", "fetched", "errors", "waiting", "template", "error",
	};
	struct ctl_status s = {0};
	char path[PATH_MAX];
	char buf[CTL_LINE_MAX];

	if (snprintf(path, sizeof(path), "%s/%s", mnt, name) >= (int)sizeof(path)) {
		snprintf(why, why_size, "%s: path too long", mnt);
		return -ENAMETOOLONG;
	}
	snprintf(s.name, sizeof(s.name), "%s", name);
	for (size_t i = 0; i < ARRAY_SIZE(keys); i++) {
		int r = get_xattr(path, keys[i], buf, sizeof(buf));
		if (r < 0) {
			snprintf(why, why_size, "cannot read %s%s of %s: %s", XATTR_PREFIX, keys[i],
				 path, strerror(-r));
			return r;
		}
		status_set(&s, keys[i], strlen(keys[i]), buf, strlen(buf));
	}
	*ret = s;
	return 0;
}

static int by_name(const void *a, const void *b)
{
	return strcmp(((const struct ctl_status *)a)->name, ((const struct ctl_status *)b)->name);
}

/* Status through the xattrs: t's disk, or every disk file of the mount. */
static int query_xattrs(const struct ctl_target *t, struct ctl_status **ret_list, char *why,
			size_t why_size)
{
	/* Entries read from xattrs carry no map: plain free() releases them. */
	_cleanup_free_ struct ctl_status *list = NULL;
	size_t n = 0, cap = 0;
	int r;

	if (t->name[0]) {
		list = calloc(1, sizeof(*list));
		if (!list) {
			snprintf(why, why_size, "out of memory");
			return -ENOMEM;
		}
		r = query_xattrs_disk(t->mnt, t->name, &list[0], why, why_size);
		if (r < 0)
			return r;
		*ret_list = steal_ptr(list);
		return 1;
	}
	_cleanup_(closedirp) DIR *d = opendir(t->mnt);
	if (!d) {
		r = -errno;
		snprintf(why, why_size, "cannot list %s: %s", t->mnt, strerror(-r));
		return r;
	}
	struct dirent *de;
	while ((errno = 0, de = readdir(d))) {
		if (de->d_name[0] == '.' || !disk_name_valid(de->d_name))
			continue;
		if (n == cap) {
			size_t ncap = cap ? cap * 2 : 8;
			struct ctl_status *grown = realloc(list, ncap * sizeof(*list));
			if (!grown) {
				snprintf(why, why_size, "out of memory");
				return -ENOMEM;
			}
			list = grown;
			cap = ncap;
		}
		r = query_xattrs_disk(t->mnt, de->d_name, &list[n], why, why_size);
		if (r < 0)
			return r;
		n++;
	}
	if (errno) {
		r = -errno;
		snprintf(why, why_size, "cannot list %s: %s", t->mnt, strerror(-r));
		return r;
	}
	if (n > 1)
		qsort(list, n, sizeof(*list), by_name);
	*ret_list = steal_ptr(list);
	return (int)n;
}

int ctl_status_query(const struct ctl_target *t, unsigned map_cells,
		     struct ctl_status **ret_list, char *why, size_t why_size)
{
	_cleanup_free_ char *reply = NULL;
	int r;

	if (t->name[0])
		r = ctl_requestf(t->mnt, &reply, why, why_size, "status %s", t->name);
	else
		r = ctl_request(t->mnt, "status", &reply, why, why_size);
	if ((r == -EACCES || r == -EPERM) && !map_cells)
		return query_xattrs(t, ret_list, why, why_size);
	if (r < 0)
		return r;

	size_t lines = 0;
	for (const char *p = reply; *p; p++)
		lines += *p == '\n';
	/* One extra slot: a last line without '\n', and never calloc(0). */
	struct ctl_status *list = calloc(lines + 1, sizeof(*list));
	if (!list) {
		snprintf(why, why_size, "out of memory");
		return -ENOMEM;
	}
	size_t n = 0;
	for (char *line = reply; *line && n < lines + 1;) {
		char *nl = strchr(line, '\n');
		if (nl)
			*nl = '\0';
		if (ctl_status_parse(line, &list[n]) == 0)
			n++;
		line = nl ? nl + 1 : line + strlen(line);
	}
	for (size_t i = 0; i < n && map_cells; i++) {
		r = query_map(t->mnt, &list[i], map_cells, why, why_size);
		if (r < 0) {
			ctl_status_list_free(list, n);
			return r;
		}
	}
	*ret_list = list;
	return (int)n;
}
