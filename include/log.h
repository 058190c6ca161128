/* SPDX-License-Identifier: MIT */
/*
 * Logging: one sink for every module, stderr in the foreground and syslog
 * once daemonised.  Thread-safe; callable from any thread.
 */
#ifndef STREAMFS_LOG_H
#define STREAMFS_LOG_H

#include <stdbool.h>
#include <syslog.h>

enum log_subsys {
	LOG_SUB_FETCH = 1 << 0,
	LOG_SUB_CACHE = 1 << 1,
	LOG_SUB_FS = 1 << 2,
	LOG_SUB_STREAM = 1 << 3,
};

/* Set once by main() before any thread starts; read-only afterwards. */
extern int log_max_level;    /* LOG_ERR .. LOG_DEBUG */
extern unsigned log_debug_mask; /* enum log_subsys bits for debug output */

/*
 * Chooses the sink.  ident names the program in syslog; to_stderr selects
 * stderr (foreground) instead of syslog.  Not thread-safe: call before
 * starting threads, or again from main() after daemonising.
 */
void log_init(const char *ident, bool to_stderr);

/* Writes one message at syslog priority prio; no trailing newline needed. */
void log_msg(int prio, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Parses "fetch,cache,fs,stream,all" into log_debug_mask; -EINVAL on unknown. */
int log_parse_debug(const char *list);

#define log_err(...) log_msg(LOG_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARNING, __VA_ARGS__)
#define log_notice(...) log_msg(LOG_NOTICE, __VA_ARGS__)
#define log_info(...)                              \
	do {                                           \
		if (log_max_level >= LOG_INFO)             \
			log_msg(LOG_INFO, __VA_ARGS__);        \
	} while (0)
/* Arguments are evaluated only when subsystem sub is being debugged. */
#define log_debug(sub, ...)                                            \
	do {                                                               \
		if (log_max_level >= LOG_DEBUG && (log_debug_mask & (sub)))    \
			log_msg(LOG_DEBUG, __VA_ARGS__);                           \
	} while (0)

#endif
