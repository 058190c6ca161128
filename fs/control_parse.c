// SPDX-License-Identifier: MIT
/*
 * Control-command parser; see fs/control_parse.h.  Pure function, any
 * thread, fuzzed by tests/fuzz/fuzz-control.c.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "common/cleanup.h"
#include "control_parse.h"
#include "cache.h"

#define MAX_TOKENS 8

static const struct {
	const char *word;
	enum control_verb verb;
	unsigned min_args; /* after the verb */
	unsigned max_args;
} verbs[] = {
	{"add", CONTROL_ADD, 2, 4},     {"start", CONTROL_START, 1, 1},
	{"stop", CONTROL_STOP, 1, 1},   {"speed", CONTROL_SPEED, 2, 2},
	{"chunk", CONTROL_CHUNK, 2, 2}, {"status", CONTROL_STATUS, 0, 1},
	{"verify", CONTROL_VERIFY, 1, 1}, {"map", CONTROL_MAP, 1, 2},
};

static int fail(char *why, size_t why_size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int fail(char *why, size_t why_size, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, why_size, fmt, ap);
	va_end(ap);
	return -EINVAL;
}

const char *control_verb_name(enum control_verb v)
{
	for (size_t i = 0; i < ARRAY_SIZE(verbs); i++)
		if (verbs[i].verb == v)
			return verbs[i].word;
	return "?";
}

static bool url_scheme_ok(const char *u)
{
	return !strncasecmp(u, "http://", 7) || !strncasecmp(u, "https://", 8) ||
	       !strncasecmp(u, "file://", 7);
}

int control_parse(const char *buf, size_t len, struct control_cmd *ret, char *why,
		  size_t why_size)
{
	char line[CONTROL_LINE_MAX + 1];
	char *tok[MAX_TOKENS];
	unsigned ntok = 0;
	size_t i;

	if (len == 0 || buf[len - 1] != '\n')
		return fail(why, why_size, "command must end with a newline");
	if (len > CONTROL_LINE_MAX)
		return fail(why, why_size, "line too long (at most %d bytes)", CONTROL_LINE_MAX);
	len--;
	if (len > 0 && buf[len - 1] == '\r')
		len--;
	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)buf[i];
		if (c == '\n')
			return fail(why, why_size, "one command per write");
		if (c < 0x20 && c != '\t')
			return fail(why, why_size, "control character in command");
	}
	memcpy(line, buf, len);
	line[len] = '\0';

	for (char *p = line; *p;) {
		while (*p == ' ' || *p == '\t')
			*p++ = '\0';
		if (!*p)
			break;
		if (ntok == MAX_TOKENS)
			return fail(why, why_size, "too many arguments");
		tok[ntok++] = p;
		while (*p && *p != ' ' && *p != '\t')
			p++;
	}
	if (ntok == 0)
		return fail(why, why_size, "empty command");

	size_t v;
	for (v = 0; v < ARRAY_SIZE(verbs); v++)
		if (!strcmp(tok[0], verbs[v].word))
			break;
	if (v == ARRAY_SIZE(verbs))
		return fail(why, why_size, "unknown command '%.64s'", tok[0]);
	unsigned nargs = ntok - 1;
	if (nargs < verbs[v].min_args)
		return fail(why, why_size, "%s: missing %s", verbs[v].word,
			    nargs == 0 ? "disk name" :
			    verbs[v].verb == CONTROL_ADD ? "template URL" :
			    verbs[v].verb == CONTROL_SPEED ? "rate" : "offset");
	if (nargs > verbs[v].max_args)
		return fail(why, why_size, "%s: too many arguments", verbs[v].word);

	struct control_cmd c = {.verb = verbs[v].verb};
	if (nargs >= 1) {
		if (!disk_name_valid(tok[1])) {
			char shown[96];

			disk_name_quote(shown, sizeof(shown), tok[1]);
			return fail(why, why_size, "%s: bad disk name %s", verbs[v].word, shown);
		}
		snprintf(c.name, sizeof(c.name), "%s", tok[1]);
	}
	int r;
	switch (c.verb) {
	case CONTROL_ADD:
		if (!url_scheme_ok(tok[2]))
			return fail(why, why_size,
				    "add: template URL must start with http://, https:// or file://");
		snprintf(c.url, sizeof(c.url), "%s", tok[2]);
		for (unsigned k = 3; k < ntok; k++) {
			if (!strncmp(tok[k], "chunk_size=", 11)) {
				if (c.chunk_size)
					return fail(why, why_size, "add: chunk_size= given twice");
				r = parse_size(tok[k] + 11, &c.chunk_size);
				if (r < 0 || c.chunk_size < CACHE_CHUNK_MIN ||
				    c.chunk_size > CACHE_CHUNK_MAX ||
				    (c.chunk_size & (c.chunk_size - 1)))
					return fail(why, why_size,
						    "add: bad chunk_size '%.32s' (a power of two, 64K to 16M)",
						    tok[k] + 11);
			} else if (!strncmp(tok[k], "manifest=", 9)) {
				const char *mu = tok[k] + 9;
				if (c.manifest[0])
					return fail(why, why_size, "add: manifest= given twice");
				if (!url_scheme_ok(mu) && mu[0] != '/')
					return fail(why, why_size,
						    "add: manifest= needs an http://, https:// or file:// URL "
						    "or an absolute path");
				snprintf(c.manifest, sizeof(c.manifest), "%s", mu);
			} else {
				return fail(why, why_size, "add: unknown option '%.64s'", tok[k]);
			}
		}
		break;
	case CONTROL_SPEED:
		r = parse_rate(tok[2], &c.number);
		if (r < 0)
			return fail(why, why_size, "speed: bad rate '%.64s'%s", tok[2],
				    r == -ERANGE ? " (too large)" : "");
		break;
	case CONTROL_CHUNK:
		r = parse_size(tok[2], &c.number);
		if (r < 0)
			return fail(why, why_size, "chunk: bad offset '%.64s'", tok[2]);
		break;
	case CONTROL_MAP:
		c.number = 64;
		if (nargs == 2 && (parse_u64(tok[2], &c.number) < 0 || c.number == 0 ||
				   c.number > CONTROL_MAP_MAX))
			return fail(why, why_size, "map: bad width '%.64s' (1 to %d cells)", tok[2],
				    CONTROL_MAP_MAX);
		break;
	default:
		break;
	}
	*ret = c;
	return 0;
}
