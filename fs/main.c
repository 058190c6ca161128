// SPDX-License-Identifier: MIT
/*
 * streamfs: mount an image directory and serve each template-backed disk
 * as a file.  main() parses options, takes the image directory's lock,
 * loads the disks, mounts, runs libfuse's multithreaded loop until
 * unmount or SIGTERM/SIGINT, and then saves every disk's state.  The only
 * place that exits the process.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <malloc.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "common/cleanup.h"
#include "fs_i.h"
#include "log.h"
#include "util.h"

#define OPT(t, field, val) {t, offsetof(struct mount_opts, field), val}

enum { KEY_HELP, KEY_VERSION, KEY_FOREGROUND, KEY_DEBUG };

static const struct fuse_opt option_spec[] = {
	OPT("stream=%s", stream, 0),
	OPT("speed=%s", speed, 0),
	OPT("connections=%u", connections, 0),
	OPT("timeout=%u", timeout, 0),
	OPT("commit=%s", commit, 0),
	OPT("cafile=%s", cafile, 0),
	OPT("capath=%s", capath, 0),
	OPT("cert=%s", cert, 0),
	OPT("key=%s", key, 0),
	OPT("proxy=%s", proxy, 0),
	OPT("header_file=%s", header_file, 0),
	OPT("aws_sigv4=%s", aws_sigv4, 0),
	OPT("aws_credentials=%s", aws_credentials, 0),
	OPT("insecure", insecure, 1),
	OPT("readonly", readonly, 1),
	OPT("nopassthrough", nopassthrough, 1),
	OPT("nodirectio", nodirectio, 1),
	OPT("chunk_size=%s", chunk_size, 0),
	OPT("readahead=%s", readahead, 0),
	OPT("debug=%s", debug_subsys, 0),
	FUSE_OPT_KEY("-h", KEY_HELP),
	FUSE_OPT_KEY("--help", KEY_HELP),
	FUSE_OPT_KEY("-V", KEY_VERSION),
	FUSE_OPT_KEY("--version", KEY_VERSION),
	FUSE_OPT_KEY("-f", KEY_FOREGROUND),
	FUSE_OPT_KEY("-d", KEY_DEBUG),
	FUSE_OPT_KEY("debug", KEY_DEBUG),
	FUSE_OPT_END,
};

static void usage(FILE *out)
{
	fprintf(out,
		"usage: streamfs [-f] [-d] [-o <opt>[,<opt>...]] <image-dir> <mountpoint>\n"
		"\n"
		"Serves every disk of <image-dir> as <mountpoint>/<name>, fetching absent\n"
		"data from its template on demand and streaming the rest in the background.\n"
		"\n"
		"  -f                     stay in the foreground, log to stderr\n"
		"  -d                     foreground with FUSE and streamfs debug output\n"
		"  -h, --help             show this help\n"
		"  -V, --version          show the version\n"
		"\n"
		"streamfs options (-o):\n"
		"  stream=auto|manual     auto (default) starts streaming incomplete disks at mount\n"
		"  speed=RATE             streaming limit for every disk, bytes/s (K/M/G), 0 = none\n"
		"  connections=N          parallel HTTP connections per mount (default %d)\n"
		"  timeout=SECONDS        how long a read retries the network before EIO (default %d)\n"
		"  commit=SECONDS         how long a busy disk's fetched data may go unsaved\n"
		"                         (1 to 3600, default %d; an idle disk saves within 2 s)\n"
		"  chunk_size=SIZE        chunk size of disks added through the control file (default 1M)\n"
		"  readonly               refuse writes to disks (EROFS)\n"
		"  readahead=SIZE         fetch ahead of sequential readers (default 32M, 0 = off)\n"
		"  nopassthrough          serve complete disks through the daemon, never by\n"
		"                         kernel FUSE passthrough\n"
		"  nodirectio             open incomplete disks through the kernel page cache,\n"
		"                         not in direct-io mode\n"
		"  cafile=FILE, capath=DIR  CA certificates for https templates\n"
		"  cert=FILE, key=FILE    TLS client certificate and key\n"
		"  insecure               do not verify TLS certificates (logs a warning)\n"
		"  header_file=FILE       extra HTTP headers, one 'Name: value' a line; must not be\n"
		"                         readable by group or others; re-read when it changes\n"
		"  proxy=URL              HTTP proxy\n"
		"  aws_sigv4=aws:amz:REGION:s3  sign requests with AWS SigV4 (S3-compatible stores)\n"
		"  aws_credentials=FILE   access key id and secret for aws_sigv4 (mode 600)\n"
		"  debug=LIST             debug logs of fetch,cache,fs,stream or all\n"
		"\n"
		"FUSE options such as allow_other may be given with -o as well.\n"
		"See streamfs(1).\n",
		FETCH_DEFAULT_CONNECTIONS, FETCH_DEFAULT_TIMEOUT_S, FS_COMMIT_DEFAULT_S);
}

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
	struct mount_opts *o = data;

	(void)outargs;
	switch (key) {
	case FUSE_OPT_KEY_NONOPT:
		if (!o->image_dir) {
			o->image_dir = strdup(arg);
			return 0;
		}
		if (!o->mountpoint) {
			o->mountpoint = strdup(arg);
			return 0;
		}
		fprintf(stderr, "streamfs: unexpected argument '%s'\n", arg);
		return -1;
	case KEY_HELP:
		o->show_help = 1;
		return 0;
	case KEY_VERSION:
		o->show_version = 1;
		return 0;
	case KEY_FOREGROUND:
		o->foreground = true;
		return 0;
	case KEY_DEBUG:
		o->foreground = true;
		o->debug = true;
		return 1; /* FUSE prints its own debug output too */
	default:
		return 1;
	}
}

static void opts_free(struct mount_opts *o)
{
	char **strs[] = {&o->image_dir, &o->mountpoint, &o->stream, &o->speed, &o->cafile,
			 &o->capath, &o->cert, &o->key, &o->proxy, &o->header_file,
			 &o->aws_sigv4, &o->aws_credentials,
			 &o->chunk_size, &o->debug_subsys, &o->readahead, &o->commit};
	for (size_t i = 0; i < ARRAY_SIZE(strs); i++) {
		free(*strs[i]);
		*strs[i] = NULL;
	}
}

/*
 * Makes the file options absolute.  The daemon changes to "/" when it
 * goes to the background, and these files are opened again later (curl
 * loads certificates per connection; header_file is re-read when it
 * changes), so a relative path would stop working after the mount.
 */
static int opts_abs_paths(struct mount_opts *o)
{
	struct {
		const char *name;
		char **path;
	} files[] = {
		{"cafile", &o->cafile}, {"capath", &o->capath}, {"cert", &o->cert},
		{"key", &o->key}, {"header_file", &o->header_file},
		{"aws_credentials", &o->aws_credentials},
	};
	_cleanup_free_ char *cwd = NULL;

	for (size_t i = 0; i < ARRAY_SIZE(files); i++) {
		char *path = *files[i].path, *abs;

		if (!path || !path[0] || path[0] == '/')
			continue;
		if (!cwd && !(cwd = getcwd(NULL, 0))) {
			fprintf(stderr, "streamfs: cannot resolve %s=%s: %s\n", files[i].name, path,
				strerror(errno));
			return -1;
		}
		if (asprintf(&abs, "%s/%s", cwd, path) < 0) {
			fprintf(stderr, "streamfs: out of memory\n");
			return -1;
		}
		free(path);
		*files[i].path = abs;
	}
	return 0;
}

/* Checks option values; prints one line and returns -1 on a bad one. */
static int opts_check(struct mount_ctx *m)
{
	struct mount_opts *o = &m->opts;

	if (!o->image_dir || !o->mountpoint) {
		fprintf(stderr, "streamfs: missing %s (see streamfs --help)\n",
			!o->image_dir ? "image directory and mount point" : "mount point");
		return -1;
	}
	if (o->stream && strcmp(o->stream, "auto") && strcmp(o->stream, "manual")) {
		fprintf(stderr, "streamfs: bad option stream=%s: use stream=auto or stream=manual\n",
			o->stream);
		return -1;
	}
	m->auto_stream = !o->stream || !strcmp(o->stream, "auto");
	if (o->speed && parse_rate(o->speed, &m->speed) < 0) {
		fprintf(stderr, "streamfs: bad option speed=%s: use bytes/s such as 10M, 0 = none\n",
			o->speed);
		return -1;
	}
	m->default_chunk = CACHE_CHUNK_DEFAULT;
	if (o->chunk_size) {
		uint64_t cs;
		if (parse_size(o->chunk_size, &cs) < 0 || cs < CACHE_CHUNK_MIN ||
		    cs > CACHE_CHUNK_MAX || (cs & (cs - 1))) {
			fprintf(stderr,
				"streamfs: bad option chunk_size=%s: use a power of two from 64K to 16M\n",
				o->chunk_size);
			return -1;
		}
		m->default_chunk = cs;
	}
	m->readahead = CACHE_READAHEAD_DEFAULT;
	if (o->readahead && (parse_size(o->readahead, &m->readahead) < 0 ||
			     m->readahead > CACHE_READAHEAD_MAX)) {
		fprintf(stderr, "streamfs: bad option readahead=%s: use 0 to 64M\n", o->readahead);
		return -1;
	}
	if (!o->connections)
		o->connections = FETCH_DEFAULT_CONNECTIONS;
	if (o->connections > 64) {
		fprintf(stderr, "streamfs: bad option connections=%u: use 1 to 64\n", o->connections);
		return -1;
	}
	if (!o->timeout)
		o->timeout = FETCH_DEFAULT_TIMEOUT_S;
	uint64_t commit = FS_COMMIT_DEFAULT_S;
	if (o->commit && (parse_u64(o->commit, &commit) < 0 || !commit ||
			  commit > FS_COMMIT_MAX_S)) {
		fprintf(stderr, "streamfs: bad option commit=%s: use 1 to %d seconds\n", o->commit,
			FS_COMMIT_MAX_S);
		return -1;
	}
	m->commit_ns = commit * 1000000000ull;
	/* The streamer leaves one connection to demand reads. */
	m->depth = o->connections > 1 ? o->connections - 1 : 1;
	if (o->debug_subsys && log_parse_debug(o->debug_subsys) < 0) {
		fprintf(stderr, "streamfs: bad option debug=%s: use fetch,cache,fs,stream or all\n",
			o->debug_subsys);
		return -1;
	}
	if (o->debug && !o->debug_subsys)
		(void)log_parse_debug("all");
	return opts_abs_paths(o);
}

static void fuse_log_to_ours(enum fuse_log_level level, const char *fmt, va_list ap)
{
	char buf[1024];

	vsnprintf(buf, sizeof(buf), fmt, ap);
	buf[strcspn(buf, "\n")] = '\0';
	log_msg((int)level, "%s", buf);
}

int main(int argc, char **argv)
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	struct mount_ctx m = {.dirfd = -1, .lock_fd = -1};
	struct fuse *fuse = NULL;
	char why[512];
	int ret = 1, r;

	log_init("streamfs", true);
	/* Large buffers go back to the system when freed: with the default
	 * dynamic threshold, per-thread arenas hoard freed megabytes.  curl's
	 * receive buffer (fetch/pool.c) stays below it, so it is reused, as
	 * long as freeing it does not trim the heap under it: a fixed mmap
	 * threshold leaves the trim threshold at 128 KiB, and every cold read
	 * then faulted its 240 KiB buffer in again (about 20 page faults and
	 * 20-40 us a read).  1 MiB of free heap top per arena is kept. */
	mallopt(M_MMAP_THRESHOLD, 256 * 1024);
	mallopt(M_TRIM_THRESHOLD, 1024 * 1024);
	mallopt(M_ARENA_MAX, 4);
	if (fuse_opt_parse(&args, &m.opts, option_spec, opt_proc) < 0)
		return 1;
	if (m.opts.show_help) {
		usage(stdout);
		fuse_opt_free_args(&args);
		opts_free(&m.opts);
		return 0;
	}
	if (m.opts.show_version) {
		printf("streamfs %s (libfuse %s, %s)\n", STREAMFS_VERSION, fuse_pkgversion(),
		       curl_version_info(CURLVERSION_NOW)->version);
		fuse_opt_free_args(&args);
		opts_free(&m.opts);
		return 0;
	}
	if (opts_check(&m) < 0)
		goto out;
	fuse_set_log_func(fuse_log_to_ours);

	m.dirfd = open(m.opts.image_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (m.dirfd < 0) {
		fprintf(stderr, "streamfs: cannot open image directory %s: %s\n", m.opts.image_dir,
			strerror(errno));
		goto out;
	}
	if (faccessat(m.dirfd, ".", R_OK | W_OK | X_OK, AT_EACCESS) < 0) {
		fprintf(stderr, "streamfs: cannot use image directory %s: %s\n", m.opts.image_dir,
			strerror(errno));
		goto out;
	}
	m.lock_fd = fs_dir_lock(m.dirfd, m.opts.image_dir, why, sizeof(why));
	if (m.lock_fd < 0) {
		fprintf(stderr, "streamfs: %s\n", why);
		goto out;
	}
	m.owner = getuid();
	clock_gettime(CLOCK_REALTIME, &m.started);
	m.group = getgid();
	pthread_mutex_init(&m.add_lock, NULL);
	pthread_rwlock_init(&m.disks_lock, NULL);
	pthread_mutex_init(&m.flush_lock, NULL);
	cond_init_monotonic(&m.flush_cond);

	const struct fetch_opts fo = {
		.connections = m.opts.connections,
		.timeout_s = m.opts.timeout,
		.cafile = m.opts.cafile,
		.capath = m.opts.capath,
		.cert = m.opts.cert,
		.key = m.opts.key,
		.proxy = m.opts.proxy,
		.header_file = m.opts.header_file,
		.aws_sigv4 = m.opts.aws_sigv4,
		.aws_credentials = m.opts.aws_credentials,
		.insecure = m.opts.insecure,
	};
	r = fetch_pool_new(&fo, &m.pool, why, sizeof(why));
	if (r < 0) {
		fprintf(stderr, "streamfs: %s\n", why[0] ? why : strerror(-r));
		goto out;
	}

	/* Kernel permission checks from the modes getattr reports; reads no
	 * larger than libfuse can splice (FS_IO_SIZE). */
	char max_read[32];
	snprintf(max_read, sizeof(max_read), "-omax_read=%d", FS_IO_SIZE);
	if (fuse_opt_add_arg(&args, "-odefault_permissions") < 0 ||
	    fuse_opt_add_arg(&args, max_read) < 0 ||
	    fuse_opt_add_arg(&args, "-ofsname=streamfs") < 0 ||
	    fuse_opt_add_arg(&args, "-osubtype=streamfs") < 0)
		goto out;
	fuse = fuse_new(&args, &fs_ops, sizeof(fs_ops), &m);
	if (!fuse)
		goto out; /* libfuse said why */
	r = mount_load_all(&m);
	if (r < 0) {
		fprintf(stderr, "streamfs: cannot read image directory %s: %s\n", m.opts.image_dir,
			strerror(-r));
		goto out;
	}
	if (fuse_mount(fuse, m.opts.mountpoint) != 0) {
		fprintf(stderr, "streamfs: cannot mount on %s\n", m.opts.mountpoint);
		goto out_disks;
	}
	if (fs_devio_install(fuse_get_session(fuse)) < 0)
		fprintf(stderr, "streamfs: warning: cannot hook FUSE device I/O: no passthrough, "
			"no direct-io, cold reads wait for whole chunks\n");
	fs_open_modes_enable(!m.opts.nopassthrough, !m.opts.nodirectio);
	if (fuse_daemonize(m.opts.foreground) != 0)
		goto out_unmount;
	if (!m.opts.foreground)
		log_init("streamfs", false);
	if (fuse_set_signal_handlers(fuse_get_session(fuse)) != 0)
		goto out_unmount;
	r = mount_flusher_start(&m);
	if (r < 0) {
		log_err("cannot start flusher thread: %s", strerror(-r));
		goto out_signals;
	}
	mount_start_streaming(&m);

	struct fuse_loop_config *lc = fuse_loop_cfg_create();
	if (!lc)
		goto out_flusher;
	fuse_loop_cfg_set_max_threads(lc, 64);
	fuse_loop_cfg_set_idle_threads(lc, 16);
	log_info("mounted %s on %s", m.opts.image_dir, m.opts.mountpoint);
	/* 0 after fusermount3 -u, the signal's number after SIGTERM, SIGINT
	 * or SIGHUP (both clean), -errno on failure. */
	r = fuse_loop_mt(fuse, lc);
	fuse_loop_cfg_destroy(lc);
	ret = r >= 0 ? 0 : 1;
	if (r < 0)
		log_err("FUSE loop ended with an error: %s", strerror(-r));
	else if (r > 0)
		log_info("signal %d: unmounting", r);

out_flusher:
	mount_flusher_stop(&m);
out_signals:
	fuse_remove_signal_handlers(fuse_get_session(fuse));
out_unmount:
	fuse_unmount(fuse);
out_disks:
	/* Stops every streamer and saves every disk's state; requests still
	 * on the network are cancelled rather than waited for. */
	fetch_pool_shutdown(m.pool);
	mount_free_disks(&m);
out:
	if (fuse)
		fuse_destroy(fuse);
	mount_free_disks(&m);
	fetch_pool_free(m.pool);
	if (m.lock_fd >= 0)
		close(m.lock_fd);
	if (m.dirfd >= 0)
		close(m.dirfd);
	fuse_opt_free_args(&args);
	opts_free(&m.opts);
	if (ret == 0)
		log_info("unmounted cleanly");
	return ret;
}
