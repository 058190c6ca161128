/* SPDX-License-Identifier: MIT */
/*
 * Scope-bound cleanup helpers built on __attribute__((cleanup)).
 *
 * Usable from any thread; the helpers only release what the annotated
 * variable owns when it goes out of scope.  Hand ownership on with
 * steal_ptr() / steal_fd() so the transfer is visible at the call site.
 */
#ifndef STREAMFS_CLEANUP_H
#define STREAMFS_CLEANUP_H

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define _cleanup_(f) __attribute__((cleanup(f)))

#define DEFINE_TRIVIAL_CLEANUP_FUNC(type, func)          \
	static inline void func##p(type *p)                  \
	{                                                    \
		if (*p)                                          \
			func(*p);                                    \
	}

static inline void freep(void *p)
{
	free(*(void **)p);
}

static inline void closep(int *fd)
{
	if (*fd >= 0) {
		int saved = errno;
		close(*fd);
		errno = saved;
	}
}

static inline void fclosep(FILE **f)
{
	if (*f)
		fclose(*f);
}

#define _cleanup_free_ _cleanup_(freep)
#define _cleanup_close_ _cleanup_(closep)
#define _cleanup_fclose_ _cleanup_(fclosep)

/* Returns p and sets it to NULL: ownership moves to the caller. */
#define steal_ptr(p)                      \
	({                                    \
		__typeof__(p) _stolen_ = (p);     \
		(p) = NULL;                       \
		_stolen_;                         \
	})

/* Returns fd and sets it to -1: ownership moves to the caller. */
#define steal_fd(fd)                      \
	({                                    \
		int _stolen_fd_ = (fd);           \
		(fd) = -1;                        \
		_stolen_fd_;                      \
	})

static inline void mutex_unlockp(pthread_mutex_t **m)
{
	if (*m)
		pthread_mutex_unlock(*m);
}

#define LOCK_GUARD_CONCAT_(a, b) a##b
#define LOCK_GUARD_CONCAT(a, b) LOCK_GUARD_CONCAT_(a, b)
/* Locks mutex m until the end of the enclosing scope. */
#define LOCK_GUARD(m)                                                       \
	_cleanup_(mutex_unlockp) pthread_mutex_t *LOCK_GUARD_CONCAT(             \
		_lock_guard_, __LINE__) = (pthread_mutex_lock(m), (m))

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define DIV_ROUND_UP(n, d) (((n) + (d)-1) / (d))

#define _wur_ __attribute__((warn_unused_result))

#endif
