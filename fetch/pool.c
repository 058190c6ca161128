// SPDX-License-Identifier: MIT
/*
 * The per-mount pool of libcurl easy handles.  Each handle keeps its own
 * keep-alive connection, so at most opts.connections connections exist and
 * they are reused request after request.  A handle is used by one thread
 * at a time; DNS and TLS sessions are shared through a locked CURLSH.
 *
 * Priority: a DEMAND request takes any idle handle and is woken first; a
 * STREAM request never takes the last free handle while more than one
 * connection is configured, so a VM's read never queues behind the
 * streamer's backlog.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cleanup.h"
#include "fetch_i.h"
#include "log.h"

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;

static void curl_init_once(void)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void share_lock(CURL *h, curl_lock_data data, curl_lock_access access, void *opaque)
{
	struct fetch_pool *p = opaque;
	(void)h;
	(void)access;
	pthread_mutex_lock(&p->share_locks[data]);
}

static void share_unlock(CURL *h, curl_lock_data data, void *opaque)
{
	struct fetch_pool *p = opaque;
	(void)h;
	pthread_mutex_unlock(&p->share_locks[data]);
}

static char *dup_opt(const char *s)
{
	return s ? strdup(s) : NULL;
}

/* Reads header_file if it changed since the last read; hdr_lock held. */
static int headers_reload_locked(struct fetch_pool *p, char *why, size_t why_size)
{
	const char *path = p->opts.header_file;
	struct stat st;
	char line[8192];

	if (!path)
		return 0;
	_cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0) {
		int e = errno;
		snprintf(why, why_size, "cannot read header file %s: %s", path, strerror(e));
		return -e;
	}
	if (st.st_mode & 077) {
		snprintf(why, why_size,
			 "header file %s is readable by group or others (mode %03o); chmod 600 it",
			 path, (unsigned)(st.st_mode & 0777));
		return -EPERM;
	}
	if (p->headers && st.st_mtim.tv_sec == p->hdr_mtime.tv_sec &&
	    st.st_mtim.tv_nsec == p->hdr_mtime.tv_nsec && (uint64_t)st.st_ino == p->hdr_ino &&
	    (uint64_t)st.st_size == p->hdr_size)
		return 0;
	FILE *f = fdopen(fd, "r");
	if (!f)
		return -errno;
	fd = -1;
	struct curl_slist *list = NULL;
	int r = 0;
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\r\n")] = '\0';
		if (!line[0] || line[0] == '#')
			continue;
		char *colon = strchr(line, ':');
		if (!colon || colon == line) {
			snprintf(why, why_size, "header file %s: a line is not 'Name: value'", path);
			r = -EINVAL;
			break;
		}
		struct curl_slist *n = curl_slist_append(list, line);
		if (!n) {
			r = -ENOMEM;
			break;
		}
		list = n;
	}
	fclose(f);
	if (r < 0) {
		curl_slist_free_all(list);
		return r;
	}
	curl_slist_free_all(p->headers);
	p->headers = list;
	p->hdr_mtime = st.st_mtim;
	p->hdr_ino = (uint64_t)st.st_ino;
	p->hdr_size = (uint64_t)st.st_size;
	if (!list) /* an empty file: remember that we read it */
		p->headers = curl_slist_append(NULL, "X-Streamfs: 1");
	return 0;
}

/*
 * Reads an AWS-style credentials file: "aws_access_key_id = ..." and
 * "aws_secret_access_key = ..." lines (the [default] profile, or the only
 * keys present).  Refuses a file readable by group or others.
 */
static int aws_credentials_load(struct fetch_pool *p, const char *path, char *why,
				size_t why_size)
{
	char line[1024];
	struct stat st;

	_cleanup_fclose_ FILE *f = fopen(path, "re");
	if (!f || fstat(fileno(f), &st) < 0) {
		int e = errno;
		snprintf(why, why_size, "cannot read credentials file %s: %s", path, strerror(e));
		return -e;
	}
	if (st.st_mode & 077) {
		snprintf(why, why_size,
			 "credentials file %s is readable by group or others (mode %03o); chmod 600 it",
			 path, (unsigned)(st.st_mode & 0777));
		return -EPERM;
	}
	bool in_other_profile = false;
	while (fgets(line, sizeof(line), f)) {
		char *s = line + strspn(line, " \t");
		s[strcspn(s, "\r\n")] = '\0';
		if (*s == '[') {
			in_other_profile = strncmp(s, "[default]", 9) != 0;
			continue;
		}
		if (in_other_profile || *s == '#' || *s == ';')
			continue;
		char *eq = strchr(s, '=');
		if (!eq)
			continue;
		char *key = s, *val = eq + 1;
		for (char *e = eq; e > key && (e[-1] == ' ' || e[-1] == '\t'); e--)
			e[-1] = '\0';
		*eq = '\0';
		val += strspn(val, " \t");
		char **dst = !strcmp(key, "aws_access_key_id") ? &p->aws_key :
			     !strcmp(key, "aws_secret_access_key") ? &p->aws_secret : NULL;
		if (dst) {
			free(*dst);
			*dst = strdup(val);
			if (!*dst)
				return -ENOMEM;
		}
	}
	if (!p->aws_key || !p->aws_secret) {
		snprintf(why, why_size,
			 "credentials file %s lacks aws_access_key_id or aws_secret_access_key", path);
		return -EINVAL;
	}
	return 0;
}

int fetch_pool_new(const struct fetch_opts *opts, struct fetch_pool **ret, char *why,
		   size_t why_size)
{
	int r;

	pthread_once(&curl_once, curl_init_once);
	if (!opts || opts->connections == 0 || opts->connections > 64) {
		snprintf(why, why_size, "connections must be between 1 and 64");
		return -EINVAL;
	}
	struct fetch_pool *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->opts = *opts;
	p->opts.cafile = dup_opt(opts->cafile);
	p->opts.capath = dup_opt(opts->capath);
	p->opts.cert = dup_opt(opts->cert);
	p->opts.key = dup_opt(opts->key);
	p->opts.proxy = dup_opt(opts->proxy);
	p->opts.header_file = dup_opt(opts->header_file);
	p->opts.aws_sigv4 = dup_opt(opts->aws_sigv4);
	p->opts.aws_credentials = dup_opt(opts->aws_credentials);
	if (!p->opts.timeout_s)
		p->opts.timeout_s = FETCH_DEFAULT_TIMEOUT_S;
	if (!p->opts.stall_s)
		p->opts.stall_s = FETCH_DEFAULT_STALL_S;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->cond, NULL);
	pthread_mutex_init(&p->hdr_lock, NULL);
	for (unsigned i = 0; i < CURL_LOCK_DATA_LAST; i++)
		pthread_mutex_init(&p->share_locks[i], NULL);
	p->idle = calloc(opts->connections, sizeof(*p->idle));
	p->share = curl_share_init();
	if (!p->idle || !p->share) {
		fetch_pool_free(p);
		return -ENOMEM;
	}
	curl_share_setopt(p->share, CURLSHOPT_LOCKFUNC, share_lock);
	curl_share_setopt(p->share, CURLSHOPT_UNLOCKFUNC, share_unlock);
	curl_share_setopt(p->share, CURLSHOPT_USERDATA, p);
	curl_share_setopt(p->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
	curl_share_setopt(p->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
	if (p->opts.header_file) {
		pthread_mutex_lock(&p->hdr_lock);
		r = headers_reload_locked(p, why, why_size);
		pthread_mutex_unlock(&p->hdr_lock);
		if (r < 0) {
			fetch_pool_free(p);
			return r;
		}
	}
	if (!!p->opts.aws_sigv4 != !!p->opts.aws_credentials) {
		snprintf(why, why_size, "aws_sigv4 and aws_credentials go together");
		fetch_pool_free(p);
		return -EINVAL;
	}
	if (p->opts.aws_credentials) {
		r = aws_credentials_load(p, p->opts.aws_credentials, why, why_size);
		if (r < 0) {
			fetch_pool_free(p);
			return r;
		}
	}
	if (p->opts.insecure)
		log_warn("TLS certificate verification is off (-o insecure): "
			 "templates may be served by anyone on the path");
	*ret = p;
	return 0;
}

void fetch_pool_free(struct fetch_pool *p)
{
	if (!p)
		return;
	for (unsigned i = 0; i < p->nidle; i++)
		curl_easy_cleanup(p->idle[i]);
	if (p->share)
		curl_share_cleanup(p->share);
	curl_slist_free_all(p->headers);
	free(p->idle);
	free((char *)p->opts.cafile);
	free((char *)p->opts.capath);
	free((char *)p->opts.cert);
	free((char *)p->opts.key);
	free((char *)p->opts.proxy);
	free((char *)p->opts.header_file);
	free((char *)p->opts.aws_sigv4);
	free((char *)p->opts.aws_credentials);
	free(p->aws_key);
	if (p->aws_secret) {
		explicit_bzero(p->aws_secret, strlen(p->aws_secret));
		free(p->aws_secret);
	}
	for (unsigned i = 0; i < CURL_LOCK_DATA_LAST; i++)
		pthread_mutex_destroy(&p->share_locks[i]);
	pthread_mutex_destroy(&p->hdr_lock);
	pthread_cond_destroy(&p->cond);
	pthread_mutex_destroy(&p->lock);
	free(p);
}

void pool_setup_handle(struct fetch_pool *p, CURL *h)
{
	const struct fetch_opts *o = &p->opts;

	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_SHARE, p->share);
	curl_easy_setopt(h, CURLOPT_USERAGENT, "streamfs/" STREAMFS_VERSION);
	/* Redirects are followed only when no header file or SigV4 key could
	 * travel with them (curl strips just Authorization and cookies on a
	 * cross-host redirect), and never from https down to http. */
	curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, o->header_file || o->aws_sigv4 ? 0L : 1L);
	curl_easy_setopt(h, CURLOPT_MAXREDIRS, 5L);
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 10L);
	curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
	/* Below the daemon's M_MMAP_THRESHOLD (256 KiB, fs/main.c): curl
	 * allocates this buffer for every transfer, and an mmapped one cost
	 * a page fault and a zeroed page per 4 KiB of it each time (about a
	 * fifth of a cold 1 MiB read's latency on loopback). */
	curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 240L * 1024);
	if (o->cafile)
		curl_easy_setopt(h, CURLOPT_CAINFO, o->cafile);
	if (o->capath)
		curl_easy_setopt(h, CURLOPT_CAPATH, o->capath);
	if (o->cert)
		curl_easy_setopt(h, CURLOPT_SSLCERT, o->cert);
	if (o->key)
		curl_easy_setopt(h, CURLOPT_SSLKEY, o->key);
	if (o->proxy)
		curl_easy_setopt(h, CURLOPT_PROXY, o->proxy);
	if (o->aws_sigv4 && p->aws_key && p->aws_secret) {
		curl_easy_setopt(h, CURLOPT_AWS_SIGV4, o->aws_sigv4);
		curl_easy_setopt(h, CURLOPT_USERNAME, p->aws_key);
		curl_easy_setopt(h, CURLOPT_PASSWORD, p->aws_secret);
	}
	if (o->insecure) {
		curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 0L);
		curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 0L);
	}
}

CURL *pool_acquire(struct fetch_pool *p, enum fetch_prio prio)
{
	unsigned conns = p->opts.connections;
	unsigned reserve = conns > 1 ? 1 : 0;
	CURL *h = NULL;

	pthread_mutex_lock(&p->lock);
	if (prio == FETCH_PRIO_DEMAND) {
		p->demand_waiting++;
		while (p->nidle == 0 && p->total >= conns && !atomic_load(&p->shutdown))
			pthread_cond_wait(&p->cond, &p->lock);
		p->demand_waiting--;
	} else {
		while ((p->demand_waiting || p->nidle + (conns - p->total) <= reserve) &&
		       !atomic_load(&p->shutdown))
			pthread_cond_wait(&p->cond, &p->lock);
	}
	if (atomic_load(&p->shutdown)) {
		pthread_mutex_unlock(&p->lock);
		errno = ECANCELED;
		return NULL;
	}
	if (p->nidle) {
		h = p->idle[--p->nidle];
	} else {
		p->total++;
		pthread_mutex_unlock(&p->lock);
		h = curl_easy_init();
		if (h) {
			pool_setup_handle(p, h);
			return h;
		}
		pthread_mutex_lock(&p->lock);
		p->total--;
		pthread_cond_broadcast(&p->cond);
		errno = ENOMEM;
	}
	pthread_mutex_unlock(&p->lock);
	return h;
}

void fetch_pool_shutdown(struct fetch_pool *p)
{
	if (!p)
		return;
	atomic_store(&p->shutdown, true);
	pthread_mutex_lock(&p->lock);
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->lock);
}

void pool_release(struct fetch_pool *p, CURL *h, bool bad)
{
	if (!h)
		return;
	pthread_mutex_lock(&p->lock);
	if (bad) {
		curl_easy_cleanup(h);
		p->total--;
	} else {
		p->idle[p->nidle++] = h;
	}
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->lock);
}

struct curl_slist *pool_headers(struct fetch_pool *p, const char *const *extra, size_t nextra)
{
	struct curl_slist *list = NULL;
	char why[256];

	pthread_mutex_lock(&p->hdr_lock);
	if (p->opts.header_file) {
		int r = headers_reload_locked(p, why, sizeof(why));
		if (r < 0)
			log_warn("%s; keeping the headers read before", why);
	}
	for (struct curl_slist *s = p->headers; s; s = s->next) {
		if (!strcmp(s->data, "X-Streamfs: 1"))
			continue;
		struct curl_slist *n = curl_slist_append(list, s->data);
		if (!n) {
			curl_slist_free_all(list);
			pthread_mutex_unlock(&p->hdr_lock);
			return NULL;
		}
		list = n;
	}
	pthread_mutex_unlock(&p->hdr_lock);
	for (size_t i = 0; i < nextra; i++) {
		struct curl_slist *n = curl_slist_append(list, extra[i]);
		if (!n) {
			curl_slist_free_all(list);
			return NULL;
		}
		list = n;
	}
	return list;
}
