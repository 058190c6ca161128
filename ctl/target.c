// SPDX-License-Identifier: MIT
/*
 * streamfsctl's view of a mount: which mount point and disk a PATH on the
 * command line names, and the control-file client (one command per
 * write(2), the reply read back on the same open file).  Single-threaded;
 * every call opens and closes its own descriptors.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "ctl_i.h"

#define REPLY_LIMIT (4u * 1024 * 1024) /* far above any reply the fs sends */

/* A hint appended to errno messages that have a usual cause. */
static const char *errno_hint(int e)
{
	switch (e) {
	case ENOTCONN:
		return " (is the streamfs daemon still running?)";
	case EACCES:
	case EPERM:
		return " (only the mount's owner may send commands)";
	default:
		return "";
	}
}

static int failf(char *why, size_t why_size, int r, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int failf(char *why, size_t why_size, int r, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, why_size, fmt, ap);
	va_end(ap);
	return r;
}

int ctl_mount_point_check(const char *dir, char *why, size_t why_size)
{
	char path[PATH_MAX];
	struct stat st;

	if (snprintf(path, sizeof(path), "%s/%s", dir, CTL_CONTROL_NAME) >= (int)sizeof(path))
		return failf(why, why_size, -ENAMETOOLONG, "%s: path too long", dir);
	if (stat(path, &st) < 0) {
		int e = errno;
		if (e == ENOENT || e == ENOTDIR)
			return 0;
		/* A mount whose daemon died still shows its root from the
		 * attribute cache; only a lookup inside it tells. */
		return failf(why, why_size, -e, "cannot access %s: %s%s", path, strerror(e),
			     errno_hint(e));
	}
	return S_ISREG(st.st_mode) ? 1 : 0;
}

int ctl_target_resolve(const char *path, struct ctl_target *ret, char *why, size_t why_size)
{
	struct ctl_target t = {.shown = path};
	char real[PATH_MAX];
	struct stat st;

	if (!path || !*path)
		return failf(why, why_size, -EINVAL, "empty path");
	if (!realpath(path, real) || stat(real, &st) < 0) {
		int e = errno;
		return failf(why, why_size, -e, "cannot access %s: %s%s", path, strerror(e),
			     errno_hint(e));
	}
	if (S_ISDIR(st.st_mode)) {
		int r = ctl_mount_point_check(real, why, why_size);
		if (r < 0)
			return r;
		if (r == 0)
			return failf(why, why_size, -ENOENT,
				     "%s is not a streamfs mount point (it has no %s file)", path,
				     CTL_CONTROL_NAME);
		snprintf(t.mnt, sizeof(t.mnt), "%s", real);
		*ret = t;
		return 0;
	}
	if (!S_ISREG(st.st_mode))
		return failf(why, why_size, -EINVAL,
			     "%s is neither a streamfs disk nor a streamfs mount point", path);

	char *slash = strrchr(real, '/');
	const char *base = slash + 1;
	if (slash == real)
		snprintf(t.mnt, sizeof(t.mnt), "/");
	else
		snprintf(t.mnt, sizeof(t.mnt), "%.*s", (int)(slash - real), real);
	int r = ctl_mount_point_check(t.mnt, why, why_size);
	if (r < 0)
		return r;
	if (r == 0)
		return failf(why, why_size, -EINVAL,
			     "%s is not a streamfs disk (its directory is not a streamfs mount point)",
			     path);
	if (!strcmp(base, CTL_CONTROL_NAME))
		return failf(why, why_size, -EINVAL, "%s is the control file, not a disk", path);
	if (!disk_name_valid(base))
		return failf(why, why_size, -EINVAL, "%s is not a streamfs disk (bad disk name)", path);
	snprintf(t.name, sizeof(t.name), "%s", base);
	*ret = t;
	return 0;
}

/* Reads fd to EOF; returns 0 and *ret (NUL-terminated, caller frees) or -errno. */
static int read_all(int fd, char **ret)
{
	size_t cap = 4096, len = 0;
	_cleanup_free_ char *buf = malloc(cap);

	if (!buf)
		return -ENOMEM;
	for (;;) {
		if (cap - len < 2) {
			if (cap >= REPLY_LIMIT)
				return -EFBIG;
			char *grown = realloc(buf, cap * 2);
			if (!grown)
				return -ENOMEM;
			buf = grown;
			cap *= 2;
		}
		ssize_t n = read(fd, buf + len, cap - len - 1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	buf[len] = '\0';
	*ret = steal_ptr(buf);
	return 0;
}

/* The reason in an "error: ..." reply: its first line without the prefix. */
static void reply_reason(const char *reply, char *why, size_t why_size)
{
	const char *p = reply;

	if (!strncmp(p, "error: ", 7))
		p += 7;
	else if (!strncmp(p, "error:", 6))
		p += 6;
	snprintf(why, why_size, "%.*s", (int)strcspn(p, "\n"), p);
}

int ctl_request(const char *mnt, const char *cmd, char **ret_reply, char *why, size_t why_size)
{
	size_t len = strlen(cmd);
	char path[PATH_MAX];
	int verb_len = (int)strcspn(cmd, " ");

	if (strpbrk(cmd, "\r\n"))
		return failf(why, why_size, -EINVAL, "%.*s: command must be a single line",
			     verb_len, cmd);
	if (len + 1 > CTL_LINE_MAX)
		return failf(why, why_size, -EINVAL,
			     "%.*s: command too long for the control file (%zu bytes, at most %d)",
			     verb_len, cmd, len + 1, CTL_LINE_MAX);
	if (snprintf(path, sizeof(path), "%s/%s", mnt, CTL_CONTROL_NAME) >= (int)sizeof(path))
		return failf(why, why_size, -ENAMETOOLONG, "%s: path too long", mnt);

	_cleanup_close_ int fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		return failf(why, why_size, -e, "cannot open %s: %s%s", path, strerror(e),
			     errno_hint(e));
	}
	_cleanup_free_ char *line = malloc(len + 1);
	if (!line)
		return failf(why, why_size, -ENOMEM, "out of memory");
	memcpy(line, cmd, len);
	line[len] = '\n';

	/* The protocol is one command per write(2): never split it. */
	ssize_t w = write(fd, line, len + 1);
	int werr = w < 0 ? errno : 0;

	_cleanup_free_ char *reply = NULL;
	int r = read_all(fd, &reply);
	if (werr) {
		if (r == 0 && reply[0])
			reply_reason(reply, why, why_size);
		else
			snprintf(why, why_size, "%.*s: %s%s", verb_len, cmd, strerror(werr),
				 errno_hint(werr));
		return -werr;
	}
	if ((size_t)w != len + 1)
		return failf(why, why_size, -EIO, "%.*s: short write to %s", verb_len, cmd, path);
	if (r < 0)
		return failf(why, why_size, r, "%.*s: cannot read the reply from %s: %s", verb_len,
			     cmd, path, strerror(-r));
	if (!strncmp(reply, "error:", 6)) {
		reply_reason(reply, why, why_size);
		return -EIO;
	}
	*ret_reply = steal_ptr(reply);
	return 0;
}

int ctl_requestf(const char *mnt, char **ret_reply, char *why, size_t why_size,
		 const char *fmt, ...)
{
	_cleanup_free_ char *cmd = NULL;
	va_list ap;

	va_start(ap, fmt);
	int n = vasprintf(&cmd, fmt, ap);
	va_end(ap);
	if (n < 0)
		return failf(why, why_size, -ENOMEM, "out of memory");
	return ctl_request(mnt, cmd, ret_reply, why, why_size);
}
