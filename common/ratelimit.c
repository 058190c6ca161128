// SPDX-License-Identifier: MIT
/*
 * Token-bucket rate limiter; see include/ratelimit.h.  Called from
 * streamer threads and from control/xattr handlers (ratelimit_set).
 */
#include "ratelimit.h"

#include "common/cleanup.h"

void ratelimit_init(struct ratelimit *rl, uint64_t rate, uint64_t now_ns)
{
	pthread_mutex_init(&rl->lock, NULL);
	rl->rate = rate;
	rl->tokens = 0;
	rl->last_ns = now_ns;
	rl->floor = 0;
}

void ratelimit_destroy(struct ratelimit *rl)
{
	pthread_mutex_destroy(&rl->lock);
}

static void refill_locked(struct ratelimit *rl, uint64_t now_ns)
{
	if (now_ns > rl->last_ns && rl->rate) {
		double cap = (double)rl->rate * (double)RATELIMIT_BURST_NS / 1e9;
		if (cap < (double)rl->floor)
			cap = (double)rl->floor;
		rl->tokens += (double)(now_ns - rl->last_ns) * (double)rl->rate / 1e9;
		if (rl->tokens > cap)
			rl->tokens = cap;
	}
	if (now_ns > rl->last_ns)
		rl->last_ns = now_ns;
}

void ratelimit_set(struct ratelimit *rl, uint64_t rate, uint64_t now_ns)
{
	LOCK_GUARD(&rl->lock);

	refill_locked(rl, now_ns);
	/* Debt stays in bytes, so it is paid at the new rate from now on;
	 * credit is capped to what the new rate may bank; a change to or
	 * from unlimited starts with an empty bucket (no burst). */
	if (!rate || !rl->rate) {
		rl->tokens = 0;
	} else {
		double cap = (double)rate * (double)RATELIMIT_BURST_NS / 1e9;
		if (rl->tokens > cap)
			rl->tokens = cap;
	}
	rl->rate = rate;
}

uint64_t ratelimit_get(struct ratelimit *rl)
{
	LOCK_GUARD(&rl->lock);
	return rl->rate;
}

uint64_t ratelimit_reserve(struct ratelimit *rl, uint64_t bytes, uint64_t now_ns)
{
	LOCK_GUARD(&rl->lock);

	if (!rl->rate)
		return 0;
	refill_locked(rl, now_ns);
	rl->floor = bytes;
	rl->tokens -= (double)bytes;
	if (rl->tokens >= 0)
		return 0;
	double wait = -rl->tokens * 1e9 / (double)rl->rate;
	return wait >= 1.8e19 ? UINT64_MAX : (uint64_t)wait;
}
