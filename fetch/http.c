// SPDX-License-Identifier: MIT
/*
 * One HTTP range request on a handle the caller holds, with every check a
 * response must pass before its bytes are trusted, and the single place
 * where libcurl and HTTP results become -errno.  Runs on the calling
 * thread; touches no shared state except through the pool.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/cleanup.h"
#include "fetch_i.h"
#include "log.h"
#include "util.h"

/* An error body is read (and dropped) up to this size, so the connection
 * can be kept; anything longer aborts the transfer. */
#define ERROR_BODY_MAX (64u * 1024)

struct xfer {
	CURL *h;
	char *buf;        /* borrowed destination */
	size_t len;       /* bytes wanted */
	size_t got;       /* bytes stored */
	size_t dropped;   /* bytes of an error body dropped */
	bool overflow;    /* the body was longer than asked */
	bool not_partial; /* the status was not 206 */
	bool stalled;     /* aborted: no byte for stall_s */
	bool preempted;   /* aborted: rq->hooks.preempt said so */
	struct fetch_pool *pool;
	uint64_t last_ns;  /* when the received count last grew (or the start) */
	curl_off_t last_now;
	struct http_reply *reply;
	const struct fetch_req *rq; /* may be NULL */
	/* For rq->hooks.progress: what the reply must say, and whether it did. */
	uint64_t off, size;
	const char *etag, *last_modified;
	int headers;                /* 0 = not checked yet, 1 = right, -1 = wrong */
};

/*
 * Called by curl about once a second and on progress.  Aborts a transfer
 * that received nothing for stall_s seconds (curl's LOW_SPEED options
 * average over a window and notice a stall only seconds later), one its
 * preempt hook ends, and every transfer once the pool shuts down.
 */
static int xfer_progress_cb(void *opaque, curl_off_t dltotal, curl_off_t dlnow,
			    curl_off_t ultotal, curl_off_t ulnow)
{
	struct xfer *x = opaque;
	uint64_t now = now_ns();

	(void)dltotal, (void)ultotal, (void)ulnow;
	if (atomic_load(&x->pool->shutdown))
		return 1;
	if (x->rq && x->rq->hooks.preempt && x->rq->hooks.preempt(x->rq->hooks.preempt_opaque)) {
		x->preempted = true;
		return 1;
	}
	if (dlnow != x->last_now) {
		x->last_now = dlnow;
		x->last_ns = now;
	} else if (now - x->last_ns > (uint64_t)x->pool->opts.stall_s * 1000000000ull) {
		x->stalled = true;
		return 1;
	}
	return 0;
}

static void copy_value(char *dst, size_t n, const char *v, size_t vlen)
{
	while (vlen && (*v == ' ' || *v == '\t')) {
		v++;
		vlen--;
	}
	while (vlen && (v[vlen - 1] == '\r' || v[vlen - 1] == '\n' || v[vlen - 1] == ' '))
		vlen--;
	if (vlen >= n)
		vlen = n - 1;
	memcpy(dst, v, vlen);
	dst[vlen] = '\0';
}

static size_t header_cb(char *data, size_t size, size_t n, void *opaque)
{
	struct xfer *x = opaque;
	struct http_reply *r = x->reply;
	size_t len = size * n;
	char val[160];

	if (len >= 5 && !strncmp(data, "HTTP/", 5)) {
		/* A new response (after a redirect or 100): forget the last. */
		r->have_cr = false;
		r->etag[0] = r->last_modified[0] = '\0';
		r->retry_after_s = 0;
		return len;
	}
	const char *colon = memchr(data, ':', len);
	if (!colon)
		return len;
	size_t nlen = (size_t)(colon - data);
	const char *v = colon + 1;
	size_t vlen = len - nlen - 1;

	if (nlen == 13 && !strncasecmp(data, "Content-Range", 13)) {
		copy_value(val, sizeof(val), v, vlen);
		r->have_cr = content_range_parse(val, &r->cr_start, &r->cr_end, &r->cr_total) == 0;
	} else if (nlen == 4 && !strncasecmp(data, "ETag", 4)) {
		copy_value(r->etag, sizeof(r->etag), v, vlen);
	} else if (nlen == 13 && !strncasecmp(data, "Last-Modified", 13)) {
		copy_value(r->last_modified, sizeof(r->last_modified), v, vlen);
	} else if (nlen == 11 && !strncasecmp(data, "Retry-After", 11)) {
		uint64_t s;
		copy_value(val, sizeof(val), v, vlen);
		/* Only the delay-seconds form; an HTTP-date falls back to our own back-off. */
		if (parse_u64(val, &s) == 0)
			r->retry_after_s = (unsigned)MIN(s, 3600u);
	}
	return len;
}

/* -ESTALE with why filled if the reply's validator is not the one recorded. */
static int check_validator(const struct http_reply *r, const char *etag,
			   const char *last_modified, char *why, size_t why_size)
{
	if (etag && *etag && r->etag[0] && strcmp(etag, r->etag)) {
		snprintf(why, why_size, "template changed (ETag %.200s, expected %.200s)", r->etag,
			 etag);
		return -ESTALE;
	}
	if ((!etag || !*etag) && last_modified && *last_modified && r->last_modified[0] &&
	    strcmp(last_modified, r->last_modified)) {
		snprintf(why, why_size, "template changed (Last-Modified %s, expected %s)",
			 r->last_modified, last_modified);
		return -ESTALE;
	}
	return 0;
}

/*
 * Checks what a 206 reply's headers say against the request: exactly the
 * range asked for, of a template of the expected size and validator.
 * Returns 0, or -EPROTO / -ESTALE with why filled.
 */
static int check_headers(const struct http_reply *r, uint64_t off, size_t len, uint64_t size,
			 const char *etag, const char *last_modified, char *why, size_t why_size)
{
	if (!r->have_cr || r->cr_start != off || r->cr_end != off + len - 1) {
		snprintf(why, why_size,
			 "wrong Content-Range in reply to range %" PRIu64 "-%" PRIu64, off,
			 off + len - 1);
		return -EPROTO;
	}
	if (r->cr_total != size) {
		snprintf(why, why_size, "template size changed from %" PRIu64 " to %" PRIu64, size,
			 r->cr_total);
		return -ESTALE;
	}
	return check_validator(r, etag, last_modified, why, why_size);
}

static size_t write_cb(char *data, size_t size, size_t n, void *opaque)
{
	struct xfer *x = opaque;
	size_t len = size * n;
	long status = 0;

	curl_easy_getinfo(x->h, CURLINFO_RESPONSE_CODE, &status);
	if (status != 206) {
		/* Never store a body that is not the range we asked for. */
		x->not_partial = true;
		x->dropped += len;
		return x->dropped > ERROR_BODY_MAX || status == 200 ? 0 : len;
	}
	if (len > x->len - x->got) {
		x->overflow = true;
		return 0;
	}
	if (x->rq && x->rq->hooks.hold)
		x->rq->hooks.hold(x->rq->hooks.hold_opaque);
	memcpy(x->buf + x->got, data, len);
	x->got += len;
	if (x->rq && x->rq->hooks.progress) {
		/* The headers are all in once the body starts. */
		if (!x->headers) {
			char why[256];
			x->headers = check_headers(x->reply, x->off, x->len, x->size, x->etag,
						   x->last_modified, why, sizeof(why)) ? -1 : 1;
		}
		if (x->headers > 0)
			x->rq->hooks.progress(x->rq->hooks.progress_opaque, x->got);
	}
	return len;
}

int http_curl_error(const struct fetch_pool *p, const char *url, CURLcode rc,
		    const char *errbuf, char *why, size_t why_size)
{
	const char *detail = errbuf && errbuf[0] ? errbuf : curl_easy_strerror(rc);

	snprintf(why, why_size, "%s", detail);
	url_scrub(why, why_size, url);
	url_scrub(why, why_size, p->opts.proxy);
	switch (rc) {
	case CURLE_OPERATION_TIMEDOUT:
		return -ETIMEDOUT;
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_RESOLVE_PROXY:
	case CURLE_COULDNT_CONNECT:
		return -EHOSTUNREACH;
	case CURLE_PEER_FAILED_VERIFICATION:
	case CURLE_SSL_CACERT_BADFILE:
	case CURLE_SSL_CERTPROBLEM:
	case CURLE_SSL_CIPHER:
	case CURLE_SSL_ISSUER_ERROR:
		snprintf(why, why_size, "TLS verification failed: %s", detail);
		return -EACCES;
	case CURLE_ABORTED_BY_CALLBACK:
		snprintf(why, why_size, "cancelled: unmounting");
		return -ECANCELED;
	case CURLE_UNSUPPORTED_PROTOCOL:
	case CURLE_URL_MALFORMAT:
		return -EINVAL;
	case CURLE_SEND_ERROR:
	case CURLE_RECV_ERROR:
	case CURLE_GOT_NOTHING:
	case CURLE_PARTIAL_FILE:
	case CURLE_SSL_CONNECT_ERROR:
		return -ECONNRESET;
	default:
		return -EIO;
	}
}

/* Maps a non-206 status to -errno and a reason. */
static int http_status_error(long status, const struct http_reply *r, uint64_t size,
			     const char *etag, const char *last_modified, char *why,
			     size_t why_size)
{
	snprintf(why, why_size, "HTTP %ld", status);
	switch (status) {
	case 200:
		/* A whole new template (a cache that ignores If-Match) is a
		 * change, not a server that cannot do ranges. */
		if (check_validator(r, etag, last_modified, why, why_size) < 0)
			return -ESTALE;
		snprintf(why, why_size, "server ignored the range request (HTTP 200)");
		return -EPROTO;
	case 301:
	case 302:
	case 303:
	case 307:
	case 308:
		snprintf(why, why_size,
			 "template redirects elsewhere (HTTP %ld); redirects are not followed with "
			 "header_file or aws_sigv4: use the final URL", status);
		return -EACCES;
	case 400:
		snprintf(why, why_size, "HTTP 400 bad request (a TLS client certificate may be required)");
		return -EIO;
	case 401:
	case 403:
		snprintf(why, why_size, "access denied (HTTP %ld)", status);
		return -EACCES;
	case 404:
	case 410:
		snprintf(why, why_size, "template not found (HTTP %ld)", status);
		return -ENOENT;
	case 412:
		snprintf(why, why_size, "template changed (HTTP 412 precondition failed)");
		return -ESTALE;
	case 416:
		if (r->have_cr && r->cr_total != size) {
			snprintf(why, why_size, "template size changed from %" PRIu64 " to %" PRIu64,
				 size, r->cr_total);
			return -ESTALE;
		}
		return -EIO;
	case 429:
		return -EAGAIN;
	default:
		return status >= 500 && status < 600 ? -EAGAIN : -EIO;
	}
}

int http_range_get(struct fetch_pool *p, CURL *h, const char *url, const char *etag,
		   const char *last_modified, uint64_t size, void *buf, size_t len, uint64_t off,
		   const struct fetch_req *rq, long timeout_ms, struct http_reply *ret)
{
	char range[64], cond[600];
	char errbuf[CURL_ERROR_SIZE] = "";
	const char *extra[1];
	size_t nextra = 0;
	struct xfer x = {.h = h, .buf = buf, .len = len, .reply = ret, .pool = p,
			 .last_ns = now_ns(), .rq = rq, .off = off, .size = size, .etag = etag,
			 .last_modified = last_modified};
	int r;

	memset(ret, 0, sizeof(*ret));
	r = range_header_build(range, sizeof(range), off, len);
	if (r < 0)
		return r;
	/* The validator travels with every request: a changed template is
	 * refused by the server itself, and checked again below. */
	if (etag && *etag) {
		snprintf(cond, sizeof(cond), "If-Match: %s", etag);
		extra[nextra++] = cond;
	} else if (last_modified && *last_modified) {
		snprintf(cond, sizeof(cond), "If-Unmodified-Since: %s", last_modified);
		extra[nextra++] = cond;
	}
	struct curl_slist *hdrs = pool_headers(p, extra, nextra);
	if (!hdrs && nextra)
		return -ENOMEM;

	curl_easy_setopt(h, CURLOPT_URL, url);
	curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR,
			 strncasecmp(url, "https://", 8) ? "http,https" : "https");
	curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
	curl_easy_setopt(h, CURLOPT_RANGE, range + 6); /* without "bytes=" */
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
	curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(h, CURLOPT_HEADERDATA, &x);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, &x);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms > 0 ? timeout_ms : 0L);
	curl_easy_setopt(h, CURLOPT_MAX_RECV_SPEED_LARGE, (curl_off_t)(rq ? rq->max_rate : 0));
	curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, xfer_progress_cb);
	curl_easy_setopt(h, CURLOPT_XFERINFODATA, &x);
	curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
	CURLcode rc = curl_easy_perform(h);
	curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &ret->status);
	/* The handle outlives this frame: leave no pointer into it. */
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
	curl_easy_setopt(h, CURLOPT_NOPROGRESS, 1L);
	curl_easy_setopt(h, CURLOPT_XFERINFODATA, NULL);
	curl_easy_setopt(h, CURLOPT_HEADERDATA, NULL);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, NULL);
	curl_slist_free_all(hdrs);

	if (x.preempted) {
		snprintf(ret->why, sizeof(ret->why), "preempted by a demand read");
		return -EINTR;
	}
	if (ret->status && ret->status != 206)
		return http_status_error(ret->status, ret, size, etag, last_modified, ret->why,
					 sizeof(ret->why));
	if (x.overflow) {
		snprintf(ret->why, sizeof(ret->why), "response body longer than the range asked for");
		return -EPROTO;
	}
	if (x.stalled) {
		snprintf(ret->why, sizeof(ret->why), "transfer stalled: no data for %u s",
			 p->opts.stall_s);
		return -ETIMEDOUT;
	}
	if (rc != CURLE_OK)
		return http_curl_error(p, url, rc, errbuf, ret->why, sizeof(ret->why));
	r = check_headers(ret, off, len, size, etag, last_modified, ret->why, sizeof(ret->why));
	if (r < 0)
		return r;
	if (x.got != len) {
		snprintf(ret->why, sizeof(ret->why), "short body: %zu of %zu bytes", x.got, len);
		return -EPROTO;
	}
	return 0;
}
