// SPDX-License-Identifier: MIT
/*
 * Unit tests for the token-bucket rate limiter (include/ratelimit.h,
 * common/ratelimit.c).  Time is synthetic: every call gets an explicit
 * now_ns and the tests advance it by the returned waits, so results are
 * exact and the tests never sleep.  Single-threaded.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>

#include "unit.h"

#include "ratelimit.h"



#define NS_PER_S 1000000000ull
#define KIB 1024ull
#define MIB (1024ull * 1024)

/* An arbitrary, large start time: only differences may matter. */
#define T0 (UINT64_C(1) << 50)

/* Waits are computed in double and truncated: allow a few ns either way. */
#define NS_SLACK 2

/* bytes/rate in ns, as the limiter should compute it */
static double wait_for(double bytes, double rate)
{
	return bytes * 1e9 / rate;
}

static int near_ns(uint64_t got, double want)
{
	return fabs((double)got - want) <= NS_SLACK + want * 1e-12;
}

static void test_ratelimit__unlimited(void **state)
{
	static const uint64_t bytes[] = {0, 1, 4096, 16 * MIB, UINT64_C(1) << 40, UINT64_MAX};
	struct ratelimit rl;
	int bad = 0;

	(void)state;
	ratelimit_init(&rl, 0, T0);
	assert_int_equal(ratelimit_get(&rl), 0);
	for (size_t i = 0; i < N_ELEMENTS(bytes); i++) {
		/* same instant, later, and earlier: never a wait */
		static const int64_t dt[] = {0, 1, 1000000, -5};
		for (size_t k = 0; k < N_ELEMENTS(dt); k++) {
			uint64_t w = ratelimit_reserve(&rl, bytes[i], T0 + (uint64_t)dt[k]);
			EXPECT(bad, w == 0, "unlimited: reserve(%" PRIu64 ") waited %" PRIu64 " ns",
			       bytes[i], w);
		}
	}
	ratelimit_destroy(&rl);
	assert_int_equal(bad, 0);
}

/* The bucket starts empty: the first reservation of C bytes waits C/R. */
static void test_ratelimit__no_initial_burst(void **state)
{
	static const struct {
		uint64_t rate, bytes;
	} rows[] = {
		{1000000, 1000000},   /* exactly one second */
		{1000000, 1},
		{1000, 1},
		{1, 1},
		{1, 16 * MIB},        /* the slowest rate, the largest chunk */
		{10 * 1000 * 1000, MIB},
		{UINT64_C(1) << 30, 16 * MIB},
		{3, 1000},            /* not a whole number of ns */
		{1000000, 0},         /* nothing reserved, nothing to wait */
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		struct ratelimit rl;
		ratelimit_init(&rl, rows[i].rate, T0);
		EXPECT(bad, ratelimit_get(&rl) == rows[i].rate, "rate not kept");
		uint64_t w = ratelimit_reserve(&rl, rows[i].bytes, T0);
		double want = wait_for((double)rows[i].bytes, (double)rows[i].rate);
		EXPECT(bad, near_ns(w, want),
		       "rate %" PRIu64 ": first reserve(%" PRIu64 ") waited %" PRIu64
		       " ns, want %.0f",
		       rows[i].rate, rows[i].bytes, w, want);
		ratelimit_destroy(&rl);
	}
	assert_int_equal(bad, 0);
}

/* Reservations without waiting in between pile up as debt. */
static void test_ratelimit__debt_accumulates(void **state)
{
	struct ratelimit rl;
	int bad = 0;

	(void)state;
	ratelimit_init(&rl, 1000000, T0);
	for (unsigned k = 1; k <= 5; k++) {
		uint64_t w = ratelimit_reserve(&rl, 100000, T0);
		EXPECT(bad, near_ns(w, k * 100000000.0), "reserve #%u waited %" PRIu64, k, w);
	}
	/* a clock that steps back gives no credit */
	uint64_t w = ratelimit_reserve(&rl, 100000, T0 - NS_PER_S);
	EXPECT(bad, w >= 500000000, "clock stepping back gave credit: waited %" PRIu64, w);
	ratelimit_destroy(&rl);
	assert_int_equal(bad, 0);
}

/*
 * A streamer that reserves, sleeps the returned time, then spends
 * xfer_ns transferring: over many rounds it moves exactly rate bytes/s
 * (within 1%) as long as the transfer itself is faster than the limit.
 */
struct pace_row {
	uint64_t rate;
	uint64_t chunk, chunk2; /* alternating sizes; chunk2 == 0: always chunk */
	unsigned rounds;
	uint64_t xfer_ns;       /* time per transfer after the wait */
};

static double run_pace(struct ratelimit *rl, const struct pace_row *row, uint64_t *now)
{
	uint64_t start = *now, total = 0;

	for (unsigned k = 0; k < row->rounds; k++) {
		uint64_t c = (row->chunk2 && k % 2) ? row->chunk2 : row->chunk;
		*now += ratelimit_reserve(rl, c, *now);
		*now += row->xfer_ns;
		total += c;
	}
	if (*now == start)
		return INFINITY;
	return (double)total * 1e9 / (double)(*now - start);
}

static const struct pace_row pace_rows[] = {
	{1000000, 65536, 0, 1000, 0},
	{10 * 1000 * 1000, MIB, 0, 1000, 0},
	{10 * 1000 * 1000, MIB, 0, 1000, 20 * 1000 * 1000},  /* xfer 20% of budget */
	{100 * MIB, 16 * MIB, 0, 500, 50 * 1000 * 1000},
	{123457, 4 * KIB, MIB, 2000, 0},                  /* mixed sizes */
	{7, 64 * KIB, 0, 100, 0},                          /* odd, very slow rate */
	{UINT64_C(5) << 30, 64 * KIB, 0, 100000, 1000},   /* fast rate, many rounds */
	{1000000, 1, 0, 100000, 0},                        /* byte at a time */
};

static void test_ratelimit__long_run_average(void **state)
{
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(pace_rows); i++) {
		struct ratelimit rl;
		uint64_t now = T0;

		ratelimit_init(&rl, pace_rows[i].rate, now);
		double avg = run_pace(&rl, &pace_rows[i], &now);
		double err = fabs(avg - (double)pace_rows[i].rate) / (double)pace_rows[i].rate;
		EXPECT(bad, err <= 0.01, "row %zu: rate %" PRIu64 ": average %.1f B/s (%.3f%% off)",
		       i, pace_rows[i].rate, avg, err * 100);
		ratelimit_destroy(&rl);
	}
	assert_int_equal(bad, 0);
}

/* A transfer slower than the limit is never made slower still. */
static void test_ratelimit__slow_transfer_not_delayed(void **state)
{
	struct ratelimit rl;
	uint64_t now = T0;
	int bad = 0;

	(void)state;
	ratelimit_init(&rl, 1000000, now);
	now += ratelimit_reserve(&rl, 100000, now);
	for (int k = 0; k < 100; k++) {
		now += 200 * 1000 * 1000; /* 100000 bytes took 0.2 s: half the limit */
		uint64_t w = ratelimit_reserve(&rl, 100000, now);
		EXPECT(bad, w == 0, "round %d: waited %" PRIu64 " ns", k, w);
		now += w;
	}
	ratelimit_destroy(&rl);
	assert_int_equal(bad, 0);
}

/*
 * After an idle spell the credit is rate * min(idle, RATELIMIT_BURST_NS):
 * reserving that much plus C waits exactly C/R.
 */
/*
 * A consumer that reserves a chunk, waits, and then transfers it paced at
 * the rate (as curl's own limit does) must not wait again: credit earned
 * during its own transfer covers the next chunk even when a chunk is worth
 * more than RATELIMIT_BURST_NS.  Otherwise the two pacings add up and the
 * stream runs at half the rate.
 */
static void test_ratelimit__paced_transfer_earns_next_chunk(void **state)
{
	static const struct {
		uint64_t rate, chunk;
	} rows[] = {
		{2 * MIB, 1 * MIB},     /* a chunk is 500 ms of credit */
		{1 * MIB, 16 * MIB},    /* 16 s */
		{100 * MIB, 64 * 1024}, /* smaller than the burst */
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		struct ratelimit rl;
		uint64_t per_chunk = (uint64_t)((double)rows[i].chunk * 1e9 / (double)rows[i].rate);
		uint64_t now = T0;

		ratelimit_init(&rl, rows[i].rate, now);
		uint64_t w = ratelimit_reserve(&rl, rows[i].chunk, now);
		EXPECT(bad, near_ns(w, (double)per_chunk), "row %zu: first chunk waited %" PRIu64, i, w);
		now += w;
		for (int k = 0; k < 5; k++) {
			now += per_chunk; /* the paced transfer */
			w = ratelimit_reserve(&rl, rows[i].chunk, now);
			EXPECT(bad, w < per_chunk / 100,
			       "row %zu: chunk %d waited %" PRIu64 " ns after a paced transfer", i, k, w);
			now += w;
		}
		ratelimit_destroy(&rl);
	}
	assert_int_equal(bad, 0);
}

static void test_ratelimit__idle_credit_capped(void **state)
{
	static const struct {
		uint64_t rate;
		uint64_t idle_ns;
		uint64_t extra; /* C */
	} rows[] = {
		{1000000, 0, 1000},
		{1000000, 1, 1000},
		{1000000, RATELIMIT_BURST_NS / 2, 1000},
		{1000000, RATELIMIT_BURST_NS - 1, 1000},
		{1000000, RATELIMIT_BURST_NS, 1000},
		{1000000, RATELIMIT_BURST_NS + 1, 1000},
		{1000000, NS_PER_S, 1000},
		{1000000, 3600 * NS_PER_S, 1000},
		{100 * MIB, 10 * NS_PER_S, 16 * MIB},
		{10, 86400 * NS_PER_S, 1},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		struct ratelimit rl;
		uint64_t idle = rows[i].idle_ns < RATELIMIT_BURST_NS ? rows[i].idle_ns
								     : RATELIMIT_BURST_NS;
		double credit = (double)rows[i].rate * (double)idle / 1e9;

		ratelimit_init(&rl, rows[i].rate, T0);
		uint64_t now = T0 + rows[i].idle_ns;
		/* the credit itself goes through without a wait ... */
		uint64_t w = ratelimit_reserve(&rl, (uint64_t)floor(credit), now);
		EXPECT(bad, w == 0, "row %zu: reserving the credit (%.0f bytes) waited %" PRIu64,
		       i, credit, w);
		/* ... and anything beyond it pays at the rate */
		double frac = credit - floor(credit);
		w = ratelimit_reserve(&rl, rows[i].extra, now);
		double want = wait_for((double)rows[i].extra - frac, (double)rows[i].rate);
		EXPECT(bad, near_ns(w, want),
		       "row %zu: idle %" PRIu64 " ns, then %" PRIu64 " bytes past the credit waited %"
		       PRIu64 " ns, want %.0f",
		       i, rows[i].idle_ns, rows[i].extra, w, want);
		ratelimit_destroy(&rl);
	}
	assert_int_equal(bad, 0);
}

/* Idle time between paced transfers banks at most RATELIMIT_BURST_NS. */
static void test_ratelimit__idle_after_debt(void **state)
{
	struct ratelimit rl;
	uint64_t now = T0;
	const uint64_t rate = 1000000, chunk = 65536;

	(void)state;
	ratelimit_init(&rl, rate, now);
	for (int k = 0; k < 10; k++)
		now += ratelimit_reserve(&rl, chunk, now);
	now += 60 * NS_PER_S;
	uint64_t cap = rate * RATELIMIT_BURST_NS / NS_PER_S;
	assert_int_equal(ratelimit_reserve(&rl, cap, now), 0);
	uint64_t w = ratelimit_reserve(&rl, chunk, now);
	assert_true(near_ns(w, wait_for((double)chunk, (double)rate)));
	ratelimit_destroy(&rl);
}

/*
 * set() applies the new rate at once, including to outstanding debt:
 * after raising the rate the next reservation waits at most
 * (debt + C) / new_rate, not the remainder of the old schedule.
 */
static void test_ratelimit__set_raise_applies_at_once(void **state)
{
	static const struct {
		uint64_t old_rate, new_rate;
		uint64_t debt;  /* reserved at the old rate just before set() */
		uint64_t bytes; /* reserved after set() */
	} rows[] = {
		{1000, 1000000, 1000000, 0},
		{1000, 1000000, 1000000, 65536},
		{1000000, 2000000, 1000000, 1000000},
		{1, 100 * MIB, 16 * MIB, 16 * MIB},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		struct ratelimit rl;
		ratelimit_init(&rl, rows[i].old_rate, T0);
		uint64_t w0 = ratelimit_reserve(&rl, rows[i].debt, T0);
		ratelimit_set(&rl, rows[i].new_rate, T0);
		EXPECT(bad, ratelimit_get(&rl) == rows[i].new_rate, "row %zu: get() after set()",
		       i);
		uint64_t w = ratelimit_reserve(&rl, rows[i].bytes, T0);
		double most = wait_for((double)(rows[i].debt + rows[i].bytes),
				       (double)rows[i].new_rate);
		EXPECT(bad, (double)w <= most + NS_SLACK,
		       "row %zu: rate %" PRIu64 " -> %" PRIu64 " with %" PRIu64
		       " bytes owed: next reserve(%" PRIu64 ") waits %" PRIu64
		       " ns (old schedule %" PRIu64 "), want at most %.0f",
		       i, rows[i].old_rate, rows[i].new_rate, rows[i].debt, rows[i].bytes, w, w0,
		       most);
		ratelimit_destroy(&rl);
	}
	assert_int_equal(bad, 0);
}

/* After set() the pace is the new rate, raised or lowered. */
static void test_ratelimit__set_new_pace(void **state)
{
	static const struct {
		uint64_t old_rate, new_rate;
	} rows[] = {
		{1000000, 10000000},
		{10000000, 1000000},
		{100 * MIB, 64 * KIB},
		{64 * KIB, 100 * MIB},
		{0, 1000000},
		{1000000, 1000000},
	};
	int bad = 0;

	(void)state;
	for (size_t i = 0; i < N_ELEMENTS(rows); i++) {
		struct ratelimit rl;
		uint64_t now = T0;
		struct pace_row before = {rows[i].old_rate, 65536, 0, 50, 0};
		struct pace_row after = {rows[i].new_rate, 65536, 0, 2000, 0};

		ratelimit_init(&rl, rows[i].old_rate, now);
		run_pace(&rl, &before, &now);
		/* debt, if any, is test_ratelimit__set_raise_applies_at_once's */
		ratelimit_set(&rl, rows[i].new_rate, now);
		double avg = run_pace(&rl, &after, &now);
		double err = fabs(avg - (double)rows[i].new_rate) / (double)rows[i].new_rate;
		EXPECT(bad, err <= 0.01,
		       "row %zu: %" PRIu64 " -> %" PRIu64 " B/s: paced at %.1f B/s afterwards", i,
		       rows[i].old_rate, rows[i].new_rate, avg);
		ratelimit_destroy(&rl);
	}
	assert_int_equal(bad, 0);
}

/*
 * Lowering the rate while in credit keeps at most RATELIMIT_BURST_NS
 * worth of the new rate: the old, larger credit is not a free burst.
 */
static void test_ratelimit__set_lower_caps_credit(void **state)
{
	struct ratelimit rl;
	const uint64_t old_rate = 100 * 1000 * 1000, new_rate = 1000;
	const uint64_t old_cap = old_rate / 10, new_cap = new_rate * RATELIMIT_BURST_NS / NS_PER_S;
	uint64_t now = T0 + NS_PER_S;

	(void)state;
	ratelimit_init(&rl, old_rate, T0);
	ratelimit_set(&rl, new_rate, now);
	uint64_t w = ratelimit_reserve(&rl, old_cap, now);
	double least = wait_for((double)(old_cap - new_cap), (double)new_rate);
	if ((double)w + NS_SLACK < least)
		fail_msg("after lowering %" PRIu64 " -> %" PRIu64 " B/s, %" PRIu64
			 " bytes went with a wait of %" PRIu64 " ns, want at least %.0f",
			 old_rate, new_rate, old_cap, w, least);
	ratelimit_destroy(&rl);
}

/* set(0) lifts the limit at once, debt included; set(R) from 0 starts empty. */
static void test_ratelimit__set_unlimited_and_back(void **state)
{
	struct ratelimit rl;
	uint64_t now = T0;

	(void)state;
	ratelimit_init(&rl, 1000, now);
	assert_true(ratelimit_reserve(&rl, 1000000, now) > 0);
	ratelimit_set(&rl, 0, now);
	assert_int_equal(ratelimit_get(&rl), 0);
	assert_int_equal(ratelimit_reserve(&rl, 1000000, now), 0);
	assert_int_equal(ratelimit_reserve(&rl, 1, now + 1), 0);

	/* a long unlimited spell banks nothing for the next limit */
	now += 3600 * NS_PER_S;
	ratelimit_set(&rl, 1000000, now);
	uint64_t w = ratelimit_reserve(&rl, 1000000, now);
	assert_true(near_ns(w, 1e9));
	ratelimit_destroy(&rl);
}

/* A wait too long for uint64_t ns saturates rather than wrapping to short. */
static void test_ratelimit__huge_wait(void **state)
{
	struct ratelimit rl;

	(void)state;
	ratelimit_init(&rl, 1, T0);
	/* 2^40 bytes at 1 B/s is ~1.1e21 ns, past UINT64_MAX (~1.8e19) */
	uint64_t w = ratelimit_reserve(&rl, UINT64_C(1) << 40, T0);
	if (w < UINT64_C(1) << 63)
		fail_msg("reserve(2^40) at 1 B/s waited only %" PRIu64 " ns", w);
	ratelimit_destroy(&rl);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_ratelimit__unlimited),
		cmocka_unit_test(test_ratelimit__no_initial_burst),
		cmocka_unit_test(test_ratelimit__debt_accumulates),
		cmocka_unit_test(test_ratelimit__long_run_average),
		cmocka_unit_test(test_ratelimit__slow_transfer_not_delayed),
		cmocka_unit_test(test_ratelimit__paced_transfer_earns_next_chunk),
		cmocka_unit_test(test_ratelimit__idle_credit_capped),
		cmocka_unit_test(test_ratelimit__idle_after_debt),
		cmocka_unit_test(test_ratelimit__set_raise_applies_at_once),
		cmocka_unit_test(test_ratelimit__set_new_pace),
		cmocka_unit_test(test_ratelimit__set_lower_caps_credit),
		cmocka_unit_test(test_ratelimit__set_unlimited_and_back),
		cmocka_unit_test(test_ratelimit__huge_wait),
	};

	return cmocka_run_group_tests_name("ratelimit", tests, NULL, NULL);
}
