// SPDX-License-Identifier: MIT
/*
 * Read-ahead for sequential demand readers.  A reader that reads on where
 * its last read ended has the next window bytes of absent chunks
 * fetched in the background by a couple of worker threads, so that it
 * finds them present instead of waiting one round trip per chunk.
 * Requests go out like the streamer's (the source serves them after demand
 * reads and never on the connection kept for those), but they do not count
 * in the streaming rate.  Workers start on first use and
 * live until the disk is freed.
 */
#include <errno.h>
#include <string.h>

#include "common/cleanup.h"
#include "disk_i.h"
#include "log.h"

void readahead_init(struct cache_disk *d)
{
	struct readahead *ra = &d->ra;

	pthread_mutex_init(&ra->lock, NULL);
	pthread_cond_init(&ra->cond, NULL);
	ra->expect_off = UINT64_MAX;
}

void readahead_destroy(struct cache_disk *d)
{
	struct readahead *ra = &d->ra;

	pthread_mutex_lock(&ra->lock);
	ra->quit = true;
	pthread_cond_broadcast(&ra->cond);
	unsigned n = ra->nthreads;
	pthread_mutex_unlock(&ra->lock);
	for (unsigned i = 0; i < n; i++)
		pthread_join(ra->threads[i], NULL);
	pthread_cond_destroy(&ra->cond);
	pthread_mutex_destroy(&ra->lock);
}

static void *ra_worker(void *opaque)
{
	struct cache_disk *d = opaque;
	struct readahead *ra = &d->ra;
	const struct cache_fetch_hint hint = {.prio = CACHE_PRIO_READAHEAD};

	pthread_mutex_lock(&ra->lock);
	while (!ra->quit) {
		if (ra->next >= ra->end) {
			pthread_cond_wait(&ra->cond, &ra->lock);
			continue;
		}
		/* A run of chunks per request: one round trip for several. */
		uint64_t idx = ra->next;
		uint64_t last = MIN(ra->end, idx + MAX(1u, RA_RUN_BYTES >> d->chunk_shift)) - 1;
		ra->next = last + 1;
		pthread_mutex_unlock(&ra->lock);
		/* Failures are left to the demand read that really needs
		 * the chunk: it retries and reports. */
		int r = disk_ensure_chunks(d, idx, last, &hint);
		if (r < 0)
			log_debug(LOG_SUB_CACHE, "disk %s: read-ahead of chunk %llu: %s", d->name,
				  (unsigned long long)idx, strerror(-r));
		pthread_mutex_lock(&ra->lock);
		if (r < 0)
			ra->end = ra->next; /* stop guessing until the reader moves on */
	}
	pthread_mutex_unlock(&ra->lock);
	return NULL;
}

void cache_disk_set_readahead(struct cache_disk *d, uint64_t bytes)
{
	LOCK_GUARD(&d->ra.lock);
	d->ra.window = bytes;
}

void readahead_note(struct cache_disk *d, uint64_t off, uint64_t len)
{
	struct readahead *ra = &d->ra;

	LOCK_GUARD(&ra->lock);
	if (!ra->window)
		return;
	/* The kernel sends a sequential reader's pages as several reads in
	 * flight at once, and our threads may take them slightly out of
	 * order: a read a few read sizes from where the last one ended still
	 * counts (a strict test reset the window about once every 30 MiB at
	 * 20 ms round trip, and the reader then waited on the network). */
	uint64_t slack = MIN((uint64_t)RA_REORDER_BYTES, 8 * len);
	if (ra->expect_off == UINT64_MAX || off + slack < ra->expect_off ||
	    off > ra->expect_off + slack) {
		ra->seq_bytes = len;
		ra->expect_off = off + len;
		ra->next = ra->end = 0;
		return;
	}
	/* Only bytes read on new ground count: a reader going over the same
	 * block again, or skipping ahead, is not reading on. */
	if (off + len > ra->expect_off) {
		ra->seq_bytes += MIN(len, off + len - ra->expect_off);
		ra->expect_off = off + len;
	}
	/* One large read reaches us as several small ones: only a reader
	 * that has gone on sequentially across two chunks counts, and the
	 * window grows with how far it has come (as the kernel's own
	 * read-ahead does), up to the configured size. */
	if (ra->seq_bytes < 2 * (uint64_t)d->chunk_size)
		return;
	uint64_t window = MAX(2u, MIN(ra->window, ra->seq_bytes) >> d->chunk_shift);
	uint64_t last = (off + len - 1) >> d->chunk_shift;
	ra->next = MAX(ra->next, last + 1);
	ra->end = MIN(d->nchunks, MAX(ra->end, last + 1 + window));
	if (ra->next >= ra->end)
		return;
	while (ra->nthreads < RA_THREADS && !ra->quit) {
		if (pthread_create(&ra->threads[ra->nthreads], NULL, ra_worker, d))
			break;
		ra->nthreads++;
	}
	pthread_cond_broadcast(&ra->cond);
}
