// SPDX-License-Identifier: MIT
/*
 * A template bound to its validator: reads with retries (the only retry
 * loop of the project), file:// templates, and the probe used by `add`.
 * Callable from any thread; each read runs on its caller's thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "fetch_i.h"
#include "log.h"
#include "util.h"

#define RETRY_MIN_MS 100u
#define RETRY_MAX_MS 5000u
#define STREAM_ATTEMPTS 3

struct fetch_template {
	struct fetch_pool *pool; /* borrowed */
	char *url;               /* may hold credentials: never logged */
	char *shown;             /* url_redact(url) */
	char *etag;              /* "" when none */
	char *last_modified;     /* "" when none */
	char *path;              /* file:// templates: the local path, else NULL */
	uint64_t size;
	atomic_uint_fast64_t fetched;
	atomic_uint_fast64_t errors;
	pthread_mutex_t err_lock; /* protects: last_error; leaf */
	char last_error[200];
};

/* Decodes the path of a file:// URL (percent-escapes allowed). */
static char *file_url_path(const char *url)
{
	const char *p = url + 7;
	char *out;
	size_t o = 0;

	if (!strncasecmp(p, "localhost/", 10))
		p += 9;
	if (*p != '/')
		return NULL;
	out = malloc(strlen(p) + 1);
	if (!out)
		return NULL;
	for (; *p && *p != '?' && *p != '#'; p++) {
		if (*p == '%' && p[1] && p[2]) {
			char hex[3] = {p[1], p[2], 0};
			char *end;
			long v = strtol(hex, &end, 16);
			if (*end || v <= 0) {
				free(out);
				return NULL;
			}
			out[o++] = (char)v;
			p += 2;
		} else {
			out[o++] = *p;
		}
	}
	out[o] = '\0';
	return out;
}

static bool is_file_url(const char *url)
{
	return !strncasecmp(url, "file://", 7);
}

/* The validator of a local file: changes when it is replaced or modified. */
static void file_validator(const struct stat *st, char *buf, size_t n)
{
	snprintf(buf, n, "file:%llx-%llx-%llx.%09ld", (unsigned long long)st->st_ino,
		 (unsigned long long)st->st_size, (unsigned long long)st->st_mtim.tv_sec,
		 st->st_mtim.tv_nsec);
}

static int file_open(const char *path, struct stat *st, char *why, size_t why_size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0 || fstat(fd, st) < 0) {
		int e = errno;
		snprintf(why, why_size, "cannot open %s: %s", path, strerror(e));
		if (fd >= 0)
			close(fd);
		return -e;
	}
	if (!S_ISREG(st->st_mode) && !S_ISBLK(st->st_mode)) {
		close(fd);
		snprintf(why, why_size, "%s is not a regular file", path);
		return -EINVAL;
	}
	return fd;
}

/* Whether st no longer matches the template file recorded at add. */
static bool file_changed(const struct fetch_template *t, const struct stat *st, char *why,
			 size_t why_size)
{
	char v[128];

	file_validator(st, v, sizeof(v));
	if ((uint64_t)st->st_size == t->size && !strcmp(v, t->etag))
		return false;
	snprintf(why, why_size, "template file %s changed since the disk was added", t->path);
	return true;
}

static int file_read(struct fetch_template *t, void *buf, size_t len, uint64_t off, char *why,
		     size_t why_size)
{
	struct stat st;
	_cleanup_close_ int fd = file_open(t->path, &st, why, why_size);

	if (fd < 0)
		return fd == -ENOENT ? -ENOENT : fd;
	if (file_changed(t, &st, why, why_size))
		return -ESTALE;
	int r = full_pread(fd, buf, len, off);
	if (r < 0) {
		snprintf(why, why_size, "cannot read %s: %s", t->path, strerror(-r));
		return r;
	}
	/* A write between the check and the read may have mixed new bytes
	 * in: check again, after the read. */
	if (fstat(fd, &st) < 0) {
		r = -errno;
		snprintf(why, why_size, "cannot stat %s: %s", t->path, strerror(-r));
		return r;
	}
	return file_changed(t, &st, why, why_size) ? -ESTALE : 0;
}

struct fetch_template *fetch_template_new(struct fetch_pool *p, const char *url, const char *etag,
					  const char *last_modified, uint64_t size)
{
	struct fetch_template *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	t->pool = p;
	t->size = size;
	t->url = strdup(url);
	t->shown = url_redact(url);
	t->etag = strdup(etag ? etag : "");
	t->last_modified = strdup(last_modified ? last_modified : "");
	pthread_mutex_init(&t->err_lock, NULL);
	if (t->url && is_file_url(url)) {
		t->path = file_url_path(url);
		if (!t->path) {
			fetch_template_free(t);
			errno = EINVAL;
			return NULL;
		}
	}
	if (!t->url || !t->shown || !t->etag || !t->last_modified) {
		fetch_template_free(t);
		errno = ENOMEM;
		return NULL;
	}
	return t;
}

void fetch_template_free(struct fetch_template *t)
{
	if (!t)
		return;
	pthread_mutex_destroy(&t->err_lock);
	free(t->url);
	free(t->shown);
	free(t->etag);
	free(t->last_modified);
	free(t->path);
	free(t);
}

void fetch_template_counters(struct fetch_template *t, uint64_t *ret_fetched, uint64_t *ret_errors)
{
	*ret_fetched = atomic_load(&t->fetched);
	*ret_errors = atomic_load(&t->errors);
}

void fetch_template_last_error(struct fetch_template *t, char *buf, size_t bufsize)
{
	LOCK_GUARD(&t->err_lock);
	snprintf(buf, bufsize, "%s", t->last_error);
}

static void set_last_error(struct fetch_template *t, const char *why)
{
	LOCK_GUARD(&t->err_lock);
	snprintf(t->last_error, sizeof(t->last_error), "%s", why);
}

/* Failures that another attempt may cure. */
static bool retryable(int r)
{
	switch (r) {
	case -ETIMEDOUT:
	case -EHOSTUNREACH:
	case -EAGAIN:
	case -ECONNRESET:
	case -EPROTO:
	case -EIO:
		return true;
	default:
		return false;
	}
}

static void sleep_ms(uint64_t ms)
{
	struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000};

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

int fetch_template_read(struct fetch_template *t, void *buf, size_t len, uint64_t off,
			const struct fetch_req *rq)
{
	enum fetch_prio prio = rq->prio;
	uint64_t start = rq->since_ns ? rq->since_ns : now_ns();
	uint64_t deadline = start + (uint64_t)t->pool->opts.timeout_s * 1000000000ull;
	unsigned backoff_ms = RETRY_MIN_MS;

	bool budget = rq->until_ns && rq->until_ns < deadline; /* the caller's, not timeout= */
	if (budget)
		deadline = rq->until_ns;
	struct http_reply reply;
	int r;

	if (len == 0 || off >= t->size || len > t->size - off)
		return -EINVAL;
	for (unsigned attempt = 1;; attempt++) {
		if (t->path) {
			r = file_read(t, buf, len, off, reply.why, sizeof(reply.why));
			reply.retry_after_s = 0;
		} else {
			CURL *h = pool_acquire(t->pool, prio);
			if (!h)
				return -errno;
			uint64_t now = now_ns();
			if (prio == FETCH_PRIO_DEMAND && now >= deadline) {
				/* Past it already (the back-off's last sleep, a long
				 * wait for a connection, since_ns): nothing is sent,
				 * and 0 below would mean no limit.  After a failed
				 * attempt, its error stands. */
				pool_release(t->pool, h, false);
				if (attempt > 1)
					return r == -ETIMEDOUT ? r : -EIO;
				if (budget)
					return -ETIMEDOUT; /* no fault of the template's */
				char msg[sizeof(t->last_error)];
				snprintf(msg, sizeof(msg), "timed out: timeout of %u s passed (%s)",
					 t->pool->opts.timeout_s, t->shown);
				set_last_error(t, msg);
				return -ETIMEDOUT;
			}
			long timeout_ms = prio == FETCH_PRIO_DEMAND
						  ? (long)((deadline - now) / 1000000) + 1
						  : 0;
			if (rq->hooks.on_wire)
				rq->hooks.on_wire(rq->hooks.on_wire_opaque, 1);
			r = http_range_get(t->pool, h, t->url, t->etag, t->last_modified, t->size, buf,
					   len, off, rq, timeout_ms, &reply);
			if (rq->hooks.on_wire)
				rq->hooks.on_wire(rq->hooks.on_wire_opaque, -1);
			/* A connection that failed mid-transfer is not reused. */
			pool_release(t->pool, h, r < 0 && r != -ENOENT && r != -EACCES && r != -ESTALE &&
							r != -EAGAIN);
		}
		if (r == 0) {
			atomic_fetch_add(&t->fetched, len);
			set_last_error(t, "");
			return 0;
		}
		if (r == -EINTR)
			return r; /* preempted (rq->hooks.preempt): no error */
		atomic_fetch_add(&t->errors, 1);
		char msg[sizeof(t->last_error)];
		snprintf(msg, sizeof(msg), "%s (%s)", reply.why, t->shown);
		set_last_error(t, msg);
		log_debug(LOG_SUB_FETCH, "range %" PRIu64 "+%zu attempt %u: %s", off, len, attempt, msg);
		/* Retrying only what another attempt may cure: network and
		 * server-side trouble.  A changed template, a missing file or
		 * a refused credential stays so until someone acts. */
		if (!retryable(r))
			return r;
		if (prio == FETCH_PRIO_STREAM && attempt >= STREAM_ATTEMPTS)
			return r;
		uint64_t wait_ms = backoff_ms / 2 + (uint64_t)rand() % (backoff_ms / 2 + 1);
		if (reply.retry_after_s)
			wait_ms = MAX(wait_ms, reply.retry_after_s * 1000ull);
		backoff_ms = MIN(backoff_ms * 2, RETRY_MAX_MS);
		uint64_t now = now_ns();
		if (prio == FETCH_PRIO_DEMAND) {
			if (now >= deadline)
				return r == -ETIMEDOUT ? r : -EIO;
			wait_ms = MIN(wait_ms, (deadline - now) / 1000000 + 1);
		}
		sleep_ms(wait_ms);
	}
}

void fetch_probe_clear(struct fetch_probe_result *r)
{
	free(r->etag);
	free(r->last_modified);
	r->etag = r->last_modified = NULL;
}

int fetch_probe(struct fetch_pool *p, const char *url, struct fetch_probe_result *ret, char *why,
		size_t why_size)
{
	struct fetch_probe_result res = {0};
	char b;
	int r;

	if (is_file_url(url)) {
		struct stat st;
		char v[128];
		_cleanup_free_ char *path = file_url_path(url);
		if (!path) {
			snprintf(why, why_size, "bad file URL (want file:///absolute/path)");
			return -EINVAL;
		}
		_cleanup_close_ int fd = file_open(path, &st, why, why_size);
		if (fd < 0)
			return fd;
		if (st.st_size == 0) {
			snprintf(why, why_size, "template %s is empty", path);
			return -EINVAL;
		}
		file_validator(&st, v, sizeof(v));
		res.size = (uint64_t)st.st_size;
		res.etag = strdup(v);
		if (!res.etag)
			return -ENOMEM;
		*ret = res;
		return 0;
	}
	if (strncasecmp(url, "http://", 7) && strncasecmp(url, "https://", 8)) {
		snprintf(why, why_size, "unsupported URL scheme (use http://, https:// or file://)");
		return -EINVAL;
	}

	/* A real one-byte range request: servers that omit Accept-Ranges but
	 * honour ranges work; servers that ignore ranges are found out. */
	struct http_reply reply;
	CURL *h = pool_acquire(p, FETCH_PRIO_DEMAND);
	if (!h)
		return -errno;
	r = http_range_get(p, h, url, NULL, NULL, 0, &b, 1, 0, NULL,
			   (long)p->opts.timeout_s * 1000, &reply);
	pool_release(p, h, r < 0);
	if (r == -ESTALE && reply.have_cr && reply.cr_start == 0 && reply.cr_end == 0) {
		/* Expected: we passed size 0 because we do not know it yet. */
		r = 0;
	} else if (r == 0 || (r == -EIO && reply.status == 416)) {
		r = -EIO;
		if (reply.status == 416 && reply.have_cr && reply.cr_total == 0)
			snprintf(reply.why, sizeof(reply.why), "template is empty");
	}
	if (r < 0) {
		snprintf(why, why_size, "%s", reply.why[0] ? reply.why : strerror(-r));
		return r;
	}
	res.size = reply.cr_total;
	if (reply.etag[0] && strncmp(reply.etag, "W/", 2))
		res.etag = strdup(reply.etag);
	if (reply.last_modified[0])
		res.last_modified = strdup(reply.last_modified);
	if ((reply.etag[0] && strncmp(reply.etag, "W/", 2) && !res.etag) ||
	    (reply.last_modified[0] && !res.last_modified)) {
		fetch_probe_clear(&res);
		return -ENOMEM;
	}
	if (!res.etag && !res.last_modified) {
		_cleanup_free_ char *shown = url_redact(url);
		log_warn("template %s has no validator (no ETag or Last-Modified): "
			 "changes to it cannot be detected", shown ? shown : "?");
	}
	*ret = res;
	return 0;
}

struct doc {
	char *buf;
	size_t len, cap, max;
	bool too_big;
};

static size_t doc_write_cb(char *data, size_t size, size_t n, void *opaque)
{
	struct doc *d = opaque;
	size_t len = size * n;

	if (len > d->max - d->len) {
		d->too_big = true;
		return 0;
	}
	if (d->len + len > d->cap) {
		size_t cap = MAX(d->cap * 2, d->len + len);
		char *b = realloc(d->buf, cap);
		if (!b)
			return 0;
		d->buf = b;
		d->cap = cap;
	}
	memcpy(d->buf + d->len, data, len);
	d->len += len;
	return len;
}

int fetch_document(struct fetch_pool *p, const char *url, size_t max_bytes, char **ret_buf,
		   size_t *ret_len, char *why, size_t why_size)
{
	struct doc d = {.max = max_bytes};
	_cleanup_free_ char *shown = url_redact(url);
	int r = 0;

	if (!shown)
		return -ENOMEM;
	if (!strncasecmp(url, "http://", 7) || !strncasecmp(url, "https://", 8)) {
		char errbuf[CURL_ERROR_SIZE] = "";
		CURL *h = pool_acquire(p, FETCH_PRIO_DEMAND);
		if (!h)
			return -errno;
		struct curl_slist *hdrs = pool_headers(p, NULL, 0);
		curl_easy_setopt(h, CURLOPT_URL, url);
		curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR,
				 strncasecmp(url, "https://", 8) ? "http,https" : "https");
		curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
		curl_easy_setopt(h, CURLOPT_RANGE, NULL);
		curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
		curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, NULL);
		curl_easy_setopt(h, CURLOPT_HEADERDATA, NULL);
		curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, doc_write_cb);
		curl_easy_setopt(h, CURLOPT_WRITEDATA, &d);
		curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
		curl_easy_setopt(h, CURLOPT_TIMEOUT, (long)p->opts.timeout_s * 4);
		curl_easy_setopt(h, CURLOPT_NOPROGRESS, 1L);
		CURLcode rc = curl_easy_perform(h);
		long status = 0;
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
		curl_easy_setopt(h, CURLOPT_HTTPHEADER, NULL);
		curl_easy_setopt(h, CURLOPT_ERRORBUFFER, NULL);
		curl_easy_setopt(h, CURLOPT_WRITEDATA, NULL);
		curl_easy_setopt(h, CURLOPT_TIMEOUT, 0L);
		curl_slist_free_all(hdrs);
		pool_release(p, h, rc != CURLE_OK);
		if (d.too_big) {
			snprintf(why, why_size, "%s is larger than %zu bytes", shown, max_bytes);
			r = -EFBIG;
		} else if (rc != CURLE_OK) {
			char reason[200];
			r = http_curl_error(p, url, rc, errbuf, reason, sizeof(reason));
			snprintf(why, why_size, "cannot fetch %s: %s", shown, reason);
		} else if (status != 200) {
			snprintf(why, why_size, "cannot fetch %s: HTTP %ld", shown, status);
			r = status == 404 ? -ENOENT : -EIO;
		}
	} else {
		_cleanup_free_ char *path = is_file_url(url) ? file_url_path(url) : strdup(url);
		struct stat st;
		if (!path) {
			snprintf(why, why_size, "bad file URL %s", shown);
			return -EINVAL;
		}
		_cleanup_close_ int fd = file_open(path, &st, why, why_size);
		if (fd < 0)
			return fd;
		if ((uint64_t)st.st_size > max_bytes) {
			snprintf(why, why_size, "%s is larger than %zu bytes", path, max_bytes);
			return -EFBIG;
		}
		d.buf = malloc((size_t)st.st_size + 1);
		if (!d.buf)
			return -ENOMEM;
		d.len = (size_t)st.st_size;
		r = full_pread(fd, d.buf, d.len, 0);
		if (r < 0)
			snprintf(why, why_size, "cannot read %s: %s", path, strerror(-r));
	}
	if (r < 0) {
		free(d.buf);
		return r;
	}
	*ret_buf = d.buf ? d.buf : calloc(1, 1);
	*ret_len = d.len;
	return *ret_buf ? 0 : -ENOMEM;
}
