// SPDX-License-Identifier: MIT
/*
 * streamfsctl: manage streamfs disks.  Talks to a running mount only
 * through its control file and xattrs, and to an image directory directly
 * when nothing has it mounted.  Single-threaded.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache.h"
#include "common/cleanup.h"
#include "fetch.h"
#include "fs.h"
#include "log.h"
#include "util.h"

static int cmd_add(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"chunk-size", required_argument, NULL, 'c'},
		{"manifest", required_argument, NULL, 'm'},
		{NULL, 0, NULL, 0},
	};
	uint64_t chunk = 0;
	const char *manifest = NULL;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'c':
			if (parse_size(optarg, &chunk) < 0) {
				fprintf(stderr, "streamfsctl: bad chunk size '%s': use a power of two from 64K to 16M\n", optarg);
				return 2;
			}
			break;
		case 'm':
			manifest = optarg;
			break;
		default:
			return 2;
		}
	}
	if (argc - optind != 3) {
		fprintf(stderr, "streamfsctl: usage: streamfsctl add <image-dir|mountpoint> <name> <url> [--chunk-size SIZE]\n");
		return 2;
	}
	const char *dir = argv[optind], *name = argv[optind + 1], *url = argv[optind + 2];
	if (manifest) {
		fprintf(stderr, "streamfsctl: add: manifests are not supported by this version\n");
		return 1;
	}
	_cleanup_close_ int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0) {
		fprintf(stderr, "streamfsctl: cannot open directory %s: %s\n", dir, strerror(errno));
		return 1;
	}
	char why[512];
	_cleanup_close_ int lock = fs_dir_lock(dirfd, dir, why, sizeof(why));
	if (lock < 0) {
		fprintf(stderr, "streamfsctl: %s\n", why);
		return 1;
	}
	struct fetch_opts fo = {.connections = 1, .timeout_s = 20};
	struct fetch_pool *pool;
	int r = fetch_pool_new(&fo, &pool, why, sizeof(why));
	if (r < 0) {
		fprintf(stderr, "streamfsctl: %s\n", why);
		return 1;
	}
	struct fs_add_params p = {.name = name, .url = url, .chunk_size = chunk};
	r = fs_disk_add(pool, dirfd, dir, &p, why, sizeof(why));
	fetch_pool_free(pool);
	if (r < 0) {
		fprintf(stderr, "streamfsctl: %s\n", why);
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	log_init("streamfsctl", true);
	log_max_level = LOG_ERR;
	if (argc < 2) {
		fprintf(stderr, "usage: streamfsctl <command> ...\n");
		return 2;
	}
	if (!strcmp(argv[1], "add"))
		return cmd_add(argc - 1, argv + 1);
	fprintf(stderr, "streamfsctl: unknown command '%s'\n", argv[1]);
	return 2;
}
