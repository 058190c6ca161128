/* SPDX-License-Identifier: MIT */
/*
 * A token-bucket rate limiter for the streamer.  Thread-safe: every
 * function takes the limiter's own lock briefly and never sleeps; callers
 * sleep for the returned time themselves.
 *
 * The bucket starts empty, so a throttled job never opens with a burst,
 * and it holds at most burst_ns worth of credit, so an idle spell does not
 * bank a burst either.  Consumers reserve bytes before they transfer them
 * and may drive the balance negative (a whole chunk at a time); the debt is
 * paid by waiting.
 */
#ifndef STREAMFS_RATELIMIT_H
#define STREAMFS_RATELIMIT_H

#include <pthread.h>
#include <stdint.h>

struct ratelimit {
	pthread_mutex_t lock; /* protects: all fields below; leaf lock */
	uint64_t rate;        /* bytes/s; 0 = unlimited; guarded by lock */
	double tokens;        /* bytes of credit, may be negative; guarded by lock */
	uint64_t last_ns;     /* time of the last refill; guarded by lock */
	uint64_t floor;       /* bytes of the last reservation: credit may reach
			       * at least this much, so that a transfer paced
			       * at the rate (curl's own limit) earns back the
			       * next reservation; guarded by lock */
};

/* Credit kept at most, in nanoseconds of the configured rate (or one
 * reservation's worth when that is more). */
#define RATELIMIT_BURST_NS 100000000ull

void ratelimit_init(struct ratelimit *rl, uint64_t rate, uint64_t now_ns);
void ratelimit_destroy(struct ratelimit *rl);

/*
 * Changes the rate, at once: outstanding debt (in bytes) is paid at the
 * new rate, and banked credit is capped to the new rate's burst.
 */
void ratelimit_set(struct ratelimit *rl, uint64_t rate, uint64_t now_ns);
uint64_t ratelimit_get(struct ratelimit *rl);

/*
 * Reserves bytes at time now_ns and returns how many nanoseconds the
 * caller must wait before transferring them (0 when unlimited or in
 * credit).
 */
uint64_t ratelimit_reserve(struct ratelimit *rl, uint64_t bytes, uint64_t now_ns);

#endif
