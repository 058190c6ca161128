// SPDX-License-Identifier: MIT
/*
 * One disk's local image: creation, opening, demand fills, writes,
 * durability (commit of data then bitmap), statistics and SEEK_HOLE.
 *
 * Called from FUSE worker threads, control handlers and streamer threads.
 * The source is called with no lock held; concurrent requests for the
 * same absent chunk are merged through the inflight list, so each chunk is
 * fetched once.  Crash ordering: data reach the image first; a bit reaches
 * the metadata file only after fdatasync(image) in cache_disk_sync().
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "common/endian.h"
#include "disk_i.h"
#include "log.h"
#include "manifest.h"
#include "util.h"

/* The budget of BACKGROUND_BUFFER_BUDGET: process-wide by nature (it
 * bounds the process's memory), private to this file. */
static pthread_mutex_t budget_lock = PTHREAD_MUTEX_INITIALIZER; /* leaf */
static pthread_cond_t budget_cond = PTHREAD_COND_INITIALIZER;
static uint64_t budget_used; /* guarded by budget_lock */

/* Waits until len bytes of background buffer budget are free, takes them. */
static void budget_take(uint64_t len)
{
	LOCK_GUARD(&budget_lock);
	/* A single request larger than the budget runs alone. */
	while (budget_used && budget_used + len > BACKGROUND_BUFFER_BUDGET)
		pthread_cond_wait(&budget_cond, &budget_lock);
	budget_used += len;
}

static void budget_give(uint64_t len)
{
	LOCK_GUARD(&budget_lock);
	budget_used -= len;
	pthread_cond_broadcast(&budget_cond);
}

/* At most this many bytes are fetched by one request of a demand read. */
#define RUN_MAX_BYTES (8u * 1024 * 1024)

const char *cache_state_name(enum cache_state s)
{
	switch (s) {
	case CACHE_STATE_IDLE: return "idle";
	case CACHE_STATE_STREAMING: return "streaming";
	case CACHE_STATE_PAUSED: return "paused";
	case CACHE_STATE_COMPLETE: return "complete";
	case CACHE_STATE_ERROR: return "error";
	}
	return "?";
}

static int name_path(char *buf, size_t n, const char *name, const char *suffix)
{
	int r = snprintf(buf, n, "%s%s", name, suffix);

	return r < 0 || (size_t)r >= n ? -ENAMETOOLONG : 0;
}

static bool chunk_size_ok(uint64_t cs)
{
	return cs >= CACHE_CHUNK_MIN && cs <= CACHE_CHUNK_MAX && !(cs & (cs - 1));
}

static void manifest_header(uint8_t *h, uint32_t chunk_size, uint64_t size, uint64_t chunks)
{
	memset(h, 0, MANIFEST_FILE_HEADER);
	memcpy(h, MANIFEST_FILE_MAGIC, 8);
	put_le32(h + 8, 1);
	put_le32(h + 12, chunk_size);
	put_le64(h + 16, size);
	put_le64(h + 24, chunks);
	put_le32(h + 32, meta_crc32c(h, 32));
}

/* Writes NAME.manifest (fsynced); removed again by the caller on failure. */
static int manifest_file_write(int dirfd, const char *path, const struct manifest *mf)
{
	uint8_t h[MANIFEST_FILE_HEADER];
	_cleanup_close_ int fd = openat(dirfd, path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	int r;

	if (fd < 0)
		return -errno;
	manifest_header(h, mf->chunk_size, mf->size, mf->chunks);
	r = full_pwrite(fd, h, sizeof(h), 0);
	if (r >= 0)
		r = full_pwrite(fd, mf->hashes, mf->chunks * MANIFEST_HASH_LEN, MANIFEST_FILE_HEADER);
	if (r >= 0 && fsync(fd) < 0)
		r = -errno;
	return r;
}

/* Sets the bits of the manifest's zero chunks in a new metadata file. */
static int preset_zero_chunks(int meta_fd, const struct manifest *mf)
{
	struct bitmap b;
	int r = bitmap_init(&b, mf->chunks);

	if (r < 0)
		return r;
	for (uint64_t i = 0; i < mf->chunks; i++)
		if (manifest_chunk_is_zero(mf, i))
			bitmap_set(&b, i);
	r = full_pwrite(meta_fd, b.bits, bitmap_bytes(mf->chunks), META_BITMAP_OFFSET);
	bitmap_destroy(&b);
	return r;
}

/* Opens and checks NAME.manifest against the disk's metadata. */
static int manifest_file_open(int dirfd, const char *name, const struct meta *m, char *why,
			      size_t why_size)
{
	char path[DISK_NAME_MAX + 16];
	uint8_t h[MANIFEST_FILE_HEADER], want[MANIFEST_FILE_HEADER];
	struct stat st;
	uint64_t chunks = meta_chunks(m);

	if (name_path(path, sizeof(path), name, ".manifest") < 0)
		return -ENAMETOOLONG;
	_cleanup_close_ int fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		int e = errno;
		snprintf(why, why_size, "cannot open manifest %s: %s", path, strerror(e));
		return -e;
	}
	manifest_header(want, m->chunk_size, m->size, chunks);
	if (full_pread(fd, h, sizeof(h), 0) < 0 || memcmp(h, want, sizeof(h)) ||
	    fstat(fd, &st) < 0 ||
	    (uint64_t)st.st_size != MANIFEST_FILE_HEADER + chunks * MANIFEST_HASH_LEN) {
		snprintf(why, why_size, "manifest %s is corrupt or does not match the disk", path);
		return -EBADMSG;
	}
	return steal_fd(fd);
}

/* The manifest's hash of chunk idx; 0, or -errno. */
static int manifest_hash_of(const struct cache_disk *d, uint64_t idx, uint8_t *out)
{
	return full_pread(d->manifest_fd, out, MANIFEST_HASH_LEN,
			  MANIFEST_FILE_HEADER + idx * MANIFEST_HASH_LEN);
}

bool cache_disk_has_manifest(const struct cache_disk *d)
{
	return d->manifest_fd >= 0;
}

int cache_disk_create(int dirfd, const char *name, const struct cache_disk_params *p)
{
	char img[DISK_NAME_MAX + 16], meta[DISK_NAME_MAX + 16], tmp[DISK_NAME_MAX + 32];
	char man[DISK_NAME_MAX + 16];
	uint8_t slot[META_SLOT_SIZE];
	struct meta m = {0};
	_cleanup_close_ int img_fd = -1;
	_cleanup_close_ int meta_fd = -1;
	int r;

	if (!disk_name_valid(name) || !p || !p->url || p->size == 0 ||
	    !chunk_size_ok(p->chunk_size))
		return -EINVAL;
	if (name_path(img, sizeof(img), name, ".img") < 0 ||
	    name_path(meta, sizeof(meta), name, ".meta") < 0 ||
	    name_path(man, sizeof(man), name, ".manifest") < 0 ||
	    snprintf(tmp, sizeof(tmp), ".%s.meta.tmp", name) >= (int)sizeof(tmp))
		return -ENAMETOOLONG;
	if (p->manifest && (p->manifest->size != p->size ||
			    p->manifest->chunk_size != p->chunk_size))
		return -EINVAL;

	m.version = META_VERSION;
	m.size = p->size;
	m.chunk_size = p->chunk_size;
	m.speed = p->speed;
	m.url = (char *)p->url;
	m.etag = (char *)(p->etag ? p->etag : "");
	m.last_modified = (char *)(p->last_modified ? p->last_modified : "");
	m.manifest_url = (char *)(p->manifest_url ? p->manifest_url : "");
	if (p->manifest)
		m.flags |= META_FLAG_MANIFEST;
	r = meta_encode(&m, slot);
	if (r < 0)
		return r;

	if (faccessat(dirfd, meta, F_OK, AT_SYMLINK_NOFOLLOW) == 0)
		return -EEXIST;
	img_fd = openat(dirfd, img, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (img_fd < 0)
		return -errno;
	if (ftruncate(img_fd, (off_t)p->size) < 0) {
		r = -errno;
		goto fail_img;
	}
	meta_fd = openat(dirfd, tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (meta_fd < 0) {
		r = -errno;
		goto fail_img;
	}
	uint64_t total = META_BITMAP_OFFSET + bitmap_bytes(meta_chunks(&m));
	r = full_pwrite(meta_fd, slot, sizeof(slot), 0);
	if (r >= 0 && ftruncate(meta_fd, (off_t)total) < 0)
		r = -errno;
	if (r >= 0 && p->manifest) {
		/* Zero chunks are present from the start: the new image is
		 * all holes there, so they are never fetched. */
		r = manifest_file_write(dirfd, man, p->manifest);
		if (r >= 0)
			r = preset_zero_chunks(meta_fd, p->manifest);
	}
	if (r >= 0 && (fsync(meta_fd) < 0 || fsync(img_fd) < 0))
		r = -errno;
	if (r >= 0 && renameat2(dirfd, tmp, dirfd, meta, RENAME_NOREPLACE) < 0)
		r = -errno;
	if (r < 0) {
		unlinkat(dirfd, tmp, 0);
		if (p->manifest)
			unlinkat(dirfd, man, 0);
		goto fail_img;
	}
	if (fsync(dirfd) < 0 && errno != EINVAL)
		log_warn("cannot sync image directory after creating %s: %m", name);
	return 0;

fail_img:
	unlinkat(dirfd, img, 0);
	return r;
}

int cache_disk_open(int dirfd, const char *name, struct cache_disk **ret, char *why,
		    size_t why_size)
{
	char img[DISK_NAME_MAX + 16], meta[DISK_NAME_MAX + 16];
	char dummy[8];
	struct stat st;
	int r;

	if (!why) {
		why = dummy;
		why_size = sizeof(dummy);
	}
	why[0] = '\0';
	if (!disk_name_valid(name)) {
		snprintf(why, why_size, "invalid disk name");
		return -EINVAL;
	}
	if (name_path(img, sizeof(img), name, ".img") < 0 ||
	    name_path(meta, sizeof(meta), name, ".meta") < 0)
		return -ENAMETOOLONG;

	struct cache_disk *d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->img_fd = d->meta_fd = d->manifest_fd = -1;
	d->name = strdup(name);
	if (!d->name) {
		r = -ENOMEM;
		goto fail;
	}
	d->meta_fd = openat(dirfd, meta, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
	if (d->meta_fd < 0) {
		r = -errno;
		snprintf(why, why_size, "cannot open %s: %s", meta, strerror(-r));
		goto fail;
	}
	r = meta_load(d->meta_fd, &d->meta, &d->present, why, why_size);
	if (r < 0)
		goto fail;
	d->img_fd = openat(dirfd, img, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
	if (d->img_fd < 0) {
		r = -errno;
		snprintf(why, why_size, "cannot open local image %s: %s", img, strerror(-r));
		goto fail;
	}
	if (fstat(d->img_fd, &st) < 0) {
		r = -errno;
		goto fail;
	}
	if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != d->meta.size) {
		snprintf(why, why_size, "local image %s is %lld bytes, metadata says %" PRIu64,
			 img, (long long)st.st_size, d->meta.size);
		r = -EBADMSG;
		goto fail;
	}
	if (d->meta.flags & META_FLAG_MANIFEST) {
		d->manifest_fd = manifest_file_open(dirfd, name, &d->meta, why, why_size);
		if (d->manifest_fd < 0) {
			r = d->manifest_fd;
			goto fail;
		}
	}
	d->chunk_size = d->meta.chunk_size;
	d->chunk_shift = (unsigned)__builtin_ctz(d->chunk_size);
	d->nchunks = meta_chunks(&d->meta);
	r = bitmap_init(&d->dirty, DIV_ROUND_UP(d->nchunks, DIRTY_PAGE_CHUNKS));
	if (r < 0)
		goto fail;
	pthread_mutex_init(&d->lock, NULL);
	pthread_mutex_init(&d->commit_lock, NULL);
	pthread_cond_init(&d->fill_cond, NULL);
	stream_init(d);
	readahead_init(d);
	*ret = d;
	return 0;

fail:
	bitmap_destroy(&d->present);
	meta_clear(&d->meta);
	if (d->img_fd >= 0)
		close(d->img_fd);
	if (d->meta_fd >= 0)
		close(d->meta_fd);
	if (d->manifest_fd >= 0)
		close(d->manifest_fd);
	free(d->name);
	free(d);
	return r;
}

void cache_disk_free(struct cache_disk *d)
{
	int r;

	if (!d)
		return;
	readahead_destroy(d);
	stream_destroy(d);
	r = cache_disk_sync(d);
	if (r < 0)
		log_err("cannot save state of disk %s: %s", d->name, strerror(-r));
	if (d->inflight)
		log_err("disk %s freed with fills in flight", d->name);
	pthread_cond_destroy(&d->fill_cond);
	pthread_mutex_destroy(&d->commit_lock);
	pthread_mutex_destroy(&d->lock);
	bitmap_destroy(&d->present);
	bitmap_destroy(&d->dirty);
	meta_clear(&d->meta);
	close(d->img_fd);
	close(d->meta_fd);
	if (d->manifest_fd >= 0)
		close(d->manifest_fd);
	free(d->name);
	free(d);
}

void cache_disk_set_source(struct cache_disk *d, const struct cache_source *src)
{
	d->src = *src;
}

const char *cache_disk_name(const struct cache_disk *d) { return d->name; }
const char *cache_disk_url(const struct cache_disk *d) { return d->meta.url; }
const char *cache_disk_etag(const struct cache_disk *d) { return d->meta.etag; }
const char *cache_disk_last_modified(const struct cache_disk *d) { return d->meta.last_modified; }
uint64_t cache_disk_size(const struct cache_disk *d) { return d->meta.size; }
uint32_t cache_disk_chunk_size(const struct cache_disk *d) { return d->chunk_size; }
int cache_disk_fd(const struct cache_disk *d) { return d->img_fd; }

uint64_t disk_chunk_len(const struct cache_disk *d, uint64_t idx)
{
	uint64_t start = idx << d->chunk_shift;

	return MIN((uint64_t)d->chunk_size, d->meta.size - start);
}

void disk_set_error(struct cache_disk *d, const char *fmt, ...)
{
	char buf[sizeof(d->error)];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	LOCK_GUARD(&d->lock);
	memcpy(d->error, buf, sizeof(buf));
}

void disk_error_flags(struct cache_disk *d, bool *ret_failed, bool *ret_local)
{
	LOCK_GUARD(&d->lock);
	*ret_failed = d->failed;
	*ret_local = d->local_error;
}

uint64_t disk_absent_run_end(struct cache_disk *d, uint64_t idx, uint64_t max)
{
	LOCK_GUARD(&d->lock);
	uint64_t last = idx;
	while (last + 1 < d->nchunks && last + 1 - idx < max && !bitmap_get(&d->present, last + 1))
		last++;
	return last;
}

uint64_t disk_run_len(const struct cache_disk *d, uint64_t first, uint64_t last)
{
	return ((last - first) << d->chunk_shift) + disk_chunk_len(d, last);
}

int64_t disk_next_absent(struct cache_disk *d, uint64_t from)
{
	LOCK_GUARD(&d->lock);
	return bitmap_next_clear(&d->present, from);
}

static struct inflight *inflight_find_locked(struct cache_disk *d, uint64_t idx)
{
	for (struct inflight *f = d->inflight; f; f = f->next)
		if (f->idx == idx)
			return f;
	return NULL;
}

/* Claims chunk idx for this thread; caller has checked it is absent and free. */
static struct inflight *inflight_claim_locked(struct cache_disk *d, uint64_t idx)
{
	struct inflight *f = calloc(1, sizeof(*f));

	if (!f)
		return NULL;
	f->idx = idx;
	f->refs = 1;
	f->next = d->inflight;
	d->inflight = f;
	return f;
}

static void inflight_unref_locked(struct inflight *f)
{
	if (--f->refs == 0)
		free(f);
}

/*
 * Finishes the owner's claim: on success marks the chunk present and its
 * bitmap page dirty.  Unlinks the entry so that after a failure the next
 * caller may try again, and wakes every waiter.
 */
static void inflight_finish_locked(struct cache_disk *d, struct inflight *f, int result)
{
	if (result >= 0) {
		bitmap_set(&d->present, f->idx);
		bitmap_set(&d->dirty, f->idx / DIRTY_PAGE_CHUNKS);
	}
	for (struct inflight **pp = &d->inflight; *pp; pp = &(*pp)->next) {
		if (*pp == f) {
			*pp = f->next;
			break;
		}
	}
	f->done = true;
	f->result = result;
	pthread_cond_broadcast(&d->fill_cond);
	inflight_unref_locked(f);
}

/* Waits for another thread's fill of f; returns its result. */
static int inflight_wait_locked(struct cache_disk *d, struct inflight *f)
{
	while (!f->done)
		pthread_cond_wait(&d->fill_cond, &d->lock);
	int r = f->result;
	inflight_unref_locked(f);
	return r;
}

/*
 * Stores one fetched chunk in the image.  An all-zero chunk becomes a hole:
 * cheaper, keeps the image sparse, and, unlike skipping the write,
 * replaces whatever an interrupted earlier write left there.
 */
static int store_chunk(struct cache_disk *d, uint64_t idx, const void *buf)
{
	uint64_t off = idx << d->chunk_shift;
	uint64_t len = disk_chunk_len(d, idx);

	int r = -EOPNOTSUPP;

	if (buf_is_zero(buf, len)) {
		r = fallocate(d->img_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
			      (off_t)len) == 0 ? 0 : -errno;
		if (r == -ENOSYS)
			r = -EOPNOTSUPP;
	}
	if (r == -EOPNOTSUPP)
		r = full_pwrite(d->img_fd, buf, len, off);
	/* Counted once done, so a sync that reads the counter covers it. */
	atomic_fetch_add(&d->writes_since_sync, 1);
	return r;
}

/* Classifies a failure and records it for user.streamfs.error. */
static void note_fill_error(struct cache_disk *d, uint64_t first, uint64_t last, int r,
			    bool local)
{
	char src_err[160] = "";

	if (local) {
		disk_set_error(d, "cannot write local image: %s", strerror(-r));
		LOCK_GUARD(&d->lock);
		d->local_error = true;
		return;
	}
	if (d->src.last_error)
		d->src.last_error(d->src.opaque, src_err, sizeof(src_err));
	if (r == -ESTALE) {
		disk_set_error(d, "template changed since the disk was added: %s",
			       src_err[0] ? src_err : "validator differs");
		LOCK_GUARD(&d->lock);
		if (!d->failed)
			log_err("disk %s: template changed; absent data now fail with EIO", d->name);
		d->failed = true;
		return;
	}
	disk_set_error(d, "cannot fetch chunks %" PRIu64 "-%" PRIu64 ": %s", first, last,
		       src_err[0] ? src_err : strerror(-r));
}

/*
 * Checks the fetched chunks [a, b] in buf against the manifest.  Returns
 * 0, -EILSEQ with *ret_bad set to the first mismatching chunk, or -errno.
 */
static int verify_run(struct cache_disk *d, const uint8_t *buf, uint64_t a, uint64_t b,
		      uint64_t *ret_bad)
{
	uint8_t want[MANIFEST_HASH_LEN], got[MANIFEST_HASH_LEN];
	int r;

	if (d->manifest_fd < 0)
		return 0;
	for (uint64_t i = a; i <= b; i++) {
		const uint8_t *chunk = buf + ((i - a) << d->chunk_shift);
		uint64_t len = disk_chunk_len(d, i);
		r = manifest_hash_of(d, i, want);
		if (r < 0)
			return r;
		if (buf_is_zero(want, sizeof(want)))
			r = buf_is_zero(chunk, len) ? 0 : -EILSEQ;
		else if ((r = manifest_sha256(chunk, len, got)) == 0)
			r = memcmp(want, got, sizeof(got)) ? -EILSEQ : 0;
		if (r == -EILSEQ)
			*ret_bad = i;
		if (r < 0)
			return r;
	}
	return 0;
}

/* Fetches chunks [a, b], all claimed by the caller, and finishes the claims. */
static int fill_run(struct cache_disk *d, struct inflight **claims, uint64_t a, uint64_t b,
		    const struct cache_fetch_hint *hint)
{
	uint64_t off = a << d->chunk_shift;
	uint64_t len = ((b - a) << d->chunk_shift) + disk_chunk_len(d, b);
	uint64_t bad = 0;
	bool local = false;
	void *buf = NULL;
	int r;

	bool background = hint->prio != CACHE_PRIO_DEMAND;

	if (background)
		budget_take(len);
	if (!d->src.fetch_range) {
		r = -EIO;
	} else if (posix_memalign(&buf, 4096, len)) {
		r = -ENOMEM;
	} else {
		if (hint->prio == CACHE_PRIO_DEMAND)
			atomic_fetch_add(&d->waiting, 1);
		/* A chunk that does not match the manifest is fetched once
		 * more (a glitch on the way), then it is an error. */
		for (int attempt = 0; attempt < 2; attempt++) {
			r = d->src.fetch_range(d->src.opaque, buf, len, off, hint);
			if (r >= 0)
				r = verify_run(d, buf, a, b, &bad);
			if (r != -EILSEQ)
				break;
			log_warn("disk %s: chunk %" PRIu64 " does not match the manifest%s", d->name,
				 bad, attempt ? "" : "; fetching it again");
		}
		if (hint->prio == CACHE_PRIO_DEMAND)
			atomic_fetch_sub(&d->waiting, 1);
		for (uint64_t i = a; r >= 0 && i <= b; i++) {
			r = store_chunk(d, i, (char *)buf + ((i - a) << d->chunk_shift));
			local = r < 0;
		}
		if (r >= 0 && hint->prio == CACHE_PRIO_STREAM)
			stream_account(d, len);
	}
	free(buf);
	if (background)
		budget_give(len);
	if (r == -EILSEQ) {
		disk_set_error(d, "chunk %" PRIu64 " (offset %" PRIu64 ") does not match the manifest",
			       bad, bad << d->chunk_shift);
		LOCK_GUARD(&d->lock);
		d->failed = true;
	} else if (r < 0) {
		note_fill_error(d, a, b, r, local);
	}

	LOCK_GUARD(&d->lock);
	for (uint64_t i = a; i <= b; i++)
		inflight_finish_locked(d, claims[i - a], r);
	/* A success ends a transient error: the text shows current trouble. */
	if (r >= 0 && !d->failed && !d->local_error)
		d->error[0] = '\0';
	return r;
}

int disk_ensure_chunks(struct cache_disk *d, uint64_t first, uint64_t last,
		       const struct cache_fetch_hint *hint)
{
	uint64_t max_claim = MAX(1u, RUN_MAX_BYTES >> d->chunk_shift);
	struct inflight *claims[RUN_MAX_BYTES / CACHE_CHUNK_MIN];
	int r;

	if (last >= d->nchunks)
		return -EINVAL;
	for (;;) {
		struct inflight *wait_for = NULL;
		uint64_t a = 0, n = 0;

		pthread_mutex_lock(&d->lock);
		int64_t next = bitmap_next_clear(&d->present, first);
		if (next < 0 || (uint64_t)next > last) {
			pthread_mutex_unlock(&d->lock);
			return 0;
		}
		if (d->failed) {
			pthread_mutex_unlock(&d->lock);
			return -EIO;
		}
		/* Claim the first run of consecutive absent chunks nobody is
		 * fetching; remember the first chunk someone else is fetching. */
		for (uint64_t i = (uint64_t)next; i <= last; i++) {
			if (bitmap_get(&d->present, i)) {
				if (n)
					break;
				continue;
			}
			struct inflight *f = inflight_find_locked(d, i);
			if (f) {
				if (!wait_for) {
					wait_for = f;
					f->refs++;
				}
				if (n)
					break;
				continue;
			}
			if (n == 0)
				a = i;
			claims[n] = inflight_claim_locked(d, i);
			if (!claims[n])
				break;
			if (++n == max_claim)
				break;
		}
		pthread_mutex_unlock(&d->lock);

		r = 0;
		if (n)
			r = fill_run(d, claims, a, a + n - 1, hint);
		else if (!wait_for)
			return -ENOMEM; /* could not claim: calloc failed */
		if (wait_for) {
			pthread_mutex_lock(&d->lock);
			int w = inflight_wait_locked(d, wait_for);
			pthread_mutex_unlock(&d->lock);
			if (r >= 0)
				r = w;
		}
		if (r < 0)
			return r;
	}
}

int cache_disk_prepare_read(struct cache_disk *d, uint64_t off, size_t len)
{
	const struct cache_fetch_hint hint = {.prio = CACHE_PRIO_DEMAND};
	uint64_t size = d->meta.size;

	if (len == 0 || off >= size)
		return 0;
	if (len > size - off)
		len = (size_t)(size - off);
	readahead_note(d, off, len);
	return disk_ensure_chunks(d, off >> d->chunk_shift, (off + len - 1) >> d->chunk_shift,
				  &hint);
}

/* True when [off, off+len) covers every byte of chunk idx. */
static bool covers_chunk(const struct cache_disk *d, uint64_t idx, uint64_t off, uint64_t len)
{
	uint64_t start = idx << d->chunk_shift;

	return off <= start && off + len >= start + disk_chunk_len(d, idx);
}

/* Changes [off, off+len) of the image: the data of a write, or a hole. */
typedef int disk_apply_fn(struct cache_disk *d, const void *arg, uint64_t off, size_t len);

static int apply_write(struct cache_disk *d, const void *buf, uint64_t off, size_t len)
{
	return full_pwrite(d->img_fd, buf, len, off);
}

static int apply_zero(struct cache_disk *d, const void *arg, uint64_t off, size_t len)
{
	(void)arg;
	if (fallocate(d->img_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
		      (off_t)len) == 0)
		return 0;
	if (errno != EOPNOTSUPP && errno != ENOSYS)
		return -errno;
	static const char zeros[65536];
	for (size_t done = 0; done < len;) {
		size_t n = MIN(len - done, sizeof(zeros));
		int r = full_pwrite(d->img_fd, zeros, n, off + done);
		if (r < 0)
			return r;
		done += n;
	}
	return 0;
}

/*
 * The disk's user changes [off, off+len) with apply.  Partially covered
 * absent chunks are first filled from the template; wholly covered ones
 * are claimed (so no fill can overwrite them), changed and marked present.
 * Returns the bytes changed (clamped to the disk's end) or -errno.
 */
static int disk_modify(struct cache_disk *d, uint64_t off, size_t len, disk_apply_fn *apply,
		       const void *arg)
{
	const struct cache_fetch_hint hint = {.prio = CACHE_PRIO_DEMAND};
	uint64_t size = d->meta.size;
	int r;

	if (len == 0)
		return 0;
	if (off >= size)
		return -ENOSPC;
	if (len > size - off)
		len = (size_t)(size - off);
	uint64_t first = off >> d->chunk_shift, last = (off + len - 1) >> d->chunk_shift;

	/* Partially covered absent edges are filled from the template first
	 * (ascending order, like every claim, so claimers never deadlock). */
	bool first_whole = covers_chunk(d, first, off, len);
	bool last_whole = covers_chunk(d, last, off, len);
	if (!first_whole) {
		r = disk_ensure_chunks(d, first, first, &hint);
		if (r < 0)
			return r;
	}

	/* Wholly covered absent chunks need no fetch: claim them so no fill
	 * overwrites them, write, and mark them present. */
	uint64_t mid_first = first + (first_whole ? 0 : 1);
	uint64_t mid_end = last + (last_whole ? 1 : 0); /* exclusive */
	size_t nmid = mid_end > mid_first ? (size_t)(mid_end - mid_first) : 0;
	_cleanup_free_ struct inflight **claims = calloc(nmid ? nmid : 1, sizeof(*claims));
	if (!claims)
		return -ENOMEM;
	for (size_t k = 0; k < nmid;) {
		uint64_t i = mid_first + k;
		pthread_mutex_lock(&d->lock);
		if (bitmap_get(&d->present, i)) {
			k++;
		} else {
			struct inflight *f = inflight_find_locked(d, i);
			if (f) {
				f->refs++;
				(void)inflight_wait_locked(d, f); /* absent after a failure: claim next pass */
			} else {
				claims[k] = inflight_claim_locked(d, i);
				if (!claims[k]) {
					pthread_mutex_unlock(&d->lock);
					r = -ENOMEM;
					goto finish;
				}
				k++;
			}
		}
		pthread_mutex_unlock(&d->lock);
	}
	if (last != first && !last_whole) {
		r = disk_ensure_chunks(d, last, last, &hint);
		if (r < 0)
			goto finish;
	}
	r = apply(d, arg, off, len);
	atomic_fetch_add(&d->writes_since_sync, 1);
	if (r < 0)
		note_fill_error(d, first, last, r, true);

finish:
	pthread_mutex_lock(&d->lock);
	for (size_t k = 0; k < nmid; k++)
		if (claims[k])
			inflight_finish_locked(d, claims[k], r);
	pthread_mutex_unlock(&d->lock);
	return r < 0 ? r : (int)len;
}

int cache_disk_write(struct cache_disk *d, const void *buf, size_t len, uint64_t off)
{
	return disk_modify(d, off, len, apply_write, buf);
}

int cache_disk_zero(struct cache_disk *d, uint64_t off, uint64_t len)
{
	uint64_t size = d->meta.size;

	if (off >= size || len == 0)
		return off > size ? -EINVAL : 0;
	len = MIN(len, size - off);
	/* In pieces, so that one call never claims an unbounded set of chunks. */
	for (uint64_t done = 0; done < len;) {
		size_t n = (size_t)MIN(len - done, (uint64_t)RUN_MAX_BYTES);
		int r = disk_modify(d, off + done, n, apply_zero, NULL);
		if (r < 0)
			return r;
		done += n;
	}
	return 0;
}

bool cache_disk_dirty(struct cache_disk *d)
{
	if (atomic_load(&d->writes_since_sync))
		return true;
	LOCK_GUARD(&d->lock);
	return d->dirty.count > 0;
}

int cache_disk_sync(struct cache_disk *d)
{
	LOCK_GUARD(&d->commit_lock);
	uint64_t bm_bytes = bitmap_bytes(d->nchunks);
	uint64_t writes = atomic_load(&d->writes_since_sync);
	_cleanup_free_ uint8_t *copy = NULL;
	_cleanup_free_ uint64_t *pages = NULL;
	uint64_t ndirty = 0;
	bool all_present;
	int r = 0;

	pthread_mutex_lock(&d->lock);
	all_present = d->present.count == d->nchunks;
	if (d->dirty.count) {
		copy = malloc(d->dirty.count * DIRTY_PAGE_BYTES);
		pages = malloc(d->dirty.count * sizeof(*pages));
		if (!copy || !pages) {
			pthread_mutex_unlock(&d->lock);
			return -ENOMEM;
		}
		for (int64_t p = bitmap_next_set(&d->dirty, 0); p >= 0;
		     p = bitmap_next_set(&d->dirty, (uint64_t)p + 1)) {
			uint64_t start = (uint64_t)p * DIRTY_PAGE_BYTES;
			uint64_t n = MIN((uint64_t)DIRTY_PAGE_BYTES, bm_bytes - start);
			memcpy(copy + ndirty * DIRTY_PAGE_BYTES, d->present.bits + start, n);
			pages[ndirty++] = (uint64_t)p;
			bitmap_clear(&d->dirty, (uint64_t)p);
		}
	}
	pthread_mutex_unlock(&d->lock);

	/* Data first: every bit in the copy was set after its chunk's write
	 * returned, so this fdatasync makes all of them true on disk.  It
	 * runs even when no write was counted: cheap on a clean file, and an
	 * fsync(2) must never depend on bookkeeping to be honoured. */
	if (fdatasync(d->img_fd) < 0)
		r = -errno;
	else
		atomic_fetch_sub(&d->writes_since_sync, writes);
	for (uint64_t k = 0; r >= 0 && k < ndirty; k++) {
		uint64_t start = pages[k] * DIRTY_PAGE_BYTES;
		r = full_pwrite(d->meta_fd, copy + k * DIRTY_PAGE_BYTES,
				MIN((uint64_t)DIRTY_PAGE_BYTES, bm_bytes - start),
				META_BITMAP_OFFSET + start);
	}
	if (r >= 0 && ndirty && fdatasync(d->meta_fd) < 0)
		r = -errno;
	if (r < 0) {
		/* Keep the pages dirty so the next commit writes them again. */
		LOCK_GUARD(&d->lock);
		for (uint64_t k = 0; k < ndirty; k++)
			bitmap_set(&d->dirty, pages[k]);
		return r;
	}
	if (all_present && !(d->meta.flags & META_FLAG_COMPLETE)) {
		d->meta.flags |= META_FLAG_COMPLETE;
		r = meta_store_header(d->meta_fd, &d->meta);
		if (r < 0)
			d->meta.flags &= ~META_FLAG_COMPLETE;
		else
			log_notice("disk %s is complete: it needs its template no more", d->name);
	}
	return r;
}

void cache_disk_get_stats(struct cache_disk *d, struct cache_disk_stats *ret)
{
	struct cache_disk_stats s = {0};
	enum stream_mode mode;
	bool failed, local_error;

	stream_snapshot(d, &mode, &s.position);
	pthread_mutex_lock(&d->lock);
	s.present = d->present.count;
	failed = d->failed;
	local_error = d->local_error;
	memcpy(s.error, d->error, sizeof(s.error));
	bool last_present = d->nchunks && bitmap_get(&d->present, d->nchunks - 1);
	pthread_mutex_unlock(&d->lock);

	s.size = d->meta.size;
	s.chunk_size = d->chunk_size;
	s.chunks = d->nchunks;
	s.cached = s.present << d->chunk_shift;
	if (last_present)
		s.cached -= (uint64_t)d->chunk_size - disk_chunk_len(d, d->nchunks - 1);
	if (s.position > s.size)
		s.position = s.size;
	s.rate = stream_rate(d);
	s.speed = ratelimit_get(&d->st.rl);
	s.waiting = atomic_load(&d->waiting);
	if (d->src.get_counters)
		d->src.get_counters(d->src.opaque, &s.fetched, &s.errors);
	if (s.present == s.chunks)
		s.state = CACHE_STATE_COMPLETE;
	else if (failed || local_error)
		s.state = CACHE_STATE_ERROR;
	else if (mode == STREAM_RUNNING)
		s.state = CACHE_STATE_STREAMING;
	else if (mode == STREAM_PAUSED)
		s.state = CACHE_STATE_PAUSED;
	else
		s.state = CACHE_STATE_IDLE;
	if (s.state == CACHE_STATE_COMPLETE) {
		s.rate = 0;
		s.position = s.size;
	}
	*ret = s;
}

int64_t cache_disk_lseek(struct cache_disk *d, uint64_t off, int whence)
{
	uint64_t size = d->meta.size;

	if (off >= size)
		return -ENXIO;
	LOCK_GUARD(&d->lock);
	if (whence == SEEK_DATA) {
		/* Absent chunks count as data (unknown); present ones are data
		 * where the image has data. */
		int64_t absent = bitmap_next_clear(&d->present, off >> d->chunk_shift);
		uint64_t a = absent < 0 ? size : MAX(off, (uint64_t)absent << d->chunk_shift);
		off_t r = lseek(d->img_fd, (off_t)off, SEEK_DATA);
		uint64_t data = r < 0 ? size : (uint64_t)r;
		uint64_t res = MIN(a, data);
		return res >= size ? -ENXIO : (int64_t)res;
	}
	if (whence != SEEK_HOLE)
		return -EINVAL;
	for (uint64_t p = off; p < size;) {
		off_t h = lseek(d->img_fd, (off_t)p, SEEK_HOLE);
		if (h < 0 || (uint64_t)h >= size)
			return (int64_t)size;
		uint64_t idx = (uint64_t)h >> d->chunk_shift;
		if (bitmap_get(&d->present, idx))
			return h;
		int64_t next = bitmap_next_set(&d->present, idx + 1);
		if (next < 0)
			return (int64_t)size;
		p = (uint64_t)next << d->chunk_shift;
	}
	return (int64_t)size;
}

void cache_disk_map(struct cache_disk *d, char *out, unsigned cells)
{
	LOCK_GUARD(&d->lock);
	for (unsigned k = 0; k < cells; k++) {
		uint64_t a = d->nchunks * k / cells, b = d->nchunks * (k + 1) / cells;
		uint64_t have = 0;
		if (b == a)
			b = MIN(a + 1, d->nchunks);
		for (uint64_t i = a; i < b; i++)
			have += bitmap_get(&d->present, i);
		if (b <= a || have == 0)
			out[k] = '0';
		else if (have == b - a)
			out[k] = '#';
		else
			out[k] = (char)('0' + MIN(9u, (unsigned)DIV_ROUND_UP(have * 10, b - a)));
	}
	out[cells] = '\0';
}

int64_t cache_disk_verify(struct cache_disk *d, uint64_t *out, size_t nout, uint64_t *ret_checked)
{
	uint64_t checked = 0;
	int64_t bad = 0;

	if (d->manifest_fd < 0)
		return -ENOENT;
	_cleanup_free_ uint8_t *buf = malloc(d->chunk_size);
	if (!buf)
		return -ENOMEM;
	for (uint64_t i = 0; i < d->nchunks; i++) {
		uint64_t mismatch;
		pthread_mutex_lock(&d->lock);
		bool present = bitmap_get(&d->present, i);
		pthread_mutex_unlock(&d->lock);
		if (!present)
			continue;
		int r = full_pread(d->img_fd, buf, disk_chunk_len(d, i), i << d->chunk_shift);
		if (r >= 0)
			r = verify_run(d, buf, i, i, &mismatch);
		if (r == -EILSEQ) {
			if ((size_t)bad < nout)
				out[bad] = i << d->chunk_shift;
			bad++;
		} else if (r < 0) {
			return r;
		}
		checked++;
	}
	*ret_checked = checked;
	return bad;
}
