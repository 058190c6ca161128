// SPDX-License-Identifier: MIT
/*
 * Read-only views of a disk for progress reporting: statistics, the
 * present map, and SEEK_DATA/SEEK_HOLE.  Callable from any thread; they
 * take the disk lock briefly and never wait for I/O.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "disk_i.h"
#include "util.h"

bool cache_disk_complete(struct cache_disk *d)
{
	LOCK_GUARD(&d->lock);
	return d->present.count == d->nchunks;
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
	/* A disk whose progress cannot be saved is not done with its
	 * template: the chunks fetched since the failed sync come again. */
	if (s.present == s.chunks && !atomic_load(&d->sync_error))
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

