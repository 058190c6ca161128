// SPDX-License-Identifier: MIT
/*
 * The mount's disk table: loading the image directory at start-up, adding
 * disks while mounted, lookups from FUSE threads, the flusher thread that
 * persists demand-fetched progress, and the cache_source adapter over a
 * fetch_template.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "fs_i.h"
#include "log.h"
#include "util.h"

#define FLUSH_EVERY_S 1

struct mount_ctx *mount_ctx_get(void)
{
	return fuse_get_context()->private_data;
}

static int src_fetch(void *opaque, void *buf, size_t len, uint64_t off,
		     const struct cache_fetch_hint *hint)
{
	struct mount_disk *md = opaque;
	const struct fetch_req rq = {
		.prio = hint->prio == CACHE_PRIO_DEMAND ? FETCH_PRIO_DEMAND : FETCH_PRIO_STREAM,
		.max_rate = hint->max_rate,
		.since_ns = hint->since_ns,
		.until_ns = hint->until_ns,
		.hooks = hint->hooks,
	};

	return fetch_template_read(md->tpl, buf, len, off, &rq);
}

static void src_counters(void *opaque, uint64_t *fetched, uint64_t *errors)
{
	struct mount_disk *md = opaque;

	fetch_template_counters(md->tpl, fetched, errors);
}

static void src_last_error(void *opaque, char *buf, size_t n)
{
	struct mount_disk *md = opaque;

	fetch_template_last_error(md->tpl, buf, n);
}

static void mount_disk_free(struct mount_disk *md)
{
	if (!md)
		return;
	cache_disk_free(md->disk);
	fetch_template_free(md->tpl);
	pthread_mutex_destroy(&md->pt_lock);
	free(md->name);
	free(md);
}

static int table_append(struct mount_ctx *m, struct mount_disk *md)
{
	pthread_rwlock_wrlock(&m->disks_lock);
	if (m->ndisks == m->cap) {
		size_t cap = m->cap ? m->cap * 2 : 16;
		struct mount_disk **n = realloc(m->disks, cap * sizeof(*n));
		if (!n) {
			pthread_rwlock_unlock(&m->disks_lock);
			return -ENOMEM;
		}
		m->disks = n;
		m->cap = cap;
	}
	m->disks[m->ndisks++] = md;
	pthread_rwlock_unlock(&m->disks_lock);
	return 0;
}

static void start_streaming(struct mount_disk *md)
{
	int r = cache_disk_stream_start(md->disk);

	/* -EIO: a disk failed before this mount, which cache_disk_open logged. */
	if (r < 0 && r != -EALREADY && r != -EIO)
		log_warn("disk %s: cannot start streaming: %s", md->name, strerror(-r));
}

int mount_load_disk(struct mount_ctx *m, const char *name, char *why, size_t why_size)
{
	struct mount_disk *md = calloc(1, sizeof(*md));
	int r;

	if (!md)
		return -ENOMEM;
	pthread_mutex_init(&md->pt_lock, NULL);
	md->name = strdup(name);
	if (!md->name) {
		mount_disk_free(md);
		return -ENOMEM;
	}
	r = cache_disk_open(m->dirfd, name, &md->disk, why, why_size);
	if (r < 0) {
		mount_disk_free(md);
		return r;
	}
	md->tpl = fetch_template_new(m->pool, cache_disk_url(md->disk), cache_disk_etag(md->disk),
				     cache_disk_last_modified(md->disk), cache_disk_size(md->disk));
	if (!md->tpl) {
		r = -errno;
		snprintf(why, why_size, "bad template URL recorded in metadata");
		mount_disk_free(md);
		return r;
	}
	const struct cache_source src = {
		.fetch_range = src_fetch,
		.get_counters = src_counters,
		.last_error = src_last_error,
		.opaque = md,
		.timeout_s = m->opts.timeout,
	};
	cache_disk_set_source(md->disk, &src);
	cache_disk_stream_set_depth(md->disk, m->depth);
	cache_disk_set_readahead(md->disk, m->readahead);
	if (m->opts.speed) {
		r = cache_disk_stream_set_speed(md->disk, m->speed);
		if (r < 0)
			log_warn("disk %s: cannot save speed limit: %s", name, strerror(-r));
	}
	r = table_append(m, md);
	if (r < 0) {
		mount_disk_free(md);
		return r;
	}
	/* Threads do not survive fuse_daemonize()'s fork: disks loaded
	 * before it start streaming in mount_start_streaming(). */
	if (m->auto_stream && m->started_threads)
		start_streaming(md);
	return 0;
}

void mount_start_streaming(struct mount_ctx *m)
{
	size_t n = 0;

	m->started_threads = true;
	if (!m->auto_stream)
		return;
	_cleanup_free_ struct mount_disk **list = mount_list(m, &n);
	for (size_t i = 0; list && i < n; i++)
		start_streaming(list[i]);
}

int mount_load_all(struct mount_ctx *m)
{
	int fd = openat(m->dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	struct dirent *de;
	char why[256];
	unsigned served = 0, broken = 0;

	if (fd < 0)
		return -errno;
	DIR *dir = fdopendir(fd);
	if (!dir) {
		close(fd);
		return -errno;
	}
	while ((de = readdir(dir))) {
		size_t n = strlen(de->d_name);
		if (n <= 5 || strcmp(de->d_name + n - 5, ".meta"))
			continue;
		char name[DISK_NAME_MAX + 1];
		if (n - 5 > DISK_NAME_MAX)
			continue;
		memcpy(name, de->d_name, n - 5);
		name[n - 5] = '\0';
		if (!disk_name_valid(name))
			continue;
		why[0] = '\0';
		int r = mount_load_disk(m, name, why, sizeof(why));
		if (r < 0) {
			log_err("disk %s not served: %s", name, why[0] ? why : strerror(-r));
			broken++;
		} else {
			served++;
		}
	}
	closedir(dir);
	log_info("serving %u disk%s from %s%s", served, served == 1 ? "" : "s", m->opts.image_dir,
		 broken ? " (some disks skipped, see above)" : "");
	return 0;
}

struct mount_disk *mount_find(struct mount_ctx *m, const char *name)
{
	struct mount_disk *found = NULL;

	pthread_rwlock_rdlock(&m->disks_lock);
	for (size_t i = 0; i < m->ndisks; i++) {
		if (!strcmp(m->disks[i]->name, name)) {
			found = m->disks[i];
			break;
		}
	}
	pthread_rwlock_unlock(&m->disks_lock);
	return found;
}

struct mount_disk *mount_find_path(struct mount_ctx *m, const char *path)
{
	if (!path || path[0] != '/' || strchr(path + 1, '/'))
		return NULL;
	return mount_find(m, path + 1);
}

struct mount_disk **mount_list(struct mount_ctx *m, size_t *ret_n)
{
	pthread_rwlock_rdlock(&m->disks_lock);
	struct mount_disk **copy = malloc((m->ndisks ? m->ndisks : 1) * sizeof(*copy));
	if (copy) {
		if (m->ndisks)
			memcpy(copy, m->disks, m->ndisks * sizeof(*copy));
		*ret_n = m->ndisks;
	}
	pthread_rwlock_unlock(&m->disks_lock);
	return copy;
}

int mount_add(struct mount_ctx *m, const struct fs_add_params *p, char *why, size_t why_size)
{
	struct fs_add_params q = *p;
	int r;

	if (!q.chunk_size && !q.manifest) /* a manifest brings its own */
		q.chunk_size = m->default_chunk;
	if (m->opts.speed)
		q.speed = m->speed;
	LOCK_GUARD(&m->add_lock);
	if (mount_find(m, p->name)) {
		snprintf(why, why_size, "disk '%s' already exists", p->name);
		return -EEXIST;
	}
	r = fs_disk_add(m->pool, m->dirfd, m->opts.image_dir, &q, why, why_size);
	if (r < 0)
		return r;
	r = mount_load_disk(m, p->name, why, why_size);
	if (r < 0)
		return r;
	_cleanup_free_ char *shown = url_redact(p->url);
	log_notice("disk %s added from %s", p->name, shown ? shown : "?");
	return 0;
}

/* One flusher tick for one disk (see FS_COMMIT_DEFAULT_S). */
static void flush_disk(const struct mount_ctx *m, struct mount_disk *md)
{
	uint64_t writes = cache_disk_writes(md->disk);
	bool busy = writes != md->flush_writes;
	uint64_t now = now_ns();

	md->flush_writes = writes;
	if (!cache_disk_dirty(md->disk)) {
		md->unsaved_since = 0;
		return;
	}
	if (!md->unsaved_since)
		md->unsaved_since = now;
	if (busy && now - md->unsaved_since < m->commit_ns)
		return;
	int r = cache_disk_sync(md->disk);
	if (r < 0) {
		log_err("disk %s: cannot save progress: %s", md->name, strerror(-r));
		return;
	}
	/* What was stored during the sync has been unsaved since at most now. */
	md->unsaved_since = cache_disk_dirty(md->disk) ? now : 0;
}

static void *flusher_main(void *opaque)
{
	struct mount_ctx *m = opaque;

	pthread_mutex_lock(&m->flush_lock);
	while (!m->flush_quit) {
		cond_wait_until(&m->flush_cond, &m->flush_lock,
				now_ns() + FLUSH_EVERY_S * 1000000000ull);
		pthread_mutex_unlock(&m->flush_lock);

		size_t n = 0;
		_cleanup_free_ struct mount_disk **list = mount_list(m, &n);
		for (size_t i = 0; list && i < n; i++)
			flush_disk(m, list[i]);
		pthread_mutex_lock(&m->flush_lock);
	}
	pthread_mutex_unlock(&m->flush_lock);
	return NULL;
}

int mount_flusher_start(struct mount_ctx *m)
{
	int r = pthread_create(&m->flusher, NULL, flusher_main, m);

	if (r)
		return -r;
	m->flusher_started = true;
	return 0;
}

void mount_flusher_stop(struct mount_ctx *m)
{
	if (!m->flusher_started)
		return;
	pthread_mutex_lock(&m->flush_lock);
	m->flush_quit = true;
	pthread_cond_broadcast(&m->flush_cond);
	pthread_mutex_unlock(&m->flush_lock);
	pthread_join(m->flusher, NULL);
	m->flusher_started = false;
}

void mount_free_disks(struct mount_ctx *m)
{
	for (size_t i = 0; i < m->ndisks; i++)
		mount_disk_free(m->disks[i]);
	free(m->disks);
	m->disks = NULL;
	m->ndisks = m->cap = 0;
}
