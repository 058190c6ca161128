// SPDX-License-Identifier: MIT
/*
 * HTTP byte-range strings: building the Range request header and parsing
 * the Content-Range response header (RFC 9110, 14.2 and 14.4).  Pure
 * functions, any thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>

#include "util.h"

int range_header_build(char *buf, size_t bufsize, uint64_t off, uint64_t len)
{
	int n;

	if (len == 0 || off > UINT64_MAX - len)
		return -EINVAL;
	n = snprintf(buf, bufsize, "bytes=%" PRIu64 "-%" PRIu64, off, off + len - 1);
	if (n < 0 || (size_t)n >= bufsize)
		return -ENOSPC;
	return 0;
}

/* Parses digits at *p into *v, advancing *p; -EINVAL if none or overflow. */
static int parse_num(const char **p, uint64_t *v)
{
	uint64_t x = 0;
	const char *s = *p;

	if (*s < '0' || *s > '9')
		return -EINVAL;
	while (*s >= '0' && *s <= '9') {
		unsigned d = (unsigned)(*s - '0');
		if (x > (UINT64_MAX - d) / 10)
			return -EINVAL;
		x = x * 10 + d;
		s++;
	}
	*p = s;
	*v = x;
	return 0;
}

int content_range_parse(const char *value, uint64_t *ret_start, uint64_t *ret_end,
			uint64_t *ret_total)
{
	const char *p = value;
	uint64_t start, end, total;
	bool unsatisfied = false;

	if (!p)
		return -EINVAL;
	while (*p == ' ' || *p == '\t')
		p++;
	if (strncasecmp(p, "bytes", 5))
		return -EINVAL;
	p += 5;
	if (*p != ' ' && *p != '\t')
		return -EINVAL;
	while (*p == ' ' || *p == '\t')
		p++;
	if (*p == '*') {
		start = end = UINT64_MAX;
		unsatisfied = true;
		p++;
	} else {
		if (parse_num(&p, &start) < 0 || *p++ != '-' || parse_num(&p, &end) < 0)
			return -EINVAL;
		if (end < start)
			return -EINVAL;
	}
	if (*p++ != '/')
		return -EINVAL;
	if (parse_num(&p, &total) < 0)
		return -EINVAL;
	while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
		p++;
	if (*p)
		return -EINVAL;
	if (!unsatisfied && end >= total)
		return -EINVAL;
	*ret_start = start;
	*ret_end = end;
	*ret_total = total;
	return 0;
}
