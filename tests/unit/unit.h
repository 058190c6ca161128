/* SPDX-License-Identifier: MIT */
/*
 * Shared helpers of the cmocka unit tests: cmocka's includes in the order
 * it needs, a table-row check that reports every failing row before the
 * test fails, and a flag for AddressSanitizer builds.
 */
#ifndef STREAMFS_TESTS_UNIT_H
#define STREAMFS_TESTS_UNIT_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#define N_ELEMENTS(a) (sizeof(a) / sizeof((a)[0]))

/* Checks every row before failing; each failure names its row. */
#define EXPECT(bad, cond, ...)                                        \
	do {                                                              \
		if (!(cond)) {                                                \
			print_error("%s:%d: ", __FILE__, __LINE__);               \
			print_error(__VA_ARGS__);                                 \
			print_error("\n");                                        \
			(bad)++;                                                  \
		}                                                             \
	} while (0)

/* Sanitizer runtimes report a huge failing allocation instead of
 * returning NULL: tests of ENOMEM skip under them. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define UNDER_SANITIZER 1
#endif
#endif

#endif
