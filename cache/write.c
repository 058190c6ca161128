// SPDX-License-Identifier: MIT
/*
 * Changes made by a disk's user: writes and zeroed ranges (discard).
 * Partially covered absent chunks are filled from the template first;
 * wholly covered ones are claimed like fills, so streamed data never land
 * on top of written data.  Called from FUSE worker threads.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "disk_i.h"
#include "util.h"

/* At most this many bytes are zeroed by one claim pass. */
#define ZERO_STEP_BYTES (8u * 1024 * 1024)

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
	return disk_pwrite(d, buf, len, off);
}

static int apply_zero(struct cache_disk *d, const void *arg, uint64_t off, size_t len)
{
	(void)arg;
	if (fallocate(d->img_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
		      (off_t)len) == 0)
		return 0;
	if (errno != EOPNOTSUPP && errno != ENOSYS)
		return -errno;
	return full_pwrite_zeros(d->img_fd, len, off);
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
	if (atomic_load(&d->sync_error))
		return -EIO; /* nothing written now could be made durable */
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
	/* Reads of these chunks must come from the image from now on.  They
	 * count as written from before the change begins (verify compares a
	 * chunk only if it is still unwritten after reading it), and whether
	 * or not it succeeds: a bit saved early only spares a comparison. */
	pthread_mutex_lock(&d->lock);
	for (uint64_t i = first; i <= last; i++) {
		bitmap_clear(&d->zero, i);
		if (d->track_written && !bitmap_get(&d->written, i)) {
			bitmap_set(&d->written, i);
			bitmap_set(&d->dirty, i / DIRTY_PAGE_CHUNKS);
		}
	}
	pthread_mutex_unlock(&d->lock);
	r = apply(d, arg, off, len);
	atomic_fetch_add(&d->writes, 1);
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
		size_t n = (size_t)MIN(len - done, (uint64_t)ZERO_STEP_BYTES);
		int r = disk_modify(d, off + done, n, apply_zero, NULL);
		if (r < 0)
			return r;
		done += n;
	}
	return 0;
}

