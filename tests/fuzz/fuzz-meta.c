// SPDX-License-Identifier: MIT
/* libFuzzer target: the metadata header decoder, and re-encoding of what
 * it accepts (which must round-trip). */
#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "cache/cache_i.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t slot[META_SLOT_SIZE], again[META_SLOT_SIZE];
	struct meta m;

	if (size > META_SLOT_SIZE)
		size = META_SLOT_SIZE;
	memset(slot, 0, sizeof(slot));
	memcpy(slot, data, size);
	if (meta_decode(slot, sizeof(slot), &m) == 0) {
		assert(meta_encode(&m, again) == 0);
		struct meta m2;
		assert(meta_decode(again, sizeof(again), &m2) == 0);
		assert(m2.size == m.size && m2.chunk_size == m.chunk_size && !strcmp(m2.url, m.url));
		meta_clear(&m2);
		meta_clear(&m);
	}
	return 0;
}
