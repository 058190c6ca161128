// SPDX-License-Identifier: MIT
/*
 * The background streamer of one disk: worker threads walk the disk in
 * order, skip present chunks and fill absent ones through the source with
 * STREAM priority, several in flight, under the disk's speed limit.  Also
 * single-chunk mode for management tools.
 *
 * Threads: the workers (started on the first start, living until the disk
 * is freed) plus callers of the cache_disk_stream_* API from control
 * handlers.  Demand reads never wait for the streamer: the streamer never
 * holds a lock across a fetch, and the source serves DEMAND first.  More:
 * while a demand request of any disk of the mount is under way (and while
 * a demand fetch of their own disk is in progress), background threads
 * (streamers and read-ahead) hold back: they start no new request,
 * transfers under way stop reading their sockets (so TCP slows the
 * server's side too), and the streamer's run size starts again from one
 * chunk.  The link, the CPU and the image's inode lock go to the read a
 * VM waits for; the disks share the CPU, the connections and mostly the
 * link, so a VM's read does not wait behind another disk's stream
 * either.  A thread holds back YIELD_MAX_NS at most in every
 * 2 * YIELD_MAX_NS, so busy VMs slow streaming but never stop it.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "disk_i.h"
#include "log.h"
#include "util.h"

#define BACKOFF_MIN_NS 500000000ull   /* first retry after a failed chunk */
#define BACKOFF_MAX_NS 30000000000ull /* never wait longer than this */
#define STREAM_NICE 10                /* streamer threads' nice value */
#define YIELD_MAX_NS 50000000ull      /* longest a worker holds back for demand */
#define YIELD_POLL_NS 500000ull       /* how often a held-back worker looks again */

void stream_init(struct cache_disk *d)
{
	struct stream *st = &d->st;

	pthread_mutex_init(&st->lock, NULL);
	cond_init_monotonic(&st->cond);
	st->mode = STREAM_IDLE;
	st->depth = 2;
	ratelimit_init(&st->rl, d->meta.speed, now_ns());
}

void stream_destroy(struct cache_disk *d)
{
	struct stream *st = &d->st;

	pthread_mutex_lock(&st->lock);
	st->quit = true;
	pthread_cond_broadcast(&st->cond);
	unsigned n = st->nthreads;
	pthread_mutex_unlock(&st->lock);
	for (unsigned i = 0; i < n; i++)
		pthread_join(st->threads[i], NULL);
	free(st->threads);
	st->threads = NULL;
	st->nthreads = 0;
	ratelimit_destroy(&st->rl);
	pthread_cond_destroy(&st->cond);
	pthread_mutex_destroy(&st->lock);
}

void stream_snapshot(struct cache_disk *d, enum stream_mode *ret_mode, uint64_t *ret_pos)
{
	LOCK_GUARD(&d->st.lock);
	*ret_mode = d->st.mode;
	*ret_pos = d->st.cursor << d->chunk_shift;
}


void stream_account(struct cache_disk *d, uint64_t bytes)
{
	uint64_t sec = now_ns() / 1000000000ull;
	unsigned slot = (unsigned)(sec % RATE_SLOTS);

	/* A slot holding an older second is recycled.  Two threads may race
	 * on the recycle and lose a few bytes of one sample: acceptable for
	 * a displayed rate, and it keeps this path lock-free. */
	if (atomic_load(&d->rate_sec[slot]) != sec) {
		atomic_store(&d->rate_bytes[slot], 0);
		atomic_store(&d->rate_sec[slot], sec);
	}
	atomic_fetch_add(&d->rate_bytes[slot], bytes);
}

uint64_t stream_rate(struct cache_disk *d)
{
	uint64_t sec = now_ns() / 1000000000ull;
	uint64_t sum = 0;
	unsigned window = RATE_SLOTS - 3; /* whole seconds before this one */
	uint64_t since = atomic_load(&d->rate_since);

	/* Just after a start, average over the seconds streamed so far. */
	if (since && sec > since && sec - since < window)
		window = (unsigned)(sec - since);
	for (unsigned k = 1; k <= window; k++) {
		uint64_t s = sec - k;
		unsigned slot = (unsigned)(s % RATE_SLOTS);
		if (atomic_load(&d->rate_sec[slot]) == s)
			sum += atomic_load(&d->rate_bytes[slot]);
	}
	return sum / window;
}

/* Demand requests of every disk of the daemon under way (sent, and not
 * yet done); each disk counts its demand fetches in progress in
 * d->waiting. */
static atomic_uint_fast64_t demand_on_wire;

/* Whether background work holds back: for a demand request of any disk
 * under way, and with own, for a demand fetch of that disk in progress
 * (waiting for a connection, or for its next attempt).  Another disk's
 * fetch between attempts asks nothing of the link or the CPU: a template
 * that is down, read again and again by its VM, must not slow every
 * other disk's stream. */
static bool demand_pending(const struct cache_disk *own)
{
	return atomic_load(&demand_on_wire) || (own && atomic_load(&own->waiting));
}

/* This thread's holding back: the window it is in and how long it has
 * held in it (see yield_to_demand). */
static _Thread_local uint64_t yield_window_start;
static _Thread_local uint64_t yield_held_ns;

/*
 * Holds this background thread back while demand_pending(own), but for at
 * most YIELD_MAX_NS in every 2 * YIELD_MAX_NS, so that
 * back-to-back demand reads slow the background to half speed at worst,
 * never to a stop.  Returns whether it held.  Call with no lock held.
 *
 * The thread polls every YIELD_POLL_NS rather than being woken: waking it
 * from the demand read put the demand thread itself off the CPU (the woken
 * workers took it) for 1-2.5 ms just before it answered, more than the
 * whole read takes when idle.
 */
static bool yield_to_demand(const struct cache_disk *own)
{
	uint64_t now = now_ns();

	if (!demand_pending(own))
		return false;
	if (now - yield_window_start >= 2 * YIELD_MAX_NS) {
		yield_window_start = now;
		yield_held_ns = 0;
	}
	if (yield_held_ns >= YIELD_MAX_NS)
		return false;
	uint64_t start = now, until = now + (YIELD_MAX_NS - yield_held_ns);
	while (demand_pending(own) && now < until) {
		uint64_t ns = MIN(YIELD_POLL_NS, until - now);
		struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)ns};
		nanosleep(&ts, NULL);
		now = now_ns();
	}
	yield_held_ns += now - start;
	return true;
}

void stream_hold(void *opaque)
{
	(void)opaque;
	/* Only for demand requests on the wire: one still waiting for a
	 * connection may be waiting for this very transfer's. */
	yield_to_demand(NULL);
}

void stream_demand_on_wire(void *opaque, int delta)
{
	(void)opaque;
	if (delta > 0)
		atomic_fetch_add(&demand_on_wire, 1);
	else
		atomic_fetch_sub(&demand_on_wire, 1);
}

/* Records completion durably; called with no lock held. */
static void stream_finish(struct cache_disk *d)
{
	int r = cache_disk_sync(d);

	if (r < 0) {
		log_err("disk %s: cannot record completion: %s", d->name, strerror(-r));
		disk_set_error(d, "cannot record completion: %s", strerror(-r));
	}
}

struct worker_arg {
	struct cache_disk *d;
	unsigned id;
};

static void *stream_worker(void *opaque)
{
	struct worker_arg *wa = opaque;
	struct cache_disk *d = wa->d;
	struct stream *st = &d->st;
	unsigned id = wa->id;

	free(wa);
	/* Background work yields the CPU to demand reads: on a small machine
	 * a full-speed stream would otherwise delay a VM's read for want of
	 * a core.  Per-thread nice is Linux behaviour; failure is harmless. */
	if (setpriority(PRIO_PROCESS, (id_t)gettid(), STREAM_NICE) < 0)
		log_debug(LOG_SUB_STREAM, "cannot lower the streamer's priority: %m");
	bool demand_checked = false; /* held back as long as allowed already */

	pthread_mutex_lock(&st->lock);
	while (!st->quit) {
		uint64_t now = now_ns();
		bool limited = ratelimit_get(&st->rl) != 0;

		/* A limited stream runs one chunk at a time so that each
		 * transfer can be paced smoothly by the source. */
		if (st->mode != STREAM_RUNNING || id >= st->depth || (limited && id > 0)) {
			pthread_cond_wait(&st->cond, &st->lock);
			continue;
		}
		if (now < st->backoff_until) {
			cond_wait_until(&st->cond, &st->lock, st->backoff_until);
			continue;
		}
		/* New requests wait for any demand fetch of the disk, even
		 * one queued for a connection (they would only take
		 * connections from it), and for any disk's demand request
		 * under way.  After holding (or not, within its limits),
		 * everything above is checked again: a stop or a quit may
		 * have come meanwhile. */
		if (!demand_checked && demand_pending(d)) {
			st->run_chunks = 1;
			pthread_mutex_unlock(&st->lock);
			bool held = yield_to_demand(d);
			pthread_mutex_lock(&st->lock);
			demand_checked = !held;
			continue;
		}
		demand_checked = false;
		int64_t idx = disk_next_absent(d, st->cursor);
		if (idx < 0) {
			if (st->active) {
				pthread_cond_wait(&st->cond, &st->lock);
				continue;
			}
			if (disk_next_absent(d, 0) >= 0) {
				/* Chunks that failed earlier lie behind us. */
				st->cursor = 0;
				continue;
			}
			st->mode = STREAM_IDLE;
			st->cursor = d->nchunks;
			pthread_cond_broadcast(&st->cond);
			pthread_mutex_unlock(&st->lock);
			stream_finish(d);
			pthread_mutex_lock(&st->lock);
			continue;
		}
		/* Unthrottled, a run of absent chunks goes in one request;
		 * throttled, one chunk at a time keeps the pace smooth. */
		uint64_t cap = limited ? 1 : MAX(1u, STREAM_RUN_BYTES >> d->chunk_shift);
		uint64_t max_run = MIN(cap, MAX(1u, st->run_chunks));
		st->run_chunks = MIN(cap, 2 * max_run);
		uint64_t last = disk_absent_run_end(d, (uint64_t)idx, max_run);
		st->cursor = last + 1;
		st->active++;
		pthread_mutex_unlock(&st->lock);

		uint64_t len = disk_run_len(d, (uint64_t)idx, last);
		uint64_t wait = ratelimit_reserve(&st->rl, len, now_ns());
		bool go = true;
		if (wait) {
			uint64_t until = now_ns() + wait;
			pthread_mutex_lock(&st->lock);
			while (!st->quit && st->mode == STREAM_RUNNING && now_ns() < until)
				cond_wait_until(&st->cond, &st->lock, until);
			go = !st->quit && st->mode == STREAM_RUNNING;
			pthread_mutex_unlock(&st->lock);
		}
		int r = 0;
		if (go) {
			const struct cache_fetch_hint hint = {
				.prio = CACHE_PRIO_STREAM,
				.max_rate = ratelimit_get(&st->rl),
			};
			r = disk_ensure_chunks(d, (uint64_t)idx, last, &hint);
		}

		bool failed, local_error;
		disk_error_flags(d, &failed, &local_error);
		pthread_mutex_lock(&st->lock);
		st->active--;
		if (!go) {
			st->cursor = MIN(st->cursor, (uint64_t)idx);
		} else if (r >= 0) {
			st->backoff_ns = 0;
		} else if (failed) {
			st->mode = STREAM_IDLE;
		} else if (local_error) {
			log_err("disk %s: streaming stopped: cannot write local image: %s", d->name,
				strerror(-r));
			st->mode = STREAM_PAUSED;
			st->cursor = MIN(st->cursor, (uint64_t)idx);
		} else {
			/* The source already retried; back off with jitter and
			 * resume by ourselves when the template answers again.
			 * Workers failing together step the back-off once. */
			if (now_ns() >= st->backoff_until) {
				st->backoff_ns = st->backoff_ns ? MIN(st->backoff_ns * 2, BACKOFF_MAX_NS)
								: BACKOFF_MIN_NS;
				uint64_t jitter = (uint64_t)rand() % (st->backoff_ns / 2 + 1);
				st->backoff_until = now_ns() + st->backoff_ns / 2 + jitter;
			}
			st->cursor = MIN(st->cursor, (uint64_t)idx);
			log_warn("disk %s: streaming chunk %" PRId64 " failed (%s); retrying in %.1f s",
				 d->name, idx, strerror(-r),
				 (double)(st->backoff_until - now_ns()) / 1e9);
		}
		/* Progress is saved by the mount's flusher (cache_disk_sync). */
		pthread_cond_broadcast(&st->cond);
	}
	pthread_mutex_unlock(&st->lock);
	return NULL;
}

/* Starts the worker threads once; st->lock held. */
static int start_threads_locked(struct cache_disk *d)
{
	struct stream *st = &d->st;

	if (st->nthreads >= st->depth)
		return 0;
	pthread_t *t = realloc(st->threads, st->depth * sizeof(*t));
	if (!t)
		return -ENOMEM;
	st->threads = t;
	while (st->nthreads < st->depth) {
		struct worker_arg *wa = malloc(sizeof(*wa));
		if (!wa)
			return -ENOMEM;
		wa->d = d;
		wa->id = st->nthreads;
		int r = pthread_create(&st->threads[st->nthreads], NULL, stream_worker, wa);
		if (r) {
			free(wa);
			return -r;
		}
		st->nthreads++;
	}
	return 0;
}

int cache_disk_stream_start(struct cache_disk *d)
{
	struct stream *st = &d->st;

	pthread_mutex_lock(&d->lock);
	bool complete = d->present.count == d->nchunks;
	bool failed = d->failed;
	if (!failed && !complete) {
		d->local_error = false;
		d->error[0] = '\0';
	}
	pthread_mutex_unlock(&d->lock);
	if (complete)
		return -EALREADY;
	if (failed)
		return -EIO;

	LOCK_GUARD(&st->lock);
	int r = start_threads_locked(d);
	if (r < 0 && st->nthreads == 0)
		return r;
	if (st->mode != STREAM_RUNNING) {
		atomic_store(&d->rate_since, now_ns() / 1000000000ull);
		st->mode = STREAM_RUNNING;
		st->backoff_until = 0;
		st->backoff_ns = 0;
		st->run_chunks = 1;
		if (st->cursor >= d->nchunks)
			st->cursor = 0;
	}
	pthread_cond_broadcast(&st->cond);
	return 0;
}

int cache_disk_stream_stop(struct cache_disk *d)
{
	struct stream *st = &d->st;

	pthread_mutex_lock(&d->lock);
	bool complete = d->present.count == d->nchunks;
	pthread_mutex_unlock(&d->lock);
	if (complete)
		return -EALREADY;
	LOCK_GUARD(&st->lock);
	st->mode = STREAM_PAUSED;
	pthread_cond_broadcast(&st->cond);
	return 0;
}

int cache_disk_stream_set_speed(struct cache_disk *d, uint64_t speed)
{
	int r = 0;

	if (speed > RATE_MAX)
		return -ERANGE;
	/* The limit takes effect only once it is saved: a failed save
	 * (ENOSPC) changes nothing.  Under commit_lock, so that two changes
	 * apply in the order they are saved. */
	pthread_mutex_lock(&d->commit_lock);
	if (d->meta.speed != speed) {
		uint64_t old = d->meta.speed;
		d->meta.speed = speed;
		r = meta_store_header(d->meta_fd, &d->meta);
		if (r < 0)
			d->meta.speed = old;
	}
	if (r == 0)
		ratelimit_set(&d->st.rl, speed, now_ns());
	pthread_mutex_unlock(&d->commit_lock);
	pthread_mutex_lock(&d->st.lock);
	pthread_cond_broadcast(&d->st.cond);
	pthread_mutex_unlock(&d->st.lock);
	return r;
}

void cache_disk_stream_set_depth(struct cache_disk *d, unsigned depth)
{
	LOCK_GUARD(&d->st.lock);
	d->st.depth = depth ? depth : 1;
}

int cache_disk_stream_chunk(struct cache_disk *d, uint64_t off, uint64_t *ret_next)
{
	const struct cache_fetch_hint hint = {.prio = CACHE_PRIO_STREAM};
	int r;

	if (off >= d->meta.size)
		return -EINVAL;
	uint64_t idx = off >> d->chunk_shift;
	r = disk_ensure_chunks(d, idx, idx, &hint);
	if (r < 0)
		return r;
	int64_t next = disk_next_absent(d, idx + 1);
	if (next < 0) {
		if (disk_next_absent(d, 0) < 0)
			stream_finish(d);
		*ret_next = UINT64_MAX;
	} else {
		*ret_next = (uint64_t)next << d->chunk_shift;
	}
	pthread_mutex_lock(&d->st.lock);
	if (d->st.mode != STREAM_RUNNING)
		d->st.cursor = MAX(d->st.cursor, idx + 1);
	pthread_mutex_unlock(&d->st.lock);
	return 0;
}
