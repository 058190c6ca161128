// SPDX-License-Identifier: MIT
/*
 * Parsing and formatting helpers: sizes, numbers, disk names, URL
 * redaction, clocks and full-length I/O.  Pure functions, any thread.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

int parse_u64(const char *s, uint64_t *ret)
{
	uint64_t v = 0;

	if (!s || !*s)
		return -EINVAL;
	for (const char *p = s; *p; p++) {
		if (*p < '0' || *p > '9')
			return -EINVAL;
		unsigned d = (unsigned)(*p - '0');
		if (v > (UINT64_MAX - d) / 10)
			return -ERANGE;
		v = v * 10 + d;
	}
	*ret = v;
	return 0;
}

int parse_rate(const char *s, uint64_t *ret)
{
	uint64_t v;
	int r = parse_size(s, &v);

	if (r < 0)
		return r;
	if (v > RATE_MAX)
		return -ERANGE;
	*ret = v;
	return 0;
}

int parse_size(const char *s, uint64_t *ret)
{
	char digits[32];
	size_t n = 0;
	unsigned shift = 0;
	uint64_t v;
	int r;

	if (!s)
		return -EINVAL;
	/* Leading zeros carry no value; keep one digit if all are zero. */
	while (s[0] == '0' && s[1] >= '0' && s[1] <= '9')
		s++;
	while (s[n] >= '0' && s[n] <= '9')
		n++;
	if (n == 0 || n >= sizeof(digits))
		return n == 0 ? -EINVAL : -ERANGE;
	memcpy(digits, s, n);
	digits[n] = '\0';
	const char *suf = s + n;
	switch (*suf) {
	case '\0':
		break;
	case 'k': case 'K': shift = 10; suf++; break;
	case 'm': case 'M': shift = 20; suf++; break;
	case 'g': case 'G': shift = 30; suf++; break;
	case 't': case 'T': shift = 40; suf++; break;
	case 'b': case 'B': break;
	default:
		return -EINVAL;
	}
	if (*suf && strcmp(suf, "B") && strcmp(suf, "b") &&
	    (shift == 0 || strcmp(suf, "iB")))
		return -EINVAL;
	r = parse_u64(digits, &v);
	if (r < 0)
		return r;
	if (shift && v > (UINT64_MAX >> shift))
		return -ERANGE;
	*ret = v << shift;
	return 0;
}

bool disk_name_valid(const char *name)
{
	size_t n;

	if (!name || !*name || name[0] == '.')
		return false;
	n = strlen(name);
	if (n > DISK_NAME_MAX)
		return false;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)name[i];
		/* ASCII only, whatever the locale (streamfsctl sets one). */
		bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
		if (!alnum && c != '.' && c != '_' && c != '-')
			return false;
	}
	return true;
}

/*
 * Where the authority of url (which starts at auth) ends its userinfo: the
 * '@' to skip, or NULL when it has none.  The authority ends at the first
 * '/', so the last '@' before it ends the userinfo and an unencoded '?',
 * '#' or '@' in a password lets none of it through.  An unencoded '/' in
 * a password ends the authority early, at "user:pa", whose port is then
 * no number: such a URL counts as userinfo up to the last '@' before the
 * query, so no part of the password shows.  (An '@' in the path of a
 * plain "host[:port]/..." is not userinfo.)
 */
static const char *userinfo_at(const char *auth)
{
	const char *auth_end = auth + strcspn(auth, "/");
	const char *at = NULL, *colon;

	for (const char *p = auth; p < auth_end; p++)
		if (*p == '@')
			at = p;
	if (at)
		return at;
	colon = auth;
	if (*colon == '[') /* an IPv6 literal's colons are not a port's */
		colon += strcspn(colon, "]/");
	colon += strcspn(colon, ":/");
	if (colon >= auth_end || *colon != ':')
		return NULL;
	for (const char *p = colon + 1; p < auth_end; p++) {
		if (!isdigit((unsigned char)*p)) {
			const char *q = auth + strcspn(auth, "?#");

			for (p = auth_end; p < q; p++)
				if (*p == '@')
					at = p;
			return at;
		}
	}
	return NULL;
}

void disk_name_quote(char *buf, size_t size, const char *name)
{
	if (strstr(name, "://") || strchr(name, '@'))
		snprintf(buf, size, "(a URL? not shown; the name comes before the URL)");
	else
		snprintf(buf, size, "'%.64s%s'", name, strlen(name) > 64 ? "..." : "");
}

char *url_redact(const char *url)
{
	const char *scheme_end, *auth, *at, *host, *cut;
	size_t len, prefix, keep;
	char *out;

	if (!url) {
		errno = EINVAL;
		return NULL;
	}
	scheme_end = strstr(url, "://");
	auth = scheme_end ? scheme_end + 3 : url;
	at = userinfo_at(auth);
	host = at ? at + 1 : auth;
	cut = host + strcspn(host, "?#");
	len = strlen(url) + sizeof("?<redacted>");
	out = malloc(len);
	if (!out)
		return NULL;
	prefix = (size_t)(auth - url);
	keep = (size_t)(cut - host);
	memcpy(out, url, prefix);
	memcpy(out + prefix, host, keep);
	out[prefix + keep] = '\0';
	/* A query may carry a signature or token; a fragment never reaches
	 * the server and is dropped. */
	if (*cut == '?')
		memcpy(out + prefix + keep, "?<redacted>", sizeof("?<redacted>"));
	return out;
}

/*
 * Replaces each copy of [s, s + n) in msg with "<redacted>", within size
 * bytes; what no longer fits is cut from the end.
 */
static void redact_span(char *msg, size_t size, const char *s, size_t n)
{
	static const char mark[] = "<redacted>";
	const size_t m = sizeof(mark) - 1;
	char *from = msg, *hit;

	while ((hit = memmem(from, strlen(from), s, n))) {
		size_t at = (size_t)(hit - msg);
		size_t tail = strlen(hit + n);

		if (at + m >= size) { /* not even the mark fits */
			*hit = '\0';
			return;
		}
		if (at + m + tail >= size)
			tail = size - 1 - at - m;
		memmove(hit + m, hit + n, tail);
		memcpy(hit, mark, m);
		hit[m + tail] = '\0';
		from = hit + m; /* the mark itself may hold a piece */
	}
}

void url_scrub(char *msg, size_t size, const char *url)
{
	const char *scheme_end, *auth, *at;

	if (!msg || !size || !url)
		return;
	scheme_end = strstr(url, "://");
	auth = scheme_end ? scheme_end + 3 : url;
	at = userinfo_at(auth);
	if (!at || at == auth)
		return;
	redact_span(msg, size, auth, (size_t)(at - auth));
	/* Pieces of it too, such as a password quoted on its own. */
	for (const char *p = auth; p < at;) {
		size_t n = strcspn(p, ":/@");

		if (p + n > at)
			n = (size_t)(at - p);
		if (n >= 3)
			redact_span(msg, size, p, n);
		p += n + 1;
	}
}

const char *format_bytes(char *buf, size_t bufsize, double bytes)
{
	static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
	unsigned u = 0;

	while (bytes >= 1024.0 && u + 1 < sizeof(units) / sizeof(units[0])) {
		bytes /= 1024.0;
		u++;
	}
	if (u == 0)
		snprintf(buf, bufsize, "%.0f %s", bytes, units[u]);
	else
		snprintf(buf, bufsize, "%.1f %s", bytes, units[u]);
	return buf;
}

int full_pread(int fd, void *buf, size_t len, uint64_t off)
{
	char *p = buf;

	while (len > 0) {
		ssize_t n = pread(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

int full_pwrite(int fd, const void *buf, size_t len, uint64_t off)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

int full_pwrite_zeros(int fd, uint64_t len, uint64_t off)
{
	static const char zeros[65536];
	int r = 0;

	for (uint64_t done = 0; r >= 0 && done < len; done += sizeof(zeros)) {
		uint64_t n = len - done < sizeof(zeros) ? len - done : sizeof(zeros);
		r = full_pwrite(fd, zeros, (size_t)n, off + done);
	}
	return r;
}

bool buf_is_zero(const void *p, size_t len)
{
	const unsigned char *b = p;

	/* Check the head byte by byte, then compare the buffer with itself
	 * shifted by 16 bytes: equal and head zero means all zero. */
	if (len < 16) {
		for (size_t i = 0; i < len; i++)
			if (b[i])
				return false;
		return true;
	}
	for (size_t i = 0; i < 16; i++)
		if (b[i])
			return false;
	return memcmp(b, b + 16, len - 16) == 0;
}

void cond_init_monotonic(pthread_cond_t *c)
{
	pthread_condattr_t ca;

	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(c, &ca);
	pthread_condattr_destroy(&ca);
}

void cond_wait_until(pthread_cond_t *c, pthread_mutex_t *lock, uint64_t at_ns)
{
	struct timespec ts = {.tv_sec = (time_t)(at_ns / 1000000000ull),
			      .tv_nsec = (long)(at_ns % 1000000000ull)};

	pthread_cond_timedwait(c, lock, &ts);
}

uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
