/* SPDX-License-Identifier: MIT */
/*
 * Private: struct cache_disk and the chunk-filling primitives that the
 * streamer (stream.c) shares with the read/write paths (disk.c).
 *
 * Lock order: stream.lock -> commit_lock -> lock.  No lock is held while
 * the source fetches or while data are written to the image, except
 * commit_lock, which only covers fsync of our own files.
 */
#ifndef STREAMFS_DISK_I_H
#define STREAMFS_DISK_I_H

#include <pthread.h>
#include <stdatomic.h>

#include "cache.h"
#include "cache_i.h"
#include "ratelimit.h"

/* A chunk being filled by one owner; others wait for it, never refetch. */
struct inflight {
	uint64_t idx;
	bool done;     /* guarded by cache_disk.lock */
	int result;    /* 0 or -errno, valid once done; guarded by lock */
	unsigned refs; /* owner + waiters; the last one frees; guarded by lock */
	bool background; /* a fetch that gives up sooner than a demand read */
	bool stream;     /* the streamer's (or a chunk command's); guarded by lock */
	bool through;    /* a demand read reads through it (read_through);
			  * guarded by lock */
	unsigned demand_waiters; /* demand callers waiting for it, if
				  * background; guarded by lock */
	struct inflight *next;
};

#define RATE_SLOTS 8 /* seconds of history for the measured rate */

enum stream_mode { STREAM_IDLE, STREAM_RUNNING, STREAM_PAUSED };

struct stream {
	pthread_mutex_t lock;     /* protects: every field below; order: first */
	pthread_cond_t cond;      /* mode, quit, active or backoff changed */
	enum stream_mode mode;    /* guarded by lock */
	bool quit;                /* guarded by lock: threads exit */
	uint64_t cursor;          /* next chunk to consider; guarded by lock */
	uint64_t backoff_until;   /* now_ns() before which no new fetch; guarded */
	uint64_t backoff_ns;      /* current back-off step, 0 after success */
	unsigned depth;           /* chunks in flight wanted; guarded */
	unsigned nthreads;        /* threads started; guarded */
	unsigned active;          /* workers with a chunk in hand; guarded */

	uint64_t run_chunks;      /* chunks per request now: starts at 1 and
				   * doubles, so that a VM's first reads right
				   * after a start never wait behind a big run */
	pthread_t *threads;       /* nthreads entries; guarded */
	struct ratelimit rl;      /* own lock */
};

#define RA_THREADS 3                   /* read-ahead workers per disk */
#define RA_RUN_BYTES (4u << 20)        /* read-ahead bytes per request */
#define RA_REORDER_BYTES (1u << 20)    /* reads at most this far (and 8 read
					* sizes) from the expected offset still
					* count as sequential */

/* Read-ahead for sequential demand readers (readahead.c). */
struct readahead {
	pthread_mutex_t lock;  /* protects: every field below; order: before disk lock */
	pthread_cond_t cond;   /* work arrived or quit */
	uint64_t expect_off;   /* where the next sequential read would start */
	uint64_t seq_bytes;    /* bytes read sequentially so far in this run */
	uint64_t next;         /* next chunk to prefetch */
	uint64_t end;          /* prefetch chunks below this index */
	uint64_t window;       /* bytes ahead of the reader, 0 = off */
	unsigned nthreads;
	bool quit;
	pthread_t threads[RA_THREADS];
};

/*
 * Stores of demand fills whose reader was answered straight from the fetch
 * buffer (disk.c): the chunks stay claimed until one worker per disk,
 * started on first use, has written them to the image.
 */
struct store_job;
struct storeq {
	pthread_mutex_t lock;    /* protects: every field below; order: before disk lock */
	pthread_cond_t cond;     /* a job was queued, or quit */
	struct store_job *head;  /* oldest job first */
	struct store_job *tail;
	bool started;            /* thread is running */
	bool quit;               /* drain the queue, then exit */
	pthread_t thread;
};

struct cache_disk {
	char *name;
	int img_fd;
	int img_direct_fd;     /* the image again, O_DIRECT, for the streamer's
				* stores (disk_store_direct); -1 where the
				* filesystem refuses O_DIRECT */
	atomic_bool direct_off; /* a direct write was refused: buffered on */
	int meta_fd;
	int manifest_fd;       /* NAME.manifest, or -1 */
	uint64_t nchunks;
	uint32_t chunk_size;   /* bytes, power of two */
	unsigned chunk_shift;  /* log2(chunk_size) */
	struct cache_source src;

	pthread_mutex_t commit_lock; /* protects: meta (header fields), the
				      * meta file's contents; order: after
				      * stream.lock, before lock */
	struct meta meta;

	pthread_mutex_t lock;       /* protects: present, written, dirty, zero,
				     * inflight, failed, stale, local_error,
				     * error; order: last */
	pthread_cond_t fill_cond;   /* an inflight entry finished */
	struct bitmap present;      /* guarded by lock */
	struct bitmap written;      /* chunks changed through the mount, ever
				     * (only while track_written); guarded */
	bool track_written;         /* the meta file has a written-bitmap;
				     * set at open */
	struct bitmap dirty;        /* bitmap pages changed since last commit */
	struct bitmap zero;         /* chunks stored as holes since open: they
				     * read as zeros until written (not saved);
				     * guarded by lock */
	struct inflight *inflight;  /* guarded by lock */
	bool failed;                /* permanent: template changed, manifest
				     * mismatch or failed sync; guarded */
	bool stale;                 /* failed for a template change alone, which
				     * `start` may find undone; guarded */
	bool local_error;           /* ENOSPC/EIO on the image; cleared by start */
	char error[256];            /* last error text; guarded by lock */

	atomic_uint_fast64_t writes;        /* data writes to the image, ever */
	atomic_uint_fast64_t writes_synced; /* of those, fdatasync'd; under commit_lock */
	atomic_int sync_error;      /* -errno of a failed fdatasync of the image,
				     * sticky until the disk is opened again;
				     * set under commit_lock */
	atomic_uint_fast64_t waiting;           /* demand fetches in progress */
	atomic_uint_fast64_t demand_waits; /* the sum of demand_waiters */
	/* The link as demand fetches see it (0 = not measured yet): time from
	 * a request going out to its first body bytes, and body time per MiB.
	 * Moving averages; read and written without a lock. */
	atomic_uint_fast64_t link_first_ns;
	atomic_uint_fast64_t link_ns_per_mib;
	atomic_uint_fast64_t unanswered;  /* demand fetches whose reader, if
					   * any, is not answered yet */
	atomic_uint_fast64_t rate_bytes[RATE_SLOTS]; /* streamed bytes per second slot */
	atomic_uint_fast64_t rate_sec[RATE_SLOTS];   /* which second each slot holds */
	atomic_uint_fast64_t rate_since;  /* second streaming last started */

	struct stream st;
	struct readahead ra;
	struct storeq sq;
};

/* Bitmap bytes per dirty-tracking page. */
#define DIRTY_PAGE_BYTES 4096u
#define DIRTY_PAGE_CHUNKS (DIRTY_PAGE_BYTES * 8u)

/* Byte length of chunk idx (the last one may be short). */
uint64_t disk_chunk_len(const struct cache_disk *d, uint64_t idx);

/* Writes len bytes at off into the image, in pieces (see disk.c); 0 or -errno. */
int disk_pwrite(struct cache_disk *d, const void *buf, uint64_t len, uint64_t off);

/*
 * Makes chunks [first, last] present with the given hint, fetching absent
 * ones (claimed by this thread) and waiting for those in flight elsewhere.
 * Returns 0 or -errno.  Call with no lock held.
 */
int disk_ensure_chunks(struct cache_disk *d, uint64_t first, uint64_t last,
		       const struct cache_fetch_hint *hint) __attribute__((warn_unused_result));

/* Reads the failed (template changed) and local_error flags.  Takes d->lock. */
void disk_error_flags(struct cache_disk *d, bool *ret_failed, bool *ret_local);

/*
 * The last chunk of the run of absent chunks starting at idx (absent
 * itself), at most max chunks long.  Takes d->lock.
 */
uint64_t disk_absent_run_end(struct cache_disk *d, uint64_t idx, uint64_t max);

/* Bytes of chunks [first, last]. */
uint64_t disk_run_len(const struct cache_disk *d, uint64_t first, uint64_t last);

/* One request of the streamer or of read-ahead asks for at most this much:
 * few round trips, and a TCP window's worth in flight per connection. */
#define STREAM_RUN_BYTES (4u << 20)

/*
 * Background fills (streamer, read-ahead) of all disks together hold at
 * most this much in fetch buffers (or two chunks, for chunks larger than
 * half of it), so memory stays bounded whatever the number of disks and
 * connections.
 */
#define BACKGROUND_BUFFER_BUDGET (24u << 20)

/*
 * Demand fills (reads, writes' fills) of all disks together hold at most
 * this much in fetch buffers, from the fetch until their store is done (or
 * two chunks, for chunks larger than half of it): readers are answered
 * before the store, so without a bound a fast link piles up buffers
 * waiting to be stored, and many cold readers hold a buffer each (16M
 * chunks, 8 readers: 118 MiB).  Demand and background budgets are apart:
 * a reader never waits for the streamer's buffers.
 */
#define DEMAND_BUFFER_BUDGET (16u << 20)

/*
 * A demand fill waits at most this long for that budget, then goes on
 * over it.  Fills that hold the budget longer are stalled or retrying (a
 * template down, a stalled response): they hold little memory, since a
 * buffer's pages are touched as the body arrives, and a reader of another
 * disk, or of another server, must not wait for their timeout=.
 */
#define DEMAND_BUFFER_WAIT_NS (1000ull * 1000 * 1000)

/* First absent chunk at or after from, or -1.  Takes d->lock. */
int64_t disk_next_absent(struct cache_disk *d, uint64_t from);

/* Records an error text for user.streamfs.error; lock must not be held. */
void disk_set_error(struct cache_disk *d, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* disk.c: the chunk claim protocol shared with write.c.  All _locked
 * functions want d->lock held. */
struct inflight *inflight_find_locked(struct cache_disk *d, uint64_t idx);
struct inflight *inflight_claim_locked(struct cache_disk *d, uint64_t idx);
void inflight_finish_locked(struct cache_disk *d, struct inflight *f, int result);
int inflight_wait_locked(struct cache_disk *d, struct inflight *f);
/* Records a failed fill or write (local: of the image) for the error xattr. */
void note_fill_error(struct cache_disk *d, uint64_t first, uint64_t last, int r, bool local);

/* "NAME" + suffix into buf; -ENAMETOOLONG when it does not fit. */
int disk_name_path(char *buf, size_t n, const char *name, const char *suffix);

/* integrity.c: NAME.manifest and the per-chunk check. */
struct manifest;
int disk_manifest_file_write(int dirfd, const char *path, const struct manifest *mf)
	__attribute__((warn_unused_result));
int disk_preset_zero_chunks(int meta_fd, const struct manifest *mf)
	__attribute__((warn_unused_result));
int disk_manifest_file_open(int dirfd, const char *name, const struct meta *m, char *why,
			    size_t why_size) __attribute__((warn_unused_result));
int disk_manifest_hash_of(const struct cache_disk *d, uint64_t idx, uint8_t *out);
/* 0, -EILSEQ with *ret_bad the first chunk of [a, b] unlike the manifest, or -errno. */
int disk_verify_run(struct cache_disk *d, const uint8_t *buf, uint64_t a, uint64_t b,
		    uint64_t *ret_bad) __attribute__((warn_unused_result));

/* readahead.c: set up / tear down; note a demand read (starts prefetch). */
void readahead_init(struct cache_disk *d);
void readahead_destroy(struct cache_disk *d);
void readahead_note(struct cache_disk *d, uint64_t off, uint64_t len);

/* stream.c: set up / tear down the streamer state (no threads yet). */
void stream_init(struct cache_disk *d);
void stream_destroy(struct cache_disk *d);
/* Current streamer mode and position, for stats; takes st.lock. */
void stream_snapshot(struct cache_disk *d, enum stream_mode *ret_mode, uint64_t *ret_pos);
/* Measured streaming rate in bytes/s. Lock-free. */
uint64_t stream_rate(struct cache_disk *d);
/* xfer_hooks.hold of background fills: sleeps while a demand request of
 * any disk is on the wire, within the limits of stream.c. */
void stream_hold(void *opaque);
/* xfer_hooks.on_wire of demand fills: counts the daemon's demand requests
 * under way (opaque unused). */
void stream_demand_on_wire(void *opaque, int delta);
/* Adds streamed bytes to the rate measurement. Lock-free. */
void stream_account(struct cache_disk *d, uint64_t bytes);

#endif
