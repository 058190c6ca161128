/* SPDX-License-Identifier: MIT */
/*
 * Private declarations of fetch/: the easy-handle pool and one HTTP range
 * request.  See include/fetch.h for the threading rules.
 */
#ifndef STREAMFS_FETCH_I_H
#define STREAMFS_FETCH_I_H

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "fetch.h"

struct fetch_pool {
	struct fetch_opts opts; /* strings owned */
	CURLSH *share;          /* DNS and TLS sessions, shared by all handles */
	pthread_mutex_t share_locks[CURL_LOCK_DATA_LAST];

	pthread_mutex_t lock;   /* protects: idle, nidle, total, demand_waiting; leaf */
	pthread_cond_t cond;    /* a handle was released */
	CURL **idle;            /* opts.connections slots; guarded by lock */
	unsigned nidle;         /* guarded by lock */
	unsigned total;         /* handles in existence; guarded by lock */
	unsigned demand_waiting; /* guarded by lock */
	atomic_bool shutdown;   /* set once by fetch_pool_shutdown */

	pthread_mutex_t hdr_lock; /* protects: headers, hdr_*; leaf */
	struct curl_slist *headers; /* from header_file; guarded by hdr_lock */
	struct timespec hdr_mtime;  /* of header_file when last read */
	uint64_t hdr_ino;
	uint64_t hdr_size;

	char *aws_key;    /* SigV4 access key id, owned; never logged */
	char *aws_secret; /* SigV4 secret, owned; wiped on free */
};

/* What one attempt learned; filled by http_range_get / http_probe_once. */
struct http_reply {
	long status;
	uint64_t cr_start, cr_end, cr_total; /* Content-Range, when have_cr */
	bool have_cr;
	char etag[520];
	char last_modified[136];
	unsigned retry_after_s; /* 0 when absent */
	char why[200];          /* the user-facing reason of a failure */
};

/* Takes a handle for one request (blocking); DEMAND callers go first.
 * NULL with errno ECANCELED after fetch_pool_shutdown, ENOMEM on failure. */
CURL *pool_acquire(struct fetch_pool *p, enum fetch_prio prio);
/* Gives the handle back; bad=true drops it (and its connection). */
void pool_release(struct fetch_pool *p, CURL *h, bool bad);
/*
 * Returns a new list: the header_file's headers (re-read when the file
 * changed) followed by extra (may be NULL).  Caller frees with
 * curl_slist_free_all.  NULL on ENOMEM or when both are empty.
 */
struct curl_slist *pool_headers(struct fetch_pool *p, const char *const *extra, size_t nextra);
/* Applies the pool's TLS/proxy/timeouts to h. */
void pool_setup_handle(struct fetch_pool *p, CURL *h);

/*
 * One GET of [off, off+len) into buf with conditional headers for the
 * validator.  Checks everything (status 206, exact Content-Range, total,
 * body length, validator).  Returns 0 or -errno as in fetch.h plus
 * -ENOENT / -EACCES (not retryable).  timeout_ms bounds the attempt.  rq
 * (rate cap, hold callback) may be NULL.
 */
int http_range_get(struct fetch_pool *p, CURL *h, const char *url, const char *etag,
		   const char *last_modified, uint64_t size, void *buf, size_t len, uint64_t off,
		   const struct fetch_req *rq, long timeout_ms, struct http_reply *ret);

/*
 * Maps a CURLcode to -errno and a user-facing reason.  curl's own text may
 * quote the URL or the proxy given to it: their userinfo is scrubbed.
 */
int http_curl_error(const struct fetch_pool *p, const char *url, CURLcode rc,
		    const char *errbuf, char *why, size_t why_size);

#endif
