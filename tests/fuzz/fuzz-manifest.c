// SPDX-License-Identifier: MIT
/* libFuzzer target: the manifest parser on arbitrary text. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>

#include "manifest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct manifest m;
	char why[256];

	if (manifest_parse((const char *)data, size, &m, why, sizeof(why)) == 0) {
		assert(m.size > 0 && m.chunks == (m.size + m.chunk_size - 1) / m.chunk_size);
		for (uint64_t i = 0; i < m.chunks; i++)
			(void)manifest_chunk_is_zero(&m, i);
		manifest_clear(&m);
	}
	return 0;
}
