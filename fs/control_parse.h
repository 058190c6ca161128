/* SPDX-License-Identifier: MIT */
/*
 * Parser for control-file commands (one newline-terminated line per
 * write).  Pure: no I/O, no locks, any thread.  See streamfs(1), CONTROL
 * FILE, for the grammar.
 */
#ifndef STREAMFS_CONTROL_PARSE_H
#define STREAMFS_CONTROL_PARSE_H

#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define CONTROL_LINE_MAX 4096
#define CONTROL_MAP_MAX 4096 /* cells of a map reply */

enum control_verb {
	CONTROL_ADD,
	CONTROL_START,
	CONTROL_STOP,
	CONTROL_SPEED,
	CONTROL_CHUNK,
	CONTROL_STATUS,
	CONTROL_VERIFY,
	CONTROL_MAP,
};

struct control_cmd {
	enum control_verb verb;
	char name[DISK_NAME_MAX + 1]; /* "" only for a bare "status" */
	char url[CONTROL_LINE_MAX];   /* add: template URL */
	char manifest[CONTROL_LINE_MAX]; /* add: manifest URL, "" when none */
	uint64_t number;              /* speed: bytes/s; chunk: offset; map: cells */
	uint64_t chunk_size;          /* add: 0 = the mount's default */
};

/*
 * Parses len bytes of buf (not NUL-terminated) into *ret.  The input must
 * be exactly one line ending in '\n' (a '\r' before it is tolerated), at
 * most CONTROL_LINE_MAX bytes.  Returns 0, or -EINVAL with a reason
 * naming the problem written to why ("unknown command 'x'", "missing
 * disk name", "bad number 'x'", "line too long", ...).
 */
int control_parse(const char *buf, size_t len, struct control_cmd *ret, char *why,
		  size_t why_size) __attribute__((warn_unused_result));

/* The verb's word, e.g. "add". */
const char *control_verb_name(enum control_verb v);

#endif
