// SPDX-License-Identifier: MIT
/*
 * One disk's local image: creation, opening, the chunk claim protocol and
 * demand fills, and durability (commit of data then bitmap).  Writes are
 * in write.c, manifests in integrity.c, progress views in query.c.
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
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "common/endian.h"
#include "disk_i.h"
#include "log.h"
#include "manifest.h"
#include "util.h"

/* The fetch buffer budgets: process-wide by nature (they bound the
 * process's memory), private to this file. */
struct budget {
	pthread_mutex_t lock; /* leaf */
	pthread_cond_t cond;  /* on now_ns()'s clock, made by budget_once
			       * before the first take (so before any give) */
	uint64_t used;        /* guarded by lock */
	uint64_t size;
	uint64_t max_wait_ns; /* 0: waits as long as it takes */
};

/*
 * A request of more than half its budget (a 16M chunk) may still run
 * beside one other, so a budget's bound is max(size, 2 x largest chunk).
 * Alone, one 16 MiB request at a time streamed below a single curl at
 * 20 ms, and a reader of 16M chunks waited for its previous read's fill
 * to end (cold reads at 20 ms: p50 81 against 41 ms).
 */
static struct budget background_budget = {.lock = PTHREAD_MUTEX_INITIALIZER,
					  .size = BACKGROUND_BUFFER_BUDGET};
static struct budget demand_budget = {.lock = PTHREAD_MUTEX_INITIALIZER,
				      .size = DEMAND_BUFFER_BUDGET,
				      .max_wait_ns = DEMAND_BUFFER_WAIT_NS};
static pthread_once_t budget_once = PTHREAD_ONCE_INIT; /* inits the conds */

static void budget_init(void)
{
	cond_init_monotonic(&background_budget.cond);
	cond_init_monotonic(&demand_budget.cond);
}

/* Waits until len bytes of budget b are free (or b->max_wait_ns has
 * passed), takes them. */
static void budget_take(struct budget *b, uint64_t len)
{
	uint64_t limit = MAX(b->size, 2 * len);
	uint64_t until = b->max_wait_ns ? now_ns() + b->max_wait_ns : 0;

	pthread_once(&budget_once, budget_init);
	LOCK_GUARD(&b->lock);
	while (b->used && b->used + len > limit) {
		if (!until)
			pthread_cond_wait(&b->cond, &b->lock);
		else if (now_ns() < until)
			cond_wait_until(&b->cond, &b->lock, until);
		else
			break;
	}
	b->used += len;
}

static void budget_give(struct budget *b, uint64_t len)
{
	LOCK_GUARD(&b->lock);
	b->used -= len;
	pthread_cond_broadcast(&b->cond);
}

static struct budget *fill_budget(bool background)
{
	return background ? &background_budget : &demand_budget;
}

/*
 * Fetch buffers are mmapped, so that freeing one gives its memory back at
 * once (malloc's per-thread arenas kept freed megabytes around and peak RSS
 * crept past 64 MiB), and a few freed ones are kept for reuse, so that a
 * fast stream does not pay a page fault per 4 KiB of every buffer.  Sizes
 * above 64 KiB are rounded up to a power of two, so that runs of 3 chunks
 * reuse the buffers of runs of 4: read-ahead runs end wherever the window
 * does, and a cold 2 GiB dd mapped 100-270 fresh buffers instead of 17-80.
 * A fresh buffer gets only the pages its run uses; a cached one keeps
 * those of earlier runs (BUF_CACHE_BYTES bounds them).
 */
#define BUF_CACHE_MAX 8
#define BUF_CACHE_BYTES (12u << 20) /* memory kept in cached buffers at most */
static pthread_mutex_t buf_lock = PTHREAD_MUTEX_INITIALIZER; /* leaf */
static struct {
	void *p;
	size_t len;
} buf_cache[BUF_CACHE_MAX]; /* guarded by buf_lock */
static size_t buf_cached;   /* guarded by buf_lock */
static size_t buf_cached_bytes; /* guarded by buf_lock */

static size_t buf_class(size_t len)
{
	len = (len + 4095) & ~(size_t)4095;
	if (len > 65536 && (len & (len - 1)))
		len = (size_t)1 << (64 - __builtin_clzll((unsigned long long)len));
	return len;
}

static void *buf_get(size_t len)
{
	len = buf_class(len);
	pthread_mutex_lock(&buf_lock);
	for (size_t i = 0; i < buf_cached; i++) {
		if (buf_cache[i].len == len) {
			void *p = buf_cache[i].p;
			buf_cached_bytes -= len;
			buf_cache[i] = buf_cache[--buf_cached];
			pthread_mutex_unlock(&buf_lock);
			return p;
		}
	}
	pthread_mutex_unlock(&buf_lock);
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static void buf_put(void *p, size_t len)
{
	if (!p)
		return;
	len = buf_class(len);
	pthread_mutex_lock(&buf_lock);
	if (buf_cached < BUF_CACHE_MAX && buf_cached_bytes + len <= BUF_CACHE_BYTES) {
		buf_cache[buf_cached].p = p;
		buf_cache[buf_cached].len = len;
		buf_cached++;
		buf_cached_bytes += len;
		p = NULL;
	}
	pthread_mutex_unlock(&buf_lock);
	if (p)
		munmap(p, len);
}

static void storeq_init(struct cache_disk *d);
static void storeq_destroy(struct cache_disk *d);

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

int disk_name_path(char *buf, size_t n, const char *name, const char *suffix)
{
	int r = snprintf(buf, n, "%s%s", name, suffix);

	return r < 0 || (size_t)r >= n ? -ENAMETOOLONG : 0;
}

static bool chunk_size_ok(uint64_t cs)
{
	return cs >= CACHE_CHUNK_MIN && cs <= CACHE_CHUNK_MAX && !(cs & (cs - 1));
}

/*
 * Allocates the metadata file's blocks (its second header slot and the
 * bitmap would otherwise stay holes until first written): saving
 * progress, and the fsync of a VM's writes, never then need a block of a
 * filesystem that streaming has filled.  0, or -errno; a filesystem
 * without fallocate(2) is left as it is.
 */
static int meta_allocate(int fd, uint64_t total)
{
	if (fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)total) == 0)
		return 0;
	return errno == EOPNOTSUPP || errno == ENOSYS ? 0 : -errno;
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
	if (disk_name_path(img, sizeof(img), name, ".img") < 0 ||
	    disk_name_path(meta, sizeof(meta), name, ".meta") < 0 ||
	    disk_name_path(man, sizeof(man), name, ".manifest") < 0 ||
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
	m.flags = META_FLAG_WRITTEN;
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
	uint64_t total = meta_file_size(&m);
	r = full_pwrite(meta_fd, slot, sizeof(slot), 0);
	if (r >= 0 && ftruncate(meta_fd, (off_t)total) < 0)
		r = -errno;
	if (r >= 0)
		r = meta_allocate(meta_fd, total);
	if (r >= 0 && p->manifest) {
		/* Zero chunks are present from the start: the new image is
		 * all holes there, so they are never fetched. */
		r = disk_manifest_file_write(dirfd, man, p->manifest);
		if (r >= 0)
			r = disk_preset_zero_chunks(meta_fd, p->manifest);
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

/*
 * The image opened a second time with O_DIRECT, for the streamer's stores
 * (see disk_store_direct); -1 where the filesystem refuses O_DIRECT (tmpfs
 * before Linux 6.6) or the name no longer leads to the image opened as st.
 */
static int open_direct(int dirfd, const char *img, const struct stat *st)
{
	struct stat st2;
	int fd = openat(dirfd, img, O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_DIRECT);

	if (fd < 0)
		return -1;
	if (fstat(fd, &st2) < 0 || st2.st_dev != st->st_dev || st2.st_ino != st->st_ino) {
		close(fd);
		return -1;
	}
	return fd;
}

/*
 * Sets or clears a header flag and saves the header; after a failure the
 * flag is as it was.  Called with commit_lock held, or before the disk is
 * shared.
 */
static int store_flag(struct cache_disk *d, uint32_t flag, bool set)
{
	uint32_t was = d->meta.flags;

	d->meta.flags = set ? was | flag : was & ~flag;
	int r = meta_store_header(d->meta_fd, &d->meta);
	if (r < 0)
		d->meta.flags = was;
	return r;
}

/*
 * Disks added before written chunks were tracked get a written-bitmap,
 * all clear (what was written before is not known), appended and synced
 * before the header says it is there.  Best effort: without it the disk
 * works as before, and verify counts its written chunks as differing.
 */
static void add_written_bitmap(struct cache_disk *d)
{
	/* The bitmap's bytes follow the present-bitmap, and may hold an older
	 * streamfs's leftovers (see streamfs(1)). */
	uint64_t bytes = bitmap_bytes(d->nchunks);
	int r = full_pwrite_zeros(d->meta_fd, bytes, META_BITMAP_OFFSET + bytes);

	if (r >= 0 && fdatasync(d->meta_fd) < 0)
		r = -errno;
	if (r >= 0)
		r = store_flag(d, META_FLAG_WRITTEN, true);
	if (r < 0) {
		log_warn("disk %s: cannot add the record of written chunks to its metadata: %s; "
			 "verify counts written chunks as differing", d->name, strerror(-r));
	}
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
	if (disk_name_path(img, sizeof(img), name, ".img") < 0 ||
	    disk_name_path(meta, sizeof(meta), name, ".meta") < 0)
		return -ENAMETOOLONG;

	struct cache_disk *d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->img_fd = d->img_direct_fd = d->meta_fd = d->manifest_fd = -1;
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
	d->img_direct_fd = open_direct(dirfd, img, &st);
	if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != d->meta.size) {
		snprintf(why, why_size, "local image %s is %lld bytes, metadata says %" PRIu64,
			 img, (long long)st.st_size, d->meta.size);
		r = -EBADMSG;
		goto fail;
	}
	if (d->meta.flags & META_FLAG_MANIFEST) {
		d->manifest_fd = disk_manifest_file_open(dirfd, name, &d->meta, why, why_size);
		if (d->manifest_fd < 0) {
			r = d->manifest_fd;
			goto fail;
		}
	}
	d->chunk_size = d->meta.chunk_size;
	d->chunk_shift = (unsigned)__builtin_ctz(d->chunk_size);
	d->nchunks = meta_chunks(&d->meta);
	if (d->meta.flags & META_FLAG_STALE) {
		d->failed = d->stale = true;
		snprintf(d->error, sizeof(d->error),
			 "template changed since the disk was added (found before this mount); "
			 "start checks it again");
		log_warn("disk %s: its template changed before this mount; absent data fail "
			 "with EIO until start finds the template it was added from", name);
	}
	if (!(d->meta.flags & META_FLAG_WRITTEN))
		add_written_bitmap(d);
	/* Disks added before their metadata was allocated at add: best
	 * effort (a full filesystem still mounts). */
	if (meta_allocate(d->meta_fd, meta_file_size(&d->meta)) < 0)
		log_warn("disk %s: cannot allocate its metadata file: %m", name);
	r = meta_load_written(d->meta_fd, &d->meta, &d->written, why, why_size);
	if (r < 0)
		goto fail;
	d->track_written = d->meta.flags & META_FLAG_WRITTEN;
	r = bitmap_init(&d->dirty, DIV_ROUND_UP(d->nchunks, DIRTY_PAGE_CHUNKS));
	if (r >= 0)
		r = bitmap_init(&d->zero, d->nchunks);
	if (r < 0)
		goto fail;
	pthread_mutex_init(&d->lock, NULL);
	pthread_mutex_init(&d->commit_lock, NULL);
	cond_init_monotonic(&d->fill_cond); /* preempt_handoff() */
	stream_init(d);
	readahead_init(d);
	storeq_init(d);
	*ret = d;
	return 0;

fail:
	bitmap_destroy(&d->present);
	bitmap_destroy(&d->written);
	bitmap_destroy(&d->dirty);
	bitmap_destroy(&d->zero);
	meta_clear(&d->meta);
	if (d->img_fd >= 0)
		close(d->img_fd);
	if (d->img_direct_fd >= 0)
		close(d->img_direct_fd);
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
	storeq_destroy(d);
	r = cache_disk_sync(d);
	if (r < 0)
		log_err("cannot save state of disk %s: %s", d->name, strerror(-r));
	if (d->inflight)
		log_err("disk %s freed with fills in flight", d->name);
	pthread_cond_destroy(&d->fill_cond);
	pthread_mutex_destroy(&d->commit_lock);
	pthread_mutex_destroy(&d->lock);
	bitmap_destroy(&d->present);
	bitmap_destroy(&d->written);
	bitmap_destroy(&d->dirty);
	bitmap_destroy(&d->zero);
	meta_clear(&d->meta);
	close(d->img_fd);
	if (d->img_direct_fd >= 0)
		close(d->img_direct_fd);
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

struct inflight *inflight_find_locked(struct cache_disk *d, uint64_t idx)
{
	for (struct inflight *f = d->inflight; f; f = f->next)
		if (f->idx == idx)
			return f;
	return NULL;
}

/* Claims chunk idx for this thread; caller has checked it is absent and free. */
struct inflight *inflight_claim_locked(struct cache_disk *d, uint64_t idx)
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
void inflight_finish_locked(struct cache_disk *d, struct inflight *f, int result)
{
	if (result >= 0 && !atomic_load(&d->sync_error)) {
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
	atomic_fetch_sub(&d->demand_waits, f->demand_waiters);
	f->demand_waiters = 0;
	pthread_cond_broadcast(&d->fill_cond);
	inflight_unref_locked(f);
}

/* Waits for another thread's fill of f; returns its result. */
int inflight_wait_locked(struct cache_disk *d, struct inflight *f)
{
	while (!f->done)
		pthread_cond_wait(&d->fill_cond, &d->lock);
	int r = f->result;
	inflight_unref_locked(f);
	return r;
}

/* True if [off, off+len) of fd holds no data (SEEK_DATA finds none). */
static bool range_is_hole(int fd, uint64_t off, uint64_t len)
{
	off_t data = lseek(fd, (off_t)off, SEEK_DATA);

	if (data < 0)
		return errno == ENXIO; /* no data from off to the end */
	return (uint64_t)data >= off + len;
}

/*
 * Writes into the image in pieces of STORE_PIECE bytes.  The page cache
 * sizes new folios by the write: one 1 MiB write asks for a 1 MiB folio.
 * In a VM whose free memory goes back to the host (virtio-balloon free
 * page reporting, in blocks of 2 MiB and more) such folios mostly come
 * from reported blocks, which the host must fault in again page by page:
 * here storing 2 GiB then cost 0.6-1.2 CPU-seconds instead of 0.2, while
 * the other stores spun on the inode lock.  Smaller folios apparently come
 * from memory that was never handed back.  128 KiB measured best of
 * 64K-1M (BENCHMARKS.md); elsewhere it costs a system call per 128 KiB.
 */
#define STORE_PIECE (128u << 10)

/*
 * The streamer's chunks go to the image with O_DIRECT where they can: a
 * background copy of a whole disk would otherwise fill the page cache with
 * data nobody is reading, and its copy into freshly allocated page-cache
 * folios was most of the daemon's CPU while streaming (BENCHMARKS.md).
 * Chunks fetched for a reader or a writer go through the page cache, where
 * their next read finds them.  The kernel keeps the two kinds of write
 * coherent, and durability is the same: fdatasync covers both.  Needs a
 * buffer, an offset and a length aligned to DIRECT_ALIGN (fetch buffers are
 * mmap'ed and chunks are at least 64 KiB; a disk's short last chunk is
 * not); else, or once the filesystem refused a direct write, -EOPNOTSUPP:
 * the caller writes through the page cache.
 */
#define DIRECT_ALIGN 4096u

static int disk_store_direct(struct cache_disk *d, const void *buf, uint64_t len, uint64_t off)
{
	if (d->img_direct_fd < 0 || atomic_load(&d->direct_off) ||
	    ((uintptr_t)buf | len | off) % DIRECT_ALIGN)
		return -EOPNOTSUPP;
	int r = full_pwrite(d->img_direct_fd, buf, len, off);
	if (r == -EINVAL) {
		/* Alignment the filesystem or device wants bigger: nothing
		 * was written, and the page cache takes it from now on. */
		atomic_store(&d->direct_off, true);
		log_warn("disk %s: the image refuses direct writes (%s); streaming writes "
			 "through the page cache", d->name, strerror(-r));
		return -EOPNOTSUPP;
	}
	return r;
}

int disk_pwrite(struct cache_disk *d, const void *buf, uint64_t len, uint64_t off)
{
	int r = 0;

	for (uint64_t done = 0; r >= 0 && done < len; done += STORE_PIECE)
		r = full_pwrite(d->img_fd, (const char *)buf + done, MIN(STORE_PIECE, len - done),
				off + done);
	return r;
}

/*
 * Stores fetched chunks [idx, idx+n) from buf in the image.  An all-zero
 * chunk becomes a hole: cheaper, keeps the image sparse, and, unlike
 * skipping the write, replaces whatever an interrupted earlier write left
 * there.  A range that is a hole already (the usual case: a fresh image is
 * one) is left alone: a punch costs a journal transaction under the inode
 * lock, about 1 ms each on ext4, and blocks the other chunks' stores
 * meanwhile.  Such a chunk is remembered in d->zero, so that reads of it
 * are answered with zeros, not by the kernel zeroing the image's pages for
 * the hole.  Consecutive chunks of data are written together.
 */
static int store_chunks(struct cache_disk *d, uint64_t idx, uint64_t n, const char *buf,
			bool direct)
{
	int r = 0;

	for (uint64_t i = 0; r >= 0 && i < n;) {
		const char *p = buf + (i << d->chunk_shift);
		uint64_t off = (idx + i) << d->chunk_shift;
		uint64_t len = disk_chunk_len(d, idx + i), m = 1;
		bool zero = buf_is_zero(p, len);

		r = -EOPNOTSUPP;
		if (zero) {
			if (range_is_hole(d->img_fd, off, len))
				r = 0;
			else
				r = fallocate(d->img_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					      (off_t)off, (off_t)len) == 0 ? 0 : -errno;
			if (r == -ENOSYS)
				r = -EOPNOTSUPP;
		}
		if (r == -EOPNOTSUPP && !zero) {
			for (; i + m < n; m++) {
				uint64_t l = disk_chunk_len(d, idx + i + m);
				if (buf_is_zero(p + (m << d->chunk_shift), l))
					break;
				len += l;
			}
		}
		if (r == -EOPNOTSUPP && direct)
			r = disk_store_direct(d, p, len, off);
		if (r == -EOPNOTSUPP)
			r = disk_pwrite(d, p, len, off);
		/* Counted once done, so a sync that reads the counter covers it. */
		atomic_fetch_add(&d->writes, 1);
		/* Decided on every store (a failed fill may leave a mark behind,
		 * and the chunk's next fetch need not bring zeros again).  The
		 * chunks are still claimed: no write to them can race this. */
		pthread_mutex_lock(&d->lock);
		for (uint64_t k = i; k < i + m; k++) {
			if (r >= 0 && zero)
				bitmap_set(&d->zero, idx + k);
			else
				bitmap_clear(&d->zero, idx + k);
		}
		pthread_mutex_unlock(&d->lock);
		i += m;
	}
	return r;
}

/* The source's last error text in buf, or fallback if it has none. */
static const char *source_error(struct cache_disk *d, char *buf, size_t n, const char *fallback)
{
	buf[0] = '\0';
	if (d->src.last_error)
		d->src.last_error(d->src.opaque, buf, n);
	return buf[0] ? buf : fallback;
}

/* Keeps a template change across remounts: the disk comes back failed,
 * with no request made, until `start` finds the template unchanged. */
static void record_stale(struct cache_disk *d)
{
	LOCK_GUARD(&d->commit_lock);
	/* Nothing is saved after a failed sync (cache_disk_sync). */
	if (atomic_load(&d->sync_error) || (d->meta.flags & META_FLAG_STALE))
		return;
	int r = store_flag(d, META_FLAG_STALE, true);
	if (r < 0) {
		log_warn("disk %s: cannot record the template change in its metadata: %s; "
			 "after a remount it shows only when a fetch meets it again",
			 d->name, strerror(-r));
	}
}

int cache_disk_recheck(struct cache_disk *d, char *why, size_t why_size)
{
	const struct cache_fetch_hint hint = {.prio = CACHE_PRIO_DEMAND};
	char byte;
	int r;

	pthread_mutex_lock(&d->lock);
	bool stale = d->stale;
	pthread_mutex_unlock(&d->lock);
	if (!stale)
		return 0;
	/* One byte, asked for with the recorded validator and size: the
	 * check every fetch makes. */
	r = d->src.fetch_range(d->src.opaque, &byte, 1, 0, &hint);
	if (r < 0) {
		char src_err[160];
		snprintf(why, why_size, "%s",
			 source_error(d, src_err, sizeof(src_err), strerror(-r)));
		return r;
	}
	LOCK_GUARD(&d->commit_lock);
	if ((d->meta.flags & META_FLAG_STALE) && (r = store_flag(d, META_FLAG_STALE, false)) < 0) {
		snprintf(why, why_size, "cannot save its metadata: %s", strerror(-r));
		return r;
	}
	LOCK_GUARD(&d->lock);
	if (d->stale) {
		d->failed = d->stale = false;
		d->error[0] = '\0';
		log_notice("disk %s: its template is the one it was added from again", d->name);
	}
	return 0;
}

/* Classifies a failure and records it for user.streamfs.error. */
void note_fill_error(struct cache_disk *d, uint64_t first, uint64_t last, int r,
			    bool local)
{
	char src_err[160];

	if (local) {
		disk_set_error(d, "cannot write local image: %s", strerror(-r));
		LOCK_GUARD(&d->lock);
		d->local_error = true;
		return;
	}
	if (r == -ESTALE) {
		disk_set_error(d, "template changed since the disk was added: %s",
			       source_error(d, src_err, sizeof(src_err), "validator differs"));
		pthread_mutex_lock(&d->lock);
		bool news = !d->failed;
		if (news) {
			log_err("disk %s: template changed; absent data now fail with EIO", d->name);
			d->failed = d->stale = true;
		}
		pthread_mutex_unlock(&d->lock);
		if (news)
			record_stale(d);
		return;
	}
	disk_set_error(d, "cannot fetch chunks %" PRIu64 "-%" PRIu64 ": %s", first, last,
		       source_error(d, src_err, sizeof(src_err), strerror(-r)));
}

/* A success ends a transient error: the text shows current trouble. */
static void clear_transient_error_locked(struct cache_disk *d)
{
	if (!d->failed && !d->local_error)
		d->error[0] = '\0';
}

/* Before a reader is answered: whoever looks at the error after the read
 * must not see an outage that this fetch has ended. */
static void clear_transient_error(struct cache_disk *d)
{
	LOCK_GUARD(&d->lock);
	clear_transient_error_locked(d);
}

/* Records the outcome of a fill of [a, b] and finishes its claims. */
static void fill_finish(struct cache_disk *d, struct inflight **claims, uint64_t a, uint64_t b,
			int r, bool local, uint64_t bad)
{
	if (r == -EILSEQ) {
		disk_set_error(d, "chunk %" PRIu64 " (offset %" PRIu64 ") does not match the manifest",
			       bad, bad << d->chunk_shift);
		LOCK_GUARD(&d->lock);
		d->failed = true;
		d->stale = false; /* `start` cannot undo this */
	} else if (r < 0 && r != -EINTR) { /* -EINTR: preempted, no failure */
		note_fill_error(d, a, b, r, local);
	}

	LOCK_GUARD(&d->lock);
	for (uint64_t i = a; i <= b; i++)
		if (claims[i - a]) /* NULL: finished already (early stores) */
			inflight_finish_locked(d, claims[i - a], r);
	if (r >= 0)
		clear_transient_error_locked(d);
}

/*
 * The stores of a fetched run [a, b], chunk by chunk in order.  A
 * background fill holds back before each chunk like its transfer did: the
 * copies of a big run would otherwise take the CPU from a demand read.
 *
 * Early stores, with claims, for a background fill without a manifest
 * (whose check needs the whole run first): each chunk is stored, and its
 * claim finished, as soon as its bytes are in, while the rest of the run
 * is still on the way.  A reader waiting for one chunk of a streamer's or
 * read-ahead's run need not wait for the whole run, and each chunk is
 * copied into the image while it is still in the CPU's cache.
 */
struct run_store {
	struct cache_disk *d;
	const char *buf;          /* the fetch buffer, holding chunk a on */
	uint64_t a, b;
	uint64_t next;            /* the first chunk not stored yet */
	struct inflight **claims; /* a background fill's, for fill_preempted();
				   * with early, those before next are NULL */
	bool direct;              /* the streamer's: disk_store_direct() */
	bool early;               /* early stores: each chunk stored finishes
				   * its claim; else the caller finishes them */
	/* The current attempt's pace, for fill_preempted(): */
	uint64_t start_ns;        /* it went out */
	uint64_t first_ns;        /* its first progress, 0 = none yet */
	size_t first_got, got;    /* bytes in then, and now */
	uint64_t held_ns;         /* spent holding back since first_ns */
	int r;                    /* a store's failure: then no more stores */
};

/*
 * The streamer's direct stores of chunks smaller than this wait until this
 * much is in, and go out together: each O_DIRECT write waits for the
 * device (0.2 ms for 64 KiB here), and 64K chunks stored one by one
 * streamed at half the speed of 1M ones (BENCHMARKS.md).
 */
#define DIRECT_BATCH_BYTES (1u << 20)

/* Stores chunks [rs->next, upto), finishing their claims if rs->early;
 * with hold, holds back before each store (from the fetch's progress, the
 * transfer has just held back before this piece).  Direct stores of small
 * chunks leave the last ones for a later call while fewer than a batch
 * are in and the run is not (upto <= rs->b). */
static void run_store_upto(struct run_store *rs, uint64_t upto, bool hold)
{
	struct cache_disk *d = rs->d;
	uint64_t batch = rs->direct ? MAX(1u, DIRECT_BATCH_BYTES >> d->chunk_shift) : 1;

	while (rs->r >= 0 && rs->next < upto) {
		uint64_t k = rs->next - rs->a;
		uint64_t n = MIN(batch, upto - rs->next);

		if (n < batch && upto <= rs->b)
			return;
		if (hold)
			stream_hold(d);
		rs->r = store_chunks(d, rs->next, n, rs->buf + (k << d->chunk_shift), rs->direct);
		if (rs->r < 0)
			return;
		if (rs->early) {
			pthread_mutex_lock(&d->lock);
			for (uint64_t j = k; j < k + n; j++) {
				inflight_finish_locked(d, rs->claims[j], 0);
				rs->claims[j] = NULL;
			}
			pthread_mutex_unlock(&d->lock);
		}
		rs->next += n;
	}
}

/* A background fetch's progress: the pace of the attempt, for
 * fill_preempted(). */
static void run_track_progress(void *opaque, size_t got)
{
	struct run_store *rs = opaque;

	if (!rs->first_ns) {
		rs->first_ns = now_ns();
		rs->first_got = got;
	}
	rs->got = got;
}

/* A background fill's on_wire: each attempt's pace starts afresh. */
static void run_on_wire(void *opaque, int delta)
{
	struct run_store *rs = opaque;

	if (delta > 0) {
		rs->start_ns = now_ns();
		rs->first_ns = 0;
		rs->first_got = rs->got = 0;
		rs->held_ns = 0;
	}
}

/* A background fill's hold: stream_hold(), timed, so that holding back
 * for demand requests does not count as a slow transfer. */
static void run_hold(void *opaque)
{
	struct run_store *rs = opaque;
	uint64_t t = now_ns();

	stream_hold(rs->d);
	if (rs->first_ns)
		rs->held_ns += now_ns() - t;
}

/* The fetch's progress, for early stores: stores the chunks wholly in.  A
 * retry starts again from 0 with the same bytes, and finds its first
 * chunks stored. */
static void run_store_progress(void *opaque, size_t got)
{
	struct run_store *rs = opaque;
	uint64_t len = disk_run_len(rs->d, rs->a, rs->b);

	run_track_progress(opaque, got);
	run_store_upto(rs, got >= len ? rs->b + 1 : rs->a + (got >> rs->d->chunk_shift), false);
}

/* A body this long at least gives a rate worth averaging. */
#define LINK_RATE_MIN_BYTES (64u << 10)

/*
 * Preempting a background fill.  SPEC has a VM's read never wait behind
 * the stream, but a reader of a chunk that a background fill has in
 * flight waits for that fill (one fetch per chunk).  On a slow link, or
 * from a slow server, a run of 4 MiB takes seconds, more than a request
 * of the reader's own chunk would, and a server that sends a byte every
 * few seconds keeps it going for ever.  The fill's preempt hook ends it
 * once a demand read waits for one of its chunks not stored yet, and the
 * fill is slow: its wait for the first bytes has lasted more than twice
 * the threshold, or its body has taken more than the threshold (time
 * held back for demand requests left out) and, at its pace so far
 * (taken from LINK_RATE_MIN_BYTES of body at least; less counts as slow),
 * the reader's chunk would take longer than the threshold again.  The
 * threshold is twice what a demand fetch of the chunk takes (the link
 * estimate; before there is one, PREEMPT_GUESS_NS), plus
 * PREEMPT_MARGIN_NS.  A healthy run is not preempted: on loopback it
 * takes a few ms against a 20 ms threshold; at 20 ms, about 35 ms against
 * 66 ms.  The chunks not stored stay absent; the background caller lets
 * the readers claim theirs (preempt_handoff), and they fetch them.
 */
#define PREEMPT_MARGIN_NS (20 * 1000000ull)
#define PREEMPT_GUESS_NS (100 * 1000000ull)
#define PREEMPT_HANDOFF_NS (100 * 1000000ull)

static bool fill_preempted(void *opaque)
{
	struct run_store *rs = opaque;
	struct cache_disk *d = rs->d;
	uint64_t want = UINT64_MAX;

	if (!atomic_load(&d->demand_waits))
		return false;
	pthread_mutex_lock(&d->lock);
	for (uint64_t i = rs->next; i <= rs->b && want == UINT64_MAX; i++)
		if (rs->claims[i - rs->a]->demand_waiters)
			want = i;
	pthread_mutex_unlock(&d->lock);
	if (want == UINT64_MAX)
		return false;

	uint64_t first = atomic_load(&d->link_first_ns);
	uint64_t per_mib = atomic_load(&d->link_ns_per_mib);
	double own = first && per_mib ? (double)first + (double)disk_chunk_len(d, want) *
							    (double)per_mib / (1u << 20)
				      : (double)PREEMPT_GUESS_NS;
	double thr = 2 * own + (double)PREEMPT_MARGIN_NS;
	uint64_t now = now_ns();
	if (!rs->first_ns)
		return (double)(now - rs->start_ns) > 2 * thr;
	double body = (double)(now - rs->first_ns - rs->held_ns);
	if (body <= thr)
		return false;
	if (rs->got - rs->first_got < LINK_RATE_MIN_BYTES)
		return true; /* a trickle */
	/* With a manifest, no chunk is stored before the whole run. */
	double need = (double)disk_run_len(d, rs->a, rs->early ? want : rs->b);
	return (need - (double)rs->got) * body / (double)(rs->got - rs->first_got) > thr;
}

/* Stores the fetched chunks [a, b] from buf; *ret_local on a local failure. */
static int store_run(struct cache_disk *d, uint64_t a, uint64_t b, const void *buf,
		     bool background, bool *ret_local)
{
	struct run_store rs = {.d = d, .buf = buf, .a = a, .b = b, .next = a};

	run_store_upto(&rs, b + 1, background);
	*ret_local = rs.r < 0;
	return rs.r;
}

/*
 * Deferred stores.  A demand reader answered from the fetch buffer need
 * not wait for the chunk's pwrite (a copy of up to a run, which on a fast
 * link costs as much as the fetch, and which queues behind the streamer's
 * writes on the image's inode lock).  Its chunks stay claimed until the
 * store is done, so every other reader or writer of them waits as before,
 * and a bit is never set before its data are in the image.
 */
struct store_job {
	struct store_job *next;
	void *buf;
	uint64_t a, b;
	struct inflight *claims[];
};

/*
 * At most this many bytes, over all disks, wait for the store workers (or
 * one run, if larger, alone); beyond, fills store in their own thread,
 * after answering their reader (one answered from a copy, without
 * answer(), after the store).  Half of the demand budget, whose
 * buffers they are: where stores fall behind the fetches (back-to-back
 * cold reads during a full-speed stream on loopback), a queue holding the
 * whole budget left every new cold read waiting for it, up to
 * DEMAND_BUFFER_WAIT_NS; now the fills beyond it store beside the
 * worker, and half of the budget stays for fetches (BENCHMARKS.md (7)).
 */
#define STOREQ_MAX_BYTES (DEMAND_BUFFER_BUDGET / 2)
static atomic_uint_fast64_t storeq_bytes; /* queued on every disk */

static void storeq_init(struct cache_disk *d)
{
	pthread_mutex_init(&d->sq.lock, NULL);
	pthread_cond_init(&d->sq.cond, NULL);
}

static void *storeq_worker(void *opaque)
{
	struct cache_disk *d = opaque;
	struct storeq *q = &d->sq;

	pthread_mutex_lock(&q->lock);
	for (;;) {
		struct store_job *j = q->head;
		if (!j) {
			if (q->quit)
				break;
			pthread_cond_wait(&q->cond, &q->lock);
			continue;
		}
		q->head = j->next;
		if (!q->head)
			q->tail = NULL;
		pthread_mutex_unlock(&q->lock);

		uint64_t len = disk_run_len(d, j->a, j->b);
		bool local;
		int r = store_run(d, j->a, j->b, j->buf, false, &local);
		buf_put(j->buf, len);
		budget_give(&demand_budget, len); /* only demand fills are queued */
		fill_finish(d, j->claims, j->a, j->b, r, local, 0);
		free(j);

		atomic_fetch_sub(&storeq_bytes, len);
		pthread_mutex_lock(&q->lock);
	}
	pthread_mutex_unlock(&q->lock);
	return NULL;
}

/* Hands buf and the claims of [a, b] to the store worker; false if it
 * cannot take them (queue full, no thread), and the caller stores. */
static bool storeq_push(struct cache_disk *d, struct inflight **claims, uint64_t a, uint64_t b,
			void *buf)
{
	struct storeq *q = &d->sq;
	uint64_t len = disk_run_len(d, a, b);
	size_t n = (size_t)(b - a + 1);

	struct store_job *j = malloc(sizeof(*j) + n * sizeof(j->claims[0]));
	if (!j)
		return false;
	j->next = NULL;
	j->buf = buf;
	j->a = a;
	j->b = b;
	memcpy(j->claims, claims, n * sizeof(j->claims[0]));

	LOCK_GUARD(&q->lock);
	if (q->quit)
		goto refuse;
	if (atomic_fetch_add(&storeq_bytes, len) + len > MAX(STOREQ_MAX_BYTES, len))
		goto unqueue;
	if (!q->started) {
		if (pthread_create(&q->thread, NULL, storeq_worker, d))
			goto unqueue;
		q->started = true;
	}
	if (q->tail)
		q->tail->next = j;
	else
		q->head = j;
	q->tail = j;
	pthread_cond_signal(&q->cond);
	return true;

unqueue:
	atomic_fetch_sub(&storeq_bytes, len);
refuse:
	free(j);
	return false;
}

/* Stores what is queued, then stops the worker. */
static void storeq_destroy(struct cache_disk *d)
{
	struct storeq *q = &d->sq;

	pthread_mutex_lock(&q->lock);
	q->quit = true;
	pthread_cond_signal(&q->cond);
	bool started = q->started;
	pthread_mutex_unlock(&q->lock);
	if (started)
		pthread_join(q->thread, NULL);
	pthread_cond_destroy(&q->cond);
	pthread_mutex_destroy(&q->lock);
}

/* A demand reader's bytes [off, off+len), to be copied out of the fetch
 * buffer into a malloc'd *out, or handed to answer() as soon as they are
 * in. */
struct deliver {
	uint64_t off;
	size_t len;
	void **out;
	cache_answer_fn *answer;  /* may be NULL */
	void *answer_opaque;
	/* Set by fill_run for the fetch's progress callback: */
	struct cache_disk *d;
	const char *buf;          /* the fetch buffer, holding from run_off */
	uint64_t run_off;
	bool answered;            /* answer() took the bytes; until then the
				   * fetch counts in d->unanswered */
	/* The current attempt's timing, for the link estimate: */
	uint64_t wire_ns;         /* the request went out */
	uint64_t first_ns, first_got, last_ns, last_got; /* progress seen */
};

/* The fetch's on_wire: the daemon's count, and the start of an attempt. */
static void deliver_on_wire(void *opaque, int delta)
{
	struct deliver *dl = opaque;

	stream_demand_on_wire(dl->d, delta);
	if (delta > 0) {
		dl->wire_ns = now_ns();
		dl->first_ns = dl->last_ns = 0;
	}
}

/* The fetch's progress: answers the reader once its bytes are in. */
static void deliver_progress(void *opaque, size_t got)
{
	struct deliver *dl = opaque;
	uint64_t skip = dl->off - dl->run_off;
	uint64_t now = now_ns();

	if (!dl->first_ns) {
		dl->first_ns = now;
		dl->first_got = got;
	}
	dl->last_ns = now;
	dl->last_got = got;
	if (dl->answered || got < skip + dl->len)
		return;
	clear_transient_error(dl->d);
	dl->answered = dl->answer(dl->answer_opaque, dl->buf + skip, dl->len);
	if (dl->answered)
		atomic_fetch_sub(&dl->d->unanswered, 1);
}

static void link_average(atomic_uint_fast64_t *avg, uint64_t sample)
{
	uint64_t old = atomic_load(avg);

	atomic_store(avg, old ? (3 * old + sample) / 4 : MAX(sample, 1u));
}

/* Folds a successful demand transfer's timing into the link estimate. */
static void link_learn(struct cache_disk *d, const struct deliver *dl)
{
	if (!dl->wire_ns || !dl->first_ns)
		return; /* no progress reported (file://) */
	link_average(&d->link_first_ns, dl->first_ns - dl->wire_ns);
	uint64_t bytes = dl->last_got - dl->first_got;
	if (bytes >= LINK_RATE_MIN_BYTES && dl->last_ns > dl->first_ns)
		link_average(&d->link_ns_per_mib,
			     (dl->last_ns - dl->first_ns) * (1ull << 20) / bytes);
}

/*
 * Reader first: where the bytes before the reader's in a run would take
 * longer to arrive than half a first-byte time, the run is fetched in two
 * requests, from the reader's page to the end and then the rest, so the
 * reader waits for about one round trip whatever its place in the chunk.
 * The cost is a request more: a connection held a round trip longer (and
 * the streamer held back as long), and a round trip more for another
 * reader of the first part.  The reader itself never pays it, and while
 * other readers wait the run stays one request.  On loopback, where a
 * 1 MiB chunk arrives in about one first-byte time, splitting at half of
 * one took a lone reader's p50 from 0.22-0.24 to 0.16-0.20 ms; at 20 ms
 * round trip the first part of a 1 MiB chunk takes a tenth of one, and
 * the run stays one request.  See BENCHMARKS.md (3).
 * Returns the length of the first part to fetch second, or 0.
 */
#define READER_FIRST_MIN (64u << 10)

static uint64_t reader_first_head(struct cache_disk *d, uint64_t skip)
{
	uint64_t head = skip & ~(uint64_t)4095;
	uint64_t first = atomic_load(&d->link_first_ns);
	uint64_t per_mib = atomic_load(&d->link_ns_per_mib);

	/* While other readers wait, the second request would hold a
	 * connection they may need (8 readers through 4 connections: p99
	 * 81-108 ms against 59-71 ms): then the reader waits its turn. */
	if (head < READER_FIRST_MIN || !first || !per_mib || atomic_load(&d->unanswered) > 1)
		return 0;
	/* In KiB (< 2^22 for any run) times at most 2^39 ns per MiB (a MiB
	 * in 9 minutes): no overflow. */
	return ((head >> 10) * MIN(per_mib, 1ull << 39) >> 10) * 2 > first ? head : 0;
}

/* A demand fetch that answers its reader early: the run, or its two parts
 * (reader_first_head), into buf; learns the link from the part with the
 * reader.  The two parts share one timeout, as one request would: the
 * readers waiting for the first part wait no longer than for any run. */
static int fetch_reader_first(struct cache_disk *d, void *buf, uint64_t len, uint64_t off,
			      const struct cache_fetch_hint *h, struct deliver *dl)
{
	uint64_t head = reader_first_head(d, dl->off - off);
	uint64_t since = !head ? 0 : h->since_ns ? h->since_ns : now_ns();
	int r;

	dl->buf = (char *)buf + head;
	dl->run_off = off + head;
	dl->wire_ns = 0;
	r = d->src.fetch_range(d->src.opaque, (char *)buf + head, len - head, off + head, h);
	if (r < 0)
		return r;
	link_learn(d, dl);
	if (!head)
		return r;
	struct cache_fetch_hint rest = *h;
	rest.since_ns = since;
	rest.hooks.progress = NULL;
	rest.hooks.on_wire = stream_demand_on_wire;
	rest.hooks.on_wire_opaque = d;
	return d->src.fetch_range(d->src.opaque, buf, head, off, &rest);
}

/*
 * Reading through a chunk in flight.  A reader of a chunk that the
 * streamer has in flight would wait for that whole transfer, and the
 * transfer shares the link with the stream's others: over a link they all
 * share (BENCHMARKS.md (7)), a 4 KiB read of such a chunk took 80-110 ms
 * at p50 and up to 430 ms, against 23 ms for a read of a chunk not in
 * flight.  A small read within one such chunk fetches its own bytes
 * instead, with a request of their range, and is answered from it; the
 * stream's fill goes on and stores the chunk.
 * - Nothing is stored from the read's request, and nothing is claimed: a
 *   write waits for the stream's fill, so no write to the chunk can have
 *   completed.
 * - One reader of a chunk at a time reads through it; the others wait
 *   for the fill as before, so reads of a chunk still make one request.
 * - Not for read-ahead's chunks: they are the ones a sequential reader
 *   reads next, and it waits for them rather than fetch them twice.
 * - Not with a manifest, whose check needs the whole chunk.
 * The request gets READ_THROUGH_NS, not the read's whole timeout: if it
 * fails (the server refuses new requests, say), the reader goes back to
 * waiting for the fill, which may be done by then, and the read's own
 * timeout, preemption and error reports work as before.  A template
 * change it finds fails the disk at once, as a fill's would.
 */
#define READ_THROUGH_MAX (256u << 10)
#define READ_THROUGH_NS (500 * 1000000ull)

/* The stream's claim that the reader of [first, last] may read through,
 * marked and referenced (until read_through_done), or NULL.  Under lock. */
static struct inflight *read_through_begin(struct cache_disk *d, uint64_t first, uint64_t last,
					   const struct deliver *dl)
{
	struct inflight *f;

	if (!dl || first != last || dl->len > READ_THROUGH_MAX || d->manifest_fd >= 0 ||
	    bitmap_get(&d->present, first))
		return NULL;
	f = inflight_find_locked(d, first);
	if (!f || !f->stream || f->through)
		return NULL;
	f->through = true;
	f->refs++;
	return f;
}

static void read_through_done(struct cache_disk *d, struct inflight *f)
{
	LOCK_GUARD(&d->lock);
	f->through = false;
	inflight_unref_locked(f);
}

/* Fetches the reader's bytes alone and answers it; 1, or -errno. */
static int read_through(struct cache_disk *d, const struct cache_fetch_hint *hint,
			struct deliver *dl)
{
	struct cache_fetch_hint h = *hint;
	void *buf = malloc(MAX(dl->len, 1u));
	int r;

	if (!d->src.fetch_range || !buf) {
		free(buf);
		return -EIO;
	}
	memset(&h.hooks, 0, sizeof(h.hooks));
	h.hooks.on_wire = stream_demand_on_wire;
	h.hooks.on_wire_opaque = d;
	h.until_ns = now_ns() + READ_THROUGH_NS;
	atomic_fetch_add(&d->waiting, 1);
	r = d->src.fetch_range(d->src.opaque, buf, dl->len, dl->off, &h);
	atomic_fetch_sub(&d->waiting, 1);
	if (r < 0) {
		free(buf);
		if (r == -ESTALE)
			note_fill_error(d, dl->off >> d->chunk_shift, dl->off >> d->chunk_shift, r,
					false);
		return r;
	}
	clear_transient_error(d);
	if (dl->answer)
		dl->answered = dl->answer(dl->answer_opaque, buf, dl->len);
	if (dl->answered)
		free(buf);
	else
		*dl->out = buf;
	return 1;
}

/* A preempted fill's chunks that demand reads wait for, into out. */
static size_t preempt_waited(struct cache_disk *d, struct inflight **claims, uint64_t a,
			     uint64_t b, uint64_t *out)
{
	size_t n = 0;

	LOCK_GUARD(&d->lock);
	for (uint64_t i = a; i <= b; i++)
		if (claims[i - a] && claims[i - a]->demand_waiters)
			out[n++] = i;
	return n;
}

/*
 * After a preempted fill has finished its claims: waits (PREEMPT_HANDOFF_NS
 * at most) until the readers it woke have claimed their chunks, or they
 * are present, so that its caller, which goes on at once, does not claim
 * them first and leave the readers waiting for another slow transfer.
 */
static void preempt_handoff(struct cache_disk *d, const uint64_t *idx, size_t n)
{
	uint64_t until = now_ns() + PREEMPT_HANDOFF_NS;

	LOCK_GUARD(&d->lock);
	for (size_t k = 0; k < n;) {
		if (bitmap_get(&d->present, idx[k]) || inflight_find_locked(d, idx[k])) {
			k++;
			continue;
		}
		uint64_t now = now_ns();
		if (now >= until)
			break;
		cond_wait_until(&d->fill_cond, &d->lock, MIN(until, now + 1000000));
	}
}

/*
 * Fetches chunks [a, b], all claimed by the caller, and finishes the
 * claims.  With dl, the reader's bytes are handed to dl->answer as soon as
 * they are in (no manifest: its check needs the whole run), or else copied
 * out once fetched and checked; the store may be left to the store worker.
 */
static int fill_run(struct cache_disk *d, struct inflight **claims, uint64_t a, uint64_t b,
		    const struct cache_fetch_hint *hint, struct deliver *dl)
{
	uint64_t off = a << d->chunk_shift;
	uint64_t len = disk_run_len(d, a, b);
	uint64_t bad = 0;
	bool local = false;
	void *buf = NULL;
	int r;

	bool background = hint->prio != CACHE_PRIO_DEMAND;
	struct cache_fetch_hint h = *hint;
	struct run_store rs = {.d = d, .a = a, .b = b, .next = a};

	budget_take(fill_budget(background), len);
	rs.direct = hint->prio == CACHE_PRIO_STREAM;
	if (background) {
		rs.claims = claims;
		h.hooks.hold = run_hold;
		h.hooks.hold_opaque = &rs;
		h.hooks.on_wire = run_on_wire;
		h.hooks.on_wire_opaque = &rs;
		h.hooks.preempt = fill_preempted;
		h.hooks.preempt_opaque = &rs;
	} else {
		h.hooks.on_wire = stream_demand_on_wire;
		h.hooks.on_wire_opaque = d;
	}
	if (!d->src.fetch_range) {
		r = -EIO;
	} else if (!(buf = buf_get(len))) {
		r = -ENOMEM;
	} else {
		rs.buf = buf;
		if (dl && dl->answer && d->manifest_fd < 0) {
			dl->d = d;
			dl->buf = buf;
			dl->run_off = off;
			h.hooks.progress = deliver_progress;
			h.hooks.progress_opaque = dl;
			h.hooks.on_wire = deliver_on_wire;
			h.hooks.on_wire_opaque = dl;
		} else if (background) {
			/* Early stores; with a manifest, only the pace. */
			rs.early = d->manifest_fd < 0;
			h.hooks.progress = rs.early ? run_store_progress : run_track_progress;
			h.hooks.progress_opaque = &rs;
		}
		/* A fill with dl starts unanswered: ensure_chunks() calls it
		 * again only after a fill that did not answer. */
		if (!background) {
			atomic_fetch_add(&d->waiting, 1);
			atomic_fetch_add(&d->unanswered, 1);
		}
		/* A chunk that does not match the manifest is fetched once
		 * more (a glitch on the way), then it is an error. */
		for (int attempt = 0; attempt < 2; attempt++) {
			if (h.hooks.progress == deliver_progress)
				r = fetch_reader_first(d, buf, len, off, &h, dl);
			else
				r = d->src.fetch_range(d->src.opaque, buf, len, off, &h);
			if (r >= 0)
				r = disk_verify_run(d, buf, a, b, &bad);
			if (r != -EILSEQ)
				break;
			log_warn("disk %s: chunk %" PRIu64 " does not match the manifest%s", d->name,
				 bad, attempt ? "" : "; fetching it again");
		}
		if (!background) {
			atomic_fetch_sub(&d->waiting, 1);
			if (!(dl && dl->answered))
				atomic_fetch_sub(&d->unanswered, 1);
		}
		/* The reader not answered early (a manifest's check needs the
		 * whole run; file:// reports no progress) is answered now,
		 * before the store, from the fetch buffer if it can be, or
		 * else from a copy. */
		if (r >= 0 && dl && !dl->answered) {
			const char *mine = (const char *)buf + (dl->off - off);

			clear_transient_error(d);
			if (dl->answer)
				dl->answered = dl->answer(dl->answer_opaque, mine, dl->len);
			if (!dl->answered && (*dl->out = malloc(MAX(dl->len, 1u))))
				memcpy(*dl->out, mine, dl->len);
		}
		if (r >= 0 && dl && (dl->answered || *dl->out) && storeq_push(d, claims, a, b, buf))
			return 0; /* the job owns buf, its budget and the claims now */
		/* What early stores did not store: all of it, from a source
		 * that reports no progress (file://). */
		if (r >= 0)
			run_store_upto(&rs, b + 1, background);
		/* A failed fetch is reported as such (ESTALE must fail the
		 * disk); an early store's failure recurs. */
		if (rs.r < 0 && r >= 0) {
			r = rs.r;
			local = true;
		}
		if (r >= 0 && hint->prio == CACHE_PRIO_STREAM)
			stream_account(d, len);
	}
	buf_put(buf, len);
	budget_give(fill_budget(background), len);
	uint64_t handoff[RUN_MAX_BYTES / CACHE_CHUNK_MIN];
	size_t nhandoff = r == -EINTR ? preempt_waited(d, claims, a, b, handoff) : 0;
	fill_finish(d, claims, a, b, r, local, bad);
	preempt_handoff(d, handoff, nhandoff);
	return r;
}

/*
 * disk_ensure_chunks(), and with dl: when [first, last] is wholly absent
 * and claimed here in one run, answers the reader from the fetch buffer
 * and returns 1 without waiting for the store.
 *
 * A DEMAND caller's timeout counts from its call, and a chunk it waited
 * for that a background fetch failed to bring it fetches itself while
 * that timeout lasts: the streamer and read-ahead give up after a few
 * attempts, and a VM's read fails only after its own timeout.  A failed
 * demand fetch (which retried for its timeout) fails its waiters too:
 * concurrent reads of a chunk make one fetch, and share its outcome.
 */
static int ensure_chunks(struct cache_disk *d, uint64_t first, uint64_t last,
			 const struct cache_fetch_hint *hint, struct deliver *dl)
{
	uint64_t max_claim = MAX(1u, RUN_MAX_BYTES >> d->chunk_shift);
	struct inflight *claims[RUN_MAX_BYTES / CACHE_CHUNK_MIN];
	struct cache_fetch_hint h = *hint;
	bool demand = h.prio == CACHE_PRIO_DEMAND;
	bool through = demand; /* read_through() not tried yet */
	uint64_t deadline = 0;
	int r;

	if (last >= d->nchunks)
		return -EINVAL;
	if (demand) {
		if (!h.since_ns)
			h.since_ns = now_ns();
		deadline = h.since_ns + (uint64_t)d->src.timeout_s * 1000000000ull;
	}
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
		struct inflight *via = through ? read_through_begin(d, first, last, dl) : NULL;
		if (via) {
			pthread_mutex_unlock(&d->lock);
			through = false;
			r = read_through(d, &h, dl);
			read_through_done(d, via);
			if (r > 0)
				return 1;
			continue; /* wait for the stream's fill after all */
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
					if (demand && f->background) {
						f->demand_waiters++; /* fill_preempted() */
						atomic_fetch_add(&d->demand_waits, 1);
					}
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
			claims[n]->background = !demand;
			claims[n]->stream = h.prio == CACHE_PRIO_STREAM;
			if (++n == max_claim)
				break;
		}
		pthread_mutex_unlock(&d->lock);

		r = 0;
		if (n && dl && !wait_for && a == first && a + n - 1 == last) {
			/* Once copied out, the bytes are the reader's even if
			 * storing them failed (that is recorded as usual). */
			r = fill_run(d, claims, a, last, &h, dl);
			if (dl->answered || *dl->out)
				return 1;
		} else if (n) {
			r = fill_run(d, claims, a, a + n - 1, &h, NULL);
			if (r == -EINTR)
				r = 0; /* preempted: what is absent again next pass */
		} else if (!wait_for)
			return -ENOMEM; /* could not claim: calloc failed */
		if (wait_for) {
			pthread_mutex_lock(&d->lock);
			bool background = wait_for->background;
			int w = inflight_wait_locked(d, wait_for);
			pthread_mutex_unlock(&d->lock);
			/* Absent again: claim it next pass. */
			if (w < 0 && r >= 0 && demand && background && now_ns() < deadline)
				continue;
			if (w == -EINTR && r >= 0 && !demand)
				continue; /* preempted (fill_preempted) */
			if (r >= 0)
				r = w == -EINTR ? -ETIMEDOUT : w;
		}
		if (r < 0)
			return r;
	}
}

int disk_ensure_chunks(struct cache_disk *d, uint64_t first, uint64_t last,
		       const struct cache_fetch_hint *hint)
{
	return ensure_chunks(d, first, last, hint, NULL);
}

int cache_disk_prepare_read(struct cache_disk *d, uint64_t off, size_t len, void **ret_data,
			    cache_answer_fn *answer, void *answer_opaque)
{
	const struct cache_fetch_hint hint = {.prio = CACHE_PRIO_DEMAND};
	uint64_t size = d->meta.size;
	struct deliver dl = {.off = off, .len = len, .out = ret_data, .answer = answer,
			     .answer_opaque = answer_opaque};

	if (ret_data)
		*ret_data = NULL;
	if (len == 0 || off >= size)
		return 0;
	if (len > size - off)
		dl.len = len = (size_t)(size - off);
	readahead_note(d, off, len);
	uint64_t first = off >> d->chunk_shift, last = (off + len - 1) >> d->chunk_shift;
	int r = ensure_chunks(d, first, last, &hint, ret_data ? &dl : NULL);
	if (dl.answered)
		return 1;
	if (r < 0)
		return r;
	if (ret_data && *ret_data)
		return 0; /* ensure_chunks() returned 1: copied out */
	LOCK_GUARD(&d->lock);
	for (uint64_t i = first; i <= last; i++)
		if (!bitmap_get(&d->zero, i))
			return 0;
	return CACHE_READ_ZEROS;
}

void cache_disk_forget_zeros(struct cache_disk *d)
{
	LOCK_GUARD(&d->lock);
	for (int64_t i = bitmap_next_set(&d->zero, 0); i >= 0;
	     i = bitmap_next_set(&d->zero, (uint64_t)i + 1))
		bitmap_clear(&d->zero, (uint64_t)i);
}

bool cache_disk_dirty(struct cache_disk *d)
{
	/* Nothing can be saved after a failed sync (see cache_disk_sync). */
	if (atomic_load(&d->sync_error))
		return false;
	if (atomic_load(&d->writes) != atomic_load(&d->writes_synced))
		return true;
	LOCK_GUARD(&d->lock);
	return d->dirty.count > 0;
}

uint64_t cache_disk_writes(struct cache_disk *d)
{
	return atomic_load(&d->writes);
}

/*
 * After a failed fdatasync of the image, the kernel may have dropped the
 * pages it could not write: a chunk stored since the last good sync may
 * read back as anything, from the page cache or not, and a later
 * fdatasync succeeds without it.  So the disk fails (absent data, writes
 * and syncs then fail with EIO or this error, as after a template change)
 * and forgets every chunk whose bit was not saved: only chunks known to
 * be on the device are served.  Called with commit_lock held.
 */
static void sync_failed(struct cache_disk *d, int r)
{
	struct bitmap saved = {0};
	struct meta m = {0};
	char why[160];
	uint64_t forgot = 0;

	atomic_store(&d->sync_error, r);
	/* The meta file's bits were written only after their data synced.
	 * If it cannot be read back, nothing counts as saved. */
	bool have_saved = meta_load(d->meta_fd, &m, &saved, why, sizeof(why)) >= 0;
	meta_clear(&m);
	disk_set_error(d, "cannot sync local image: %s; remount to recover", strerror(-r));
	pthread_mutex_lock(&d->lock);
	d->failed = true;
	d->stale = false; /* only a remount recovers */
	for (int64_t i = bitmap_next_set(&d->present, 0); i >= 0;
	     i = bitmap_next_set(&d->present, (uint64_t)i + 1)) {
		if (have_saved && bitmap_get(&saved, (uint64_t)i))
			continue;
		bitmap_clear(&d->present, (uint64_t)i);
		bitmap_clear(&d->zero, (uint64_t)i);
		forgot++;
	}
	pthread_mutex_unlock(&d->lock);
	if (have_saved)
		bitmap_destroy(&saved);
	log_err("disk %s: cannot sync the local image: %s; the %" PRIu64 " chunks stored "
		"since the last save now fail with EIO; remount to fetch them again",
		d->name, strerror(-r), forgot);
}

int cache_disk_sync(struct cache_disk *d)
{
	LOCK_GUARD(&d->commit_lock);
	/* Never again after a failed fdatasync of the image (sync_failed). */
	if (atomic_load(&d->sync_error))
		return atomic_load(&d->sync_error);
	uint64_t bm_bytes = bitmap_bytes(d->nchunks);
	uint64_t writes = atomic_load(&d->writes);
	_cleanup_free_ uint8_t *copy = NULL;
	_cleanup_free_ uint64_t *pages = NULL;
	uint64_t ndirty = 0;
	bool all_present;
	int r = 0;

	/* A dirty page is saved from both bitmaps: present, then written. */
	const size_t nmaps = d->track_written ? 2 : 1;
	const struct bitmap *maps[2] = {&d->present, &d->written};

	pthread_mutex_lock(&d->lock);
	all_present = d->present.count == d->nchunks;
	if (d->dirty.count) {
		copy = malloc(d->dirty.count * nmaps * DIRTY_PAGE_BYTES);
		pages = malloc(d->dirty.count * sizeof(*pages));
		if (!copy || !pages) {
			pthread_mutex_unlock(&d->lock);
			return -ENOMEM;
		}
		for (int64_t p = bitmap_next_set(&d->dirty, 0); p >= 0;
		     p = bitmap_next_set(&d->dirty, (uint64_t)p + 1)) {
			uint64_t start = (uint64_t)p * DIRTY_PAGE_BYTES;
			uint64_t n = MIN((uint64_t)DIRTY_PAGE_BYTES, bm_bytes - start);
			for (size_t k = 0; k < nmaps; k++)
				memcpy(copy + (ndirty * nmaps + k) * DIRTY_PAGE_BYTES,
				       maps[k]->bits + start, n);
			pages[ndirty++] = (uint64_t)p;
			bitmap_clear(&d->dirty, (uint64_t)p);
		}
	}
	pthread_mutex_unlock(&d->lock);

	/* Data first: every present bit in the copy was set after its
	 * chunk's write returned, so this fdatasync makes all of them true on
	 * disk (written bits are set before, which only spares verify a
	 * comparison).  It runs even when no write was counted: cheap on a
	 * clean file, and an fsync(2) must never depend on bookkeeping to be
	 * honoured. */
	if (fdatasync(d->img_fd) < 0) {
		r = -errno;
		sync_failed(d, r);
		return r;
	}
	atomic_store(&d->writes_synced, writes);
	for (uint64_t k = 0; r >= 0 && k < ndirty * nmaps; k++) {
		uint64_t start = pages[k / nmaps] * DIRTY_PAGE_BYTES;
		r = full_pwrite(d->meta_fd, copy + k * DIRTY_PAGE_BYTES,
				MIN((uint64_t)DIRTY_PAGE_BYTES, bm_bytes - start),
				META_BITMAP_OFFSET + (k % nmaps) * bm_bytes + start);
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
		r = store_flag(d, META_FLAG_COMPLETE, true);
		if (r >= 0)
			log_notice("disk %s is complete: it needs its template no more", d->name);
	}
	return r;
}

