// SPDX-License-Identifier: MIT
/*
 * The log sink.  Messages go to stderr (foreground, tests) or syslog
 * (daemon).  Safe from any thread: each message is formatted into a local
 * buffer and written with one call.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "log.h"

int log_max_level = LOG_INFO;
unsigned log_debug_mask;

static bool log_to_stderr = true;
static const char *log_ident = "streamfs";

void log_init(const char *ident, bool to_stderr)
{
	log_ident = ident;
	log_to_stderr = to_stderr;
	if (!to_stderr)
		openlog(ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
}

void log_msg(int prio, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int saved = errno;

	if (prio > log_max_level)
		return;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (log_to_stderr) {
		static const char *const names[] = {"emerg", "alert", "crit", "error",
						    "warning", "notice", "info", "debug"};
		char line[1100];
		int n = snprintf(line, sizeof(line), "%s: %s: %s\n", log_ident,
				 names[prio & 7], buf);
		if (n > (int)sizeof(line) - 1)
			n = sizeof(line) - 1;
		ssize_t r = write(STDERR_FILENO, line, (size_t)n);
		(void)r; /* nowhere left to report a failed log write */
	} else {
		syslog(prio, "%s", buf);
	}
	errno = saved;
}

int log_parse_debug(const char *list)
{
	static const struct {
		const char *name;
		unsigned bit;
	} subs[] = {
		{"fetch", LOG_SUB_FETCH}, {"cache", LOG_SUB_CACHE},
		{"fs", LOG_SUB_FS},       {"stream", LOG_SUB_STREAM},
		{"all", ~0u},
	};
	const char *p = list;

	while (*p) {
		size_t n = strcspn(p, ",:");
		bool found = false;

		for (size_t i = 0; i < sizeof(subs) / sizeof(subs[0]); i++) {
			if (strlen(subs[i].name) == n && !strncasecmp(p, subs[i].name, n)) {
				log_debug_mask |= subs[i].bit;
				found = true;
			}
		}
		if (!found && n)
			return -EINVAL;
		p += n;
		if (*p)
			p++;
	}
	log_max_level = LOG_DEBUG;
	return 0;
}
