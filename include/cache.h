/* SPDX-License-Identifier: MIT */
/*
 * The local image of one disk: a sparse raw data file NAME.img and a
 * metadata file NAME.meta (header + present-bitmap) in the image
 * directory, the rules for filling chunks from a template through an
 * injected source, writes, durability, and the background streamer.
 *
 * Threading: every cache_disk_* function may be called from any thread
 * (FUSE workers, control handlers, streamer workers) unless it says
 * otherwise.  Functions that fetch block the calling thread on the source;
 * no cache lock is held while the source runs.  Statistics are atomic or
 * copied under a short lock, so progress queries never wait for I/O.
 *
 * cache/ never sees HTTP or FUSE: the template is reached only through
 * struct cache_source.
 */
#ifndef STREAMFS_CACHE_H
#define STREAMFS_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xfer.h"

#define CACHE_CHUNK_MIN (64u * 1024)
#define CACHE_CHUNK_MAX (16u * 1024 * 1024)
#define CACHE_CHUNK_DEFAULT (1u * 1024 * 1024)

enum cache_prio {
	CACHE_PRIO_DEMAND, /* a reader or writer waits for it */
	CACHE_PRIO_STREAM, /* the background streamer */
	CACHE_PRIO_READAHEAD, /* speculative, ahead of a sequential reader */
};

/* What a source should know about one request. */
struct cache_fetch_hint {
	enum cache_prio prio;
	uint64_t max_rate; /* bytes/s cap for this transfer, 0 = none */
	uint64_t since_ns; /* DEMAND: the timeout counts from this now_ns()
			    * time (a request that finishes a fetch begun
			    * earlier); 0: from the call */
	uint64_t until_ns; /* DEMAND: give up at this now_ns() time if it
			    * comes before the timeout's end; 0: none */
	struct xfer_hooks hooks; /* set by the cache, passed on to the transfer */
};

/*
 * How the cache reaches the template.  fetch_range fills buf with exactly
 * len bytes at off, or returns -errno: -ESTALE when the template changed
 * (permanent: the disk goes to state error), -ETIMEDOUT / -EHOSTUNREACH /
 * -EAGAIN / -EIO for failures that were already retried as the source
 * sees fit.  buf is borrowed for the call.  Called from any thread with no
 * cache lock held.  get_counters may be NULL.
 */
struct cache_source {
	int (*fetch_range)(void *opaque, void *buf, size_t len, uint64_t off,
			   const struct cache_fetch_hint *hint);
	/* bytes received from the template so far, network errors seen */
	void (*get_counters)(void *opaque, uint64_t *ret_fetched, uint64_t *ret_errors);
	/* the last error text of the source, "" when none; copies into buf */
	void (*last_error)(void *opaque, char *buf, size_t bufsize);
	void *opaque;
	/* How long a DEMAND fetch retries (since_ns on).  A demand read
	 * whose chunk a background fetch failed to bring tries again itself
	 * while that time lasts; 0: it fails with that error. */
	unsigned timeout_s;
};

struct manifest;

/* What is recorded at creation; strings are borrowed for the call. */
struct cache_disk_params {
	const char *url;           /* template URL, may carry credentials */
	const char *etag;          /* validator or NULL */
	const char *last_modified; /* validator or NULL */
	const char *manifest_url;  /* NULL when none */
	uint64_t size;             /* template size in bytes, > 0 */
	uint32_t chunk_size;       /* power of two, CACHE_CHUNK_MIN..MAX */
	uint64_t speed;            /* streaming limit in bytes/s, 0 = none */
	const struct manifest *manifest; /* NULL, or one matching size and chunk_size:
					  * its zero chunks start present (holes) and
					  * every fetched chunk is verified */
};

enum cache_state {
	CACHE_STATE_IDLE,
	CACHE_STATE_STREAMING,
	CACHE_STATE_PAUSED,
	CACHE_STATE_COMPLETE,
	CACHE_STATE_ERROR,
};

const char *cache_state_name(enum cache_state s);

struct cache_disk_stats {
	enum cache_state state;
	uint64_t size;       /* bytes */
	uint32_t chunk_size; /* bytes */
	uint64_t chunks;     /* total */
	uint64_t present;    /* chunks present */
	uint64_t cached;     /* bytes present (the last chunk may be short) */
	uint64_t position;   /* streamer's next offset, bytes */
	uint64_t rate;       /* measured streaming rate, bytes/s */
	uint64_t speed;      /* configured limit, bytes/s, 0 = none */
	uint64_t fetched;    /* bytes received from the template */
	uint64_t errors;     /* network errors seen */
	uint64_t waiting;    /* demand reads now waiting on the source */
	char error[256];     /* last error, "" when none */
};

struct cache_disk;

/*
 * Creates NAME.img (sparse, p->size bytes) and NAME.meta in dirfd.  Fails
 * with -EEXIST when either exists, -EINVAL for bad parameters,
 * -ENAMETOOLONG for overlong strings, or the -errno of the failing
 * syscall; on failure nothing is left behind.  The metadata file is
 * written to a temporary name, synced and renamed into place last, so a
 * crash leaves no half-made disk.
 */
int cache_disk_create(int dirfd, const char *name, const struct cache_disk_params *p)
	__attribute__((warn_unused_result));

/*
 * Opens an existing disk.  Returns 0 and *ret, or -ENOENT, -EBADMSG
 * (bad magic, bad checksum, truncated, inconsistent with the image),
 * -EPROTONOSUPPORT (unknown metadata version), or a syscall's -errno.
 * ret_why (may be NULL) receives a short reason for failures.
 * The caller owns *ret; free with cache_disk_free().  No network.
 */
int cache_disk_open(int dirfd, const char *name, struct cache_disk **ret, char *ret_why,
		    size_t why_size) __attribute__((warn_unused_result));

/*
 * Stops the streamer, commits state (data, bitmap, header), releases
 * everything.  Logs (does not return) a failed final commit.
 * cache_disk_free(NULL) is a no-op.
 */
void cache_disk_free(struct cache_disk *d);

/* Sets the source; src is copied.  Call before any read, write or stream. */
void cache_disk_set_source(struct cache_disk *d, const struct cache_source *src);

const char *cache_disk_name(const struct cache_disk *d);
const char *cache_disk_url(const struct cache_disk *d);          /* raw, may hold credentials */
const char *cache_disk_etag(const struct cache_disk *d);         /* "" when none */
const char *cache_disk_last_modified(const struct cache_disk *d); /* "" when none */
uint64_t cache_disk_size(const struct cache_disk *d);
uint32_t cache_disk_chunk_size(const struct cache_disk *d);

#define CACHE_READAHEAD_DEFAULT (32u << 20)
#define CACHE_READAHEAD_MAX (64u << 20)

/*
 * How far ahead of a sequential reader absent chunks are fetched in the
 * background (bytes, at least two chunks when not 0); 0 turns read-ahead
 * off, so that reads fetch only the chunks they cover.  Default 0.
 */
void cache_disk_set_readahead(struct cache_disk *d, uint64_t bytes);

/* The local image's fd (O_RDWR), for zero-copy reads of present data. */
int cache_disk_fd(const struct cache_disk *d);

/*
 * Answers a reader early: called from inside the fetch with the reader's
 * bytes as soon as they are in and checked, before the rest of the run
 * has arrived, or (a manifest, a source without progress) after the
 * fetch and before the store.  Returns true when the reader has its
 * answer; the fill then goes on (and may still fail, which is recorded
 * as usual).
 */
typedef bool cache_answer_fn(void *opaque, const void *data, size_t len);

/*
 * Makes [off, off+len) readable, fetching absent chunks with priority
 * DEMAND (runs of consecutive absent chunks in one request; chunks
 * already in flight are waited for, never fetched twice).  Returns 0 or
 * -errno (-EIO when the disk is in state error and data are absent).
 * With ret_data, when this call fetched the whole range in one request,
 * *ret_data is a malloc'd copy of the len bytes, taken from the fetch
 * buffer before the chunks are stored (they are stored in the
 * background); otherwise *ret_data is NULL and, after 0, the bytes may be
 * read from cache_disk_fd().  With answer too, such a read is offered
 * to answer() as soon as its bytes are in (with a manifest, whose check
 * needs whole chunks, once the run is checked; either way before the
 * store), and *ret_data stays NULL if answer() took them; then returns 1
 * at once after the fill, whatever its result.  Returns CACHE_READ_ZEROS
 * instead of 0 when every chunk of the range was stored as a hole since
 * the disk was opened and not written since: the range reads as zeros,
 * and the caller may answer from zeros rather than read the image.
 */
#define CACHE_READ_ZEROS 2
int cache_disk_prepare_read(struct cache_disk *d, uint64_t off, size_t len, void **ret_data,
			    cache_answer_fn *answer, void *answer_opaque)
	__attribute__((warn_unused_result));

/*
 * Writes len bytes at off into the local image.  Partially covered absent
 * chunks are first filled from the template; wholly covered ones are not
 * fetched.  Written chunks become present and are never overwritten by
 * streamed data.  Returns 0 or -errno.  Durable only after
 * cache_disk_sync().
 */
int cache_disk_write(struct cache_disk *d, const void *buf, size_t len, uint64_t off)
	__attribute__((warn_unused_result));

/*
 * Makes [off, off+len) read as zeros (fallocate PUNCH_HOLE or ZERO_RANGE,
 * e.g. a VM's discard): holes in the local image, like a write of zeros
 * but without the data.  Partially covered absent chunks are filled from
 * the template first.  Returns 0 or -errno; durable after cache_disk_sync.
 */
int cache_disk_zero(struct cache_disk *d, uint64_t off, uint64_t len)
	__attribute__((warn_unused_result));

/*
 * Makes all data written so far and the bitmap bits that cover them
 * durable: fdatasync of the image, then the dirty bitmap pages, then
 * fdatasync of the metadata.  Also records completion.  Returns 0 or
 * -errno.  A failed fdatasync of the image fails the disk for good (until
 * it is opened again): the chunks stored since the last good sync are
 * forgotten, and every later call returns that error.
 */
int cache_disk_sync(struct cache_disk *d) __attribute__((warn_unused_result));

/* Cheap check used by the flusher: true when cache_disk_sync has work to do. */
bool cache_disk_dirty(struct cache_disk *d);

/*
 * How many times data were written to the image since the disk was
 * opened (fetched chunks stored, writes applied): the flusher compares two
 * readings to tell a busy disk from an idle one.
 */
uint64_t cache_disk_writes(struct cache_disk *d);

/*
 * Forgets which chunks read as zeros (see cache_disk_prepare_read()): for
 * when the image may change behind the cache's back, as it does through a
 * writable passthrough descriptor's mmap.
 */
void cache_disk_forget_zeros(struct cache_disk *d);

/* True when every chunk is present: the local image is the whole disk. */
bool cache_disk_complete(struct cache_disk *d);

/* Fills a consistent snapshot of the disk's progress. Never blocks on I/O. */
void cache_disk_get_stats(struct cache_disk *d, struct cache_disk_stats *ret);

/*
 * SEEK_DATA / SEEK_HOLE over the disk: holes are reported only where they
 * are known (present chunks that are holes in the local image).  Returns
 * the offset or -ENXIO / -EINVAL.
 */
int64_t cache_disk_lseek(struct cache_disk *d, uint64_t off, int whence);

/*
 * Draws which parts of the disk are present into out (cells characters
 * plus a NUL; out has cells + 1 bytes): cell k covers chunks
 * [k*n/cells, (k+1)*n/cells) and is '#' when all of them are present, '0'
 * when none is, and '1'..'9' for the tenths in between (rounded up, so any
 * present chunk shows).  Takes the disk lock for a bitmap walk.
 */
void cache_disk_map(struct cache_disk *d, char *out, unsigned cells);

/*
 * Re-hashes every present chunk that the manifest describes and compares,
 * but for those changed through the mount (their count goes to
 * *ret_written; a disk added by a streamfs without the written-bitmap
 * knows only those written since).  Returns the number of mismatching
 * chunks (>= 0) and writes up to nout of their offsets to out, -ENOENT
 * when the disk has no manifest, or another -errno; *ret_checked counts
 * the chunks compared.  Reads the whole local image: slow, call from a
 * thread that may block.
 */
int64_t cache_disk_verify(struct cache_disk *d, uint64_t *out, size_t nout,
			  uint64_t *ret_checked, uint64_t *ret_written)
	__attribute__((warn_unused_result));

/* True when the disk has a manifest. */
bool cache_disk_has_manifest(const struct cache_disk *d);

/* --- the streamer (cache/stream.c) --- */

/*
 * Starts or resumes streaming with up to depth chunks in flight.  Clears a
 * retryable error (ENOSPC, network).  Returns 0, or -EALREADY when the
 * disk is complete, -EIO when it is in a permanent error (template
 * changed).
 */
int cache_disk_stream_start(struct cache_disk *d) __attribute__((warn_unused_result));

/*
 * For a disk failed by a template change alone (found now or before this
 * mount): asks the template for one byte with the recorded validator, and
 * if the template is the one added again, clears the error, here and in
 * the metadata.  Returns 0 (also when there is nothing to check), -ESTALE
 * when the template still differs, or another -errno when the check could
 * not be made; why says why.  Blocks for up to the source's timeout.
 */
int cache_disk_recheck(struct cache_disk *d, char *why, size_t why_size)
	__attribute__((warn_unused_result));

/* Pauses streaming; chunks in flight finish. Returns 0 or -EALREADY (complete). */
int cache_disk_stream_stop(struct cache_disk *d) __attribute__((warn_unused_result));

/* Sets the speed limit in bytes/s (0 = none), at once, and persists it. */
int cache_disk_stream_set_speed(struct cache_disk *d, uint64_t speed)
	__attribute__((warn_unused_result));

/* How many chunks the streamer keeps in flight; call before starting. */
void cache_disk_stream_set_depth(struct cache_disk *d, unsigned depth);

/*
 * Streams exactly the chunk holding off (if absent) and writes to
 * *ret_next the offset of the next absent chunk after it, or UINT64_MAX
 * when there is none.  Returns 0, -EINVAL when off >= size, or the fetch's
 * -errno.
 */
int cache_disk_stream_chunk(struct cache_disk *d, uint64_t off, uint64_t *ret_next)
	__attribute__((warn_unused_result));

#endif
