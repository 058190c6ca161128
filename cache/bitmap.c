// SPDX-License-Identifier: MIT
/*
 * The present-bitmap: one bit per chunk, with a running count.  Pure data
 * structure; callers hold the disk lock around every call.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cache_i.h"

int bitmap_init(struct bitmap *b, uint64_t nbits)
{
	if (nbits > BITMAP_MAX_BITS)
		return -EINVAL;
	size_t n = (size_t)bitmap_bytes(nbits);

	b->bits = calloc(n ? n : 1, 1);
	if (!b->bits)
		return -ENOMEM;
	b->nbits = nbits;
	b->count = 0;
	return 0;
}

void bitmap_destroy(struct bitmap *b)
{
	free(b->bits);
	b->bits = NULL;
	b->nbits = b->count = 0;
}

bool bitmap_get(const struct bitmap *b, uint64_t i)
{
	if (i >= b->nbits)
		return false;
	return b->bits[i / 8] & (1u << (i % 8));
}

bool bitmap_set(struct bitmap *b, uint64_t i)
{
	if (i >= b->nbits)
		return false;
	uint8_t mask = (uint8_t)(1u << (i % 8));
	bool old = b->bits[i / 8] & mask;
	if (!old) {
		b->bits[i / 8] |= mask;
		b->count++;
	}
	return old;
}

bool bitmap_clear(struct bitmap *b, uint64_t i)
{
	if (i >= b->nbits)
		return false;
	uint8_t mask = (uint8_t)(1u << (i % 8));
	bool old = b->bits[i / 8] & mask;
	if (old) {
		b->bits[i / 8] &= (uint8_t)~mask;
		b->count--;
	}
	return old;
}

/* Scans for the first bit equal to want at index >= from. */
static int64_t next_bit(const struct bitmap *b, uint64_t from, bool want)
{
	uint8_t skip = want ? 0x00 : 0xff; /* a byte with nothing of interest */
	uint64_t i = from;

	while (i < b->nbits) {
		if (i % 8 == 0) {
			/* Skip whole uninteresting bytes, 8 at a time when aligned. */
			while (i + 64 <= b->nbits && i % 64 == 0) {
				uint64_t w;
				memcpy(&w, &b->bits[i / 8], sizeof(w));
				if (w != (want ? 0 : UINT64_MAX))
					break;
				i += 64;
			}
			while (i + 8 <= b->nbits && b->bits[i / 8] == skip)
				i += 8;
			if (i >= b->nbits)
				break;
		}
		if (bitmap_get(b, i) == want)
			return (int64_t)i;
		i++;
	}
	return -1;
}

int64_t bitmap_next_clear(const struct bitmap *b, uint64_t from)
{
	return next_bit(b, from, false);
}

int64_t bitmap_next_set(const struct bitmap *b, uint64_t from)
{
	return next_bit(b, from, true);
}

int bitmap_load(struct bitmap *b, const uint8_t *bytes, size_t len)
{
	uint64_t count = 0;

	if (len != bitmap_bytes(b->nbits))
		return -EBADMSG;
	if (b->nbits % 8 && (bytes[len - 1] >> (b->nbits % 8)))
		return -EBADMSG;
	memcpy(b->bits, bytes, len);
	for (size_t i = 0; i < len; i++)
		count += (uint64_t)__builtin_popcount(b->bits[i]);
	b->count = count;
	return 0;
}
