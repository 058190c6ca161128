// SPDX-License-Identifier: MIT
/* libFuzzer target: the control-command parser must never crash, read out
 * of bounds, or accept a command without filling a valid result. */
#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "fs/control_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct control_cmd c;
	char why[256];

	why[0] = '\0';
	if (control_parse((const char *)data, size, &c, why, sizeof(why)) == 0) {
		assert(c.verb == CONTROL_STATUS || disk_name_valid(c.name));
		assert(memchr(c.name, '\0', sizeof(c.name)));
	} else {
		assert(why[0]);
	}
	return 0;
}
