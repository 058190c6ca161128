/* SPDX-License-Identifier: MIT */
/*
 * Reaching templates: HTTP(S) range GETs through a pool of libcurl easy
 * handles (kept alive and reused), and file:// templates read with pread.
 * Every response is checked (status 206, exact Content-Range, body length,
 * validator) before a byte is handed back; failures are retried here and
 * only here, with jittered exponential back-off.
 *
 * Threading: fetch_pool_* and fetch_template_* may be called from any
 * thread.  A caller blocks only itself: each request runs on the calling
 * thread with an easy handle it holds exclusively for the request.  No
 * fetch lock is held during network I/O.
 *
 * fetch/ never sees the cache or FUSE; fs/ adapts a fetch_template to the
 * cache's struct cache_source.
 */
#ifndef STREAMFS_FETCH_H
#define STREAMFS_FETCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xfer.h"

/* Per-mount network settings. Strings are copied by fetch_pool_new(). */
struct fetch_opts {
	unsigned connections;   /* parallel connections, >= 1 */
	unsigned timeout_s;     /* how long a demand read retries before failing */
	unsigned stall_s;       /* a transfer with no bytes for this long fails */
	const char *cafile;     /* NULL = system default */
	const char *capath;
	const char *cert;       /* client certificate */
	const char *key;        /* client key */
	const char *proxy;
	const char *header_file; /* extra headers, "Name: value" per line */
	const char *aws_sigv4;  /* "aws:amz:REGION:s3": sign requests with SigV4 */
	const char *aws_credentials; /* file with aws_access_key_id / aws_secret_access_key */
	bool insecure;          /* skip TLS verification */
};

#define FETCH_DEFAULT_CONNECTIONS 6
#define FETCH_DEFAULT_TIMEOUT_S 30
#define FETCH_DEFAULT_STALL_S 10

struct fetch_pool;

/*
 * Creates a pool.  Needs no network.  Fails with -EINVAL for bad options
 * and -EPERM when header_file or aws_credentials is group- or
 * world-readable (ret_why tells).
 * Caller owns the pool; free with fetch_pool_free() after every template
 * made from it.
 */
int fetch_pool_new(const struct fetch_opts *opts, struct fetch_pool **ret, char *ret_why,
		   size_t why_size) __attribute__((warn_unused_result));
void fetch_pool_free(struct fetch_pool *p);

/*
 * Makes every request in progress or to come fail at once with
 * -ECANCELED, so that unmount does not wait for a slow or stalled server.
 * Any thread; irreversible.
 */
void fetch_pool_shutdown(struct fetch_pool *p);

/* What a probe learns about a template. Strings owned; free with fetch_probe_clear. */
struct fetch_probe_result {
	uint64_t size;
	char *etag;          /* NULL when the server sent none */
	char *last_modified; /* NULL when the server sent none */
};
void fetch_probe_clear(struct fetch_probe_result *r);

/*
 * Learns size and validator of url with a real range request and checks
 * that the server honours ranges.  On failure returns -errno and writes
 * one line for the user to ret_why (credential-free): e.g. "HTTP 404 Not
 * Found", "server ignores range requests", "connection refused".
 */
int fetch_probe(struct fetch_pool *p, const char *url, struct fetch_probe_result *ret,
		char *ret_why, size_t why_size) __attribute__((warn_unused_result));

/*
 * Downloads a whole small document (a manifest): an http(s):// or file://
 * URL, or a plain local path.  At most max_bytes.  Returns 0 and a buffer
 * the caller frees, or -errno with a credential-free reason in why.
 */
int fetch_document(struct fetch_pool *p, const char *url, size_t max_bytes, char **ret_buf,
		   size_t *ret_len, char *why, size_t why_size) __attribute__((warn_unused_result));

struct fetch_template;

enum fetch_prio {
	FETCH_PRIO_DEMAND, /* someone waits: retried until the timeout, served first */
	FETCH_PRIO_STREAM, /* background: a few tries, never takes the last connection */
};

/*
 * A template bound to its recorded validator.  Needs no network.  Strings
 * are copied.  Caller owns it; free with fetch_template_free().
 */
struct fetch_template *fetch_template_new(struct fetch_pool *p, const char *url, const char *etag,
					  const char *last_modified, uint64_t size);
void fetch_template_free(struct fetch_template *t);

/* How one range read goes out. */
struct fetch_req {
	enum fetch_prio prio;
	uint64_t max_rate; /* bytes/s cap for this transfer, 0 = none */
	uint64_t since_ns; /* DEMAND: the timeout counts from this now_ns()
			    * time; 0: from the call */
	uint64_t until_ns; /* DEMAND: an earlier end than the timeout's, or 0 */
	struct xfer_hooks hooks;
};

/*
 * Reads exactly len bytes at off.  DEMAND requests retry until the pool's
 * timeout has passed (counted from rq->since_ns if set); STREAM requests
 * try a few times and return, leaving back-off to the streamer.  Returns 0
 * or -ESTALE (template changed), -ETIMEDOUT, -EHOSTUNREACH, -EAGAIN, -EIO,
 * or -EINTR when rq->hooks.preempt ended the transfer.
 * buf is borrowed for the call.
 */
int fetch_template_read(struct fetch_template *t, void *buf, size_t len, uint64_t off,
			const struct fetch_req *rq) __attribute__((warn_unused_result));

/* Bytes received and network errors seen (each failed attempt counts). */
void fetch_template_counters(struct fetch_template *t, uint64_t *ret_fetched,
			     uint64_t *ret_errors);

/* Copies the last error text (credential-free) into buf; "" when none. */
void fetch_template_last_error(struct fetch_template *t, char *buf, size_t bufsize);

#endif
