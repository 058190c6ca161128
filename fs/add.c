// SPDX-License-Identifier: MIT
/*
 * Adding a disk (probe + create) and the image-directory owner lock.
 * Shared by the daemon's control file and by streamfsctl's offline add.
 * Does not touch FUSE.  Any thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <unistd.h>

#include "cache.h"
#include "common/cleanup.h"
#include "fs.h"
#include "manifest.h"
#include "util.h"

/* Manifests above this size are refused (a 1 TiB disk at 1 MiB chunks needs 65 MiB). */
#define MANIFEST_MAX_BYTES (512u << 20)

/*
 * Fetches and parses the manifest of p and checks it against the probed
 * template; adopts its chunk size unless one was asked for.
 */
static int load_manifest(struct fetch_pool *pool, const struct fs_add_params *p,
			 const struct fetch_probe_result *probe, uint64_t *cs, struct manifest *ret,
			 char *why, size_t why_size)
{
	_cleanup_free_ char *shown = url_redact(p->manifest);
	_cleanup_free_ char *text = NULL;
	char reason[256];
	size_t len;
	int r;

	if (!shown)
		return -ENOMEM;
	r = fetch_document(pool, p->manifest, MANIFEST_MAX_BYTES, &text, &len, reason,
			   sizeof(reason));
	if (r < 0) {
		snprintf(why, why_size, "cannot use manifest: %s", reason);
		return r;
	}
	r = manifest_parse(text, len, ret, reason, sizeof(reason));
	if (r < 0) {
		snprintf(why, why_size, "bad manifest %s: %s", shown, reason);
		return r;
	}
	if (ret->size != probe->size) {
		snprintf(why, why_size,
			 "manifest %s describes %" PRIu64 " bytes but the template has %" PRIu64,
			 shown, ret->size, probe->size);
		manifest_clear(ret);
		return -EINVAL;
	}
	if (p->chunk_size && p->chunk_size != ret->chunk_size) {
		snprintf(why, why_size,
			 "manifest %s uses chunk size %" PRIu32 ", not the %" PRIu64 " asked for",
			 shown, ret->chunk_size, p->chunk_size);
		manifest_clear(ret);
		return -EINVAL;
	}
	*cs = ret->chunk_size;
	return 0;
}

int fs_disk_add(struct fetch_pool *pool, int dirfd, const char *dir_shown,
		const struct fs_add_params *p, char *why, size_t why_size)
{
	struct fetch_probe_result probe = {0};
	char reason[256];
	uint64_t cs = p->chunk_size ? p->chunk_size : CACHE_CHUNK_DEFAULT;
	char meta_name[DISK_NAME_MAX + 8];
	int r;

	if (!disk_name_valid(p->name)) {
		char shown[96];

		disk_name_quote(shown, sizeof(shown), p->name);
		snprintf(why, why_size,
			 "bad disk name %s: use 1-%d of A-Z a-z 0-9 . _ -, not starting with '.'",
			 shown, DISK_NAME_MAX);
		return -EINVAL;
	}
	if (cs < CACHE_CHUNK_MIN || cs > CACHE_CHUNK_MAX || (cs & (cs - 1))) {
		snprintf(why, why_size, "bad chunk size %" PRIu64 ": use a power of two from 64K to 16M",
			 cs);
		return -EINVAL;
	}
	_cleanup_free_ char *shown = url_redact(p->url);
	if (!shown)
		return -ENOMEM;
	if (strncasecmp(p->url, "http://", 7) && strncasecmp(p->url, "https://", 8) &&
	    strncasecmp(p->url, "file://", 7)) {
		snprintf(why, why_size, "bad template URL %s: use http://, https:// or file://", shown);
		return -EINVAL;
	}
	snprintf(meta_name, sizeof(meta_name), "%s.meta", p->name);
	if (faccessat(dirfd, meta_name, F_OK, AT_SYMLINK_NOFOLLOW) == 0) {
		snprintf(why, why_size, "disk '%s' already exists in %s", p->name, dir_shown);
		return -EEXIST;
	}
	/* Fail on an unwritable directory before asking the network. */
	if (faccessat(dirfd, ".", W_OK, AT_EACCESS) < 0) {
		r = -errno;
		snprintf(why, why_size, "cannot create disk '%s' in %s: %s", p->name, dir_shown,
			 strerror(-r));
		return r;
	}
	r = fetch_probe(pool, p->url, &probe, reason, sizeof(reason));
	if (r < 0) {
		snprintf(why, why_size, "cannot use template %s: %s", shown, reason);
		return r;
	}
	struct manifest mf = {0};
	if (p->manifest) {
		r = load_manifest(pool, p, &probe, &cs, &mf, why, why_size);
		if (r < 0) {
			fetch_probe_clear(&probe);
			return r;
		}
	}
	struct cache_disk_params cp = {
		.url = p->url,
		.etag = probe.etag,
		.last_modified = probe.last_modified,
		.manifest_url = p->manifest,
		.size = probe.size,
		.chunk_size = (uint32_t)cs,
		.speed = p->speed,
		.manifest = p->manifest ? &mf : NULL,
	};
	r = cache_disk_create(dirfd, p->name, &cp);
	fetch_probe_clear(&probe);
	manifest_clear(&mf);
	if (r == -EEXIST)
		snprintf(why, why_size, "disk '%s' already exists in %s", p->name, dir_shown);
	else if (r == -ENAMETOOLONG)
		snprintf(why, why_size, "template URL or validator too long for disk '%s'", p->name);
	else if (r < 0)
		snprintf(why, why_size, "cannot create disk '%s' in %s: %s", p->name, dir_shown,
			 strerror(-r));
	return r;
}

int fs_dir_lock(int dirfd, const char *dir_shown, char *why, size_t why_size)
{
	/* flock on the directory itself: nothing is created in it, and the
	 * lock dies with its holder, even after kill -9. */
	int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd < 0) {
		int e = errno;
		snprintf(why, why_size, "cannot open image directory %s: %s", dir_shown, strerror(e));
		return -e;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		int e = errno;
		close(fd);
		if (e == EWOULDBLOCK) {
			snprintf(why, why_size,
				 "image directory %s is in use by a running streamfs (unmount it first)",
				 dir_shown);
			return -EBUSY;
		}
		snprintf(why, why_size, "cannot lock image directory %s: %s", dir_shown, strerror(e));
		return -e;
	}
	return fd;
}
