// SPDX-License-Identifier: MIT
/*
 * streamfsctl: manage streamfs disks.  Talks to a running mount only
 * through its control file and xattrs, and to an image directory directly
 * when nothing has it mounted.  This file holds main(), the help text,
 * `add` and `manifest` (which reads a local file only); the other
 * commands live beside it in ctl/.
 * Single-threaded.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <langinfo.h>
#include <locale.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache.h"
#include "common/cleanup.h"
#include "ctl/ctl_i.h"
#include "fetch.h"
#include "fs.h"
#include "log.h"
#include "manifest.h"
#include "util.h"

struct ctl_term ctl_term;

static const char help_text[] =
	"usage: " CTL_PROG " <command> [<args>]\n"
	"       " CTL_PROG " --help | --version\n"
	"\n"
	"Manage the disks of a streamfs mount.  Each disk is a file backed by a remote\n"
	"template image; reads fetch what is missing, and a streamer copies the rest\n"
	"into a local sparse image.  " CTL_PROG " speaks only through the mount's control\n"
	"file (MOUNTPOINT/.control) and the disks' user.streamfs.* xattrs, and writes\n"
	"to an image directory directly only when nothing has it mounted.\n"
	"\n"
	"A <path> is a disk (MOUNTPOINT/NAME) or a mount point, which stands for\n"
	"every disk of the mount.\n"
	"\n"
	"Commands:\n"
	"  add <image-dir|mountpoint> <name> <url> [--chunk-size SIZE] [--manifest URL]\n"
	"      [-o OPTS]\n"
	"      Add disk <name> backed by the template at <url> (http://, https:// or\n"
	"      file://).  Given a mount point, the running mount adds the disk and\n"
	"      serves it at once; given an image directory, nothing may have it\n"
	"      mounted.  SIZE is a power of two from 64K to 16M.  With --manifest,\n"
	"      every fetched chunk is checked against the manifest at URL, whose\n"
	"      chunk size the disk takes.  -o takes network options for an image\n"
	"      directory: cafile=, capath=, cert=, key=, insecure, header_file=,\n"
	"      proxy=, aws_sigv4=, aws_credentials=, timeout= (as in streamfs(1)).\n"
	"\n"
	"  status [--json] [--map] <path>...\n"
	"      Show each disk's state, a progress bar, percent, cached and total\n"
	"      size, streaming rate and time left, and its last error.  --json prints\n"
	"      a JSON array of objects holding every status field; --map draws under\n"
	"      each disk which parts of it are present.\n"
	"\n"
	"  start <path>\n"
	"      Start or resume streaming the whole disk into its local image.\n"
	"\n"
	"  stop <path>\n"
	"      Pause streaming; chunks in flight finish.  Reads still fetch.\n"
	"\n"
	"  speed <path> <rate>\n"
	"      Limit streaming to <rate> bytes/s; K, M and G suffixes are powers of\n"
	"      1024, and 0 removes the limit.  The limit is kept across remounts.\n"
	"\n"
	"  chunk <path> <offset>\n"
	"      Stream the chunk holding byte <offset> and print the offset of the\n"
	"      next absent chunk, or \"end\" when there is none.\n"
	"\n"
	"  wait <path> [--timeout SECONDS]\n"
	"      Show progress on stderr until the disk is complete and exit 0; exit 1\n"
	"      when it goes to state error or the timeout passes.\n"
	"\n"
	"  verify <path>\n"
	"      Re-hash every present chunk and compare it with the disk's chunk\n"
	"      manifest; print how many were checked, or fail naming the offsets\n"
	"      of chunks that differ.\n"
	"\n"
	"  manifest <file> [--chunk-size SIZE]\n"
	"      Write <file>'s chunk manifest (size, chunk size, and a SHA-256 or\n"
	"      \"zero\" per chunk) to stdout, to publish beside a template and name\n"
	"      with add --manifest.  SIZE defaults to 1M.\n"
	"\n"
	"Options:\n"
	"  -h, --help     show this help and exit\n"
	"  --version      show the version and exit\n"
	"\n"
	"Exit status: 0 on success, 1 when the command failed, 2 for a bad command\n"
	"line.  Errors are one line on stderr; no credential is ever printed.\n"
	"See streamfs(1) for mount options, xattrs and the control file.\n";

void ctl_help(FILE *f)
{
	fputs(help_text, f);
}

void ctl_error(const char *fmt, ...)
{
	va_list ap;

	fputs(CTL_PROG ": ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

int ctl_bad_option(const char *cmd, int c, int argc, char **argv)
{
	const char *arg = optind >= 1 && optind - 1 < argc ? argv[optind - 1] : "";
	char shown[64];

	/* A long option is named by its argv word; a short one by optopt,
	 * since it may sit inside a bundle such as -jx. */
	if (!strncmp(arg, "--", 2))
		snprintf(shown, sizeof(shown), "%.*s", (int)strcspn(arg, "="), arg);
	else
		snprintf(shown, sizeof(shown), "-%c", optopt ? optopt : '?');
	if (c == ':')
		ctl_error("%s: option '%s' needs a value", cmd, shown);
	else
		ctl_error("%s: unknown option '%s' (see " CTL_PROG " --help)", cmd, shown);
	return CTL_EXIT_USAGE;
}

/* Parses a chunk size option; prints the error itself. */
static int parse_chunk_size(const char *cmd, const char *arg, uint64_t *ret)
{
	uint64_t v;

	if (parse_size(arg, &v) < 0 || v < CACHE_CHUNK_MIN || v > CACHE_CHUNK_MAX ||
	    (v & (v - 1))) {
		ctl_error("%s: bad chunk size '%s': use a power of two from 64K to 16M", cmd, arg);
		return -EINVAL;
	}
	*ret = v;
	return 0;
}

/* True when s has a byte the control file's one-line, space-separated
 * grammar cannot carry. */
static bool has_space_or_control(const char *s)
{
	for (const unsigned char *p = (const unsigned char *)s; *p; p++)
		if (*p <= ' ' || *p == 0x7f)
			return true;
	return false;
}

/* add through a running mount's control file. */
static int add_online(const char *mnt, const char *name, const char *url, uint64_t chunk,
		      const char *manifest)
{
	char why[1024], opt_chunk[48] = "";
	_cleanup_free_ char *reply = NULL;

	if (has_space_or_control(url) || (manifest && has_space_or_control(manifest))) {
		_cleanup_free_ char *shown = url_redact(has_space_or_control(url) ? url : manifest);
		ctl_error("add: URL %s contains spaces or control characters; percent-encode them",
			  shown ? shown : "?");
		return CTL_EXIT_USAGE;
	}
	if (chunk)
		snprintf(opt_chunk, sizeof(opt_chunk), " chunk_size=%" PRIu64, chunk);
	int r = ctl_requestf(mnt, &reply, why, sizeof(why), "add %s %s%s%s%s", name, url, opt_chunk,
			     manifest ? " manifest=" : "", manifest ? manifest : "");
	if (r < 0) {
		/* Our own messages may quote the command: never show the URL raw. */
		_cleanup_free_ char *shown = url_redact(url);
		if (!shown || (strcmp(shown, url) && strstr(why, url)))
			snprintf(why, sizeof(why), "add: cannot add disk %s to %s", name, mnt);
		ctl_error("%s", why);
		return CTL_EXIT_FAIL;
	}
	return CTL_EXIT_OK;
}

/*
 * Parses the network options of an offline add ("-o cafile=F,insecure,...",
 * the names of streamfs(1)'s mount options) into fo, pointing into opts
 * (modified in place).  Returns 0, or -1 after printing the problem.
 */
static int parse_net_options(char *opts, struct fetch_opts *fo)
{
	for (char *save = NULL, *o = strtok_r(opts, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(o, '=');
		const char *val = eq ? eq + 1 : NULL;
		if (eq)
			*eq = '\0';
		static const char *const names[] = {"cafile", "capath", "cert", "key",
						    "header_file", "proxy", "aws_sigv4",
						    "aws_credentials"};
		const char **dst[] = {&fo->cafile, &fo->capath, &fo->cert, &fo->key,
				      &fo->header_file, &fo->proxy, &fo->aws_sigv4,
				      &fo->aws_credentials};
		bool done = false;
		for (size_t i = 0; i < ARRAY_SIZE(names) && !done; i++) {
			if (strcmp(o, names[i]))
				continue;
			if (!val || !*val) {
				ctl_error("add: option %s needs a value (%s=...)", o, o);
				return -1;
			}
			*dst[i] = val;
			done = true;
		}
		if (done)
			continue;
		if (!strcmp(o, "insecure") && !val) {
			fo->insecure = true;
		} else if (!strcmp(o, "timeout") && val) {
			uint64_t t;
			if (parse_u64(val, &t) < 0 || t == 0 || t > 3600) {
				ctl_error("add: bad timeout '%s': use 1 to 3600 seconds", val);
				return -1;
			}
			fo->timeout_s = (unsigned)t;
		} else {
			ctl_error("add: unknown option '%s' (cafile=, capath=, cert=, key=, insecure, "
				  "header_file=, proxy=, aws_sigv4=, aws_credentials=, timeout=)", o);
			return -1;
		}
	}
	return 0;
}

static int add_offline(const char *dir, const char *name, const char *url, uint64_t chunk,
		       const char *manifest, const struct fetch_opts *net)
{
	char why[512];

	_cleanup_close_ int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0) {
		ctl_error("add: cannot open image directory %s: %s", dir, strerror(errno));
		return CTL_EXIT_FAIL;
	}
	_cleanup_close_ int lock = fs_dir_lock(dirfd, dir, why, sizeof(why));
	if (lock < 0) {
		ctl_error("%s", why);
		return CTL_EXIT_FAIL;
	}
	struct fetch_pool *pool;
	int r = fetch_pool_new(net, &pool, why, sizeof(why));
	if (r < 0) {
		ctl_error("%s", why);
		return CTL_EXIT_FAIL;
	}
	struct fs_add_params p = {.name = name, .url = url, .chunk_size = chunk,
				  .manifest = manifest};
	r = fs_disk_add(pool, dirfd, dir, &p, why, sizeof(why));
	fetch_pool_free(pool);
	if (r < 0) {
		ctl_error("%s", why);
		return CTL_EXIT_FAIL;
	}
	return CTL_EXIT_OK;
}

static int cmd_add(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"chunk-size", required_argument, NULL, 'c'},
		{"manifest", required_argument, NULL, 'm'},
		{"options", required_argument, NULL, 'o'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	struct fetch_opts net = {.connections = 1, .timeout_s = 20};
	uint64_t chunk = 0;
	const char *manifest = NULL;
	bool have_net = false;
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":ho:", longopts, NULL)) != -1) {
		switch (c) {
		case 'o':
			if (parse_net_options(optarg, &net) < 0)
				return CTL_EXIT_USAGE;
			have_net = true;
			break;
		case 'c':
			if (parse_chunk_size("add", optarg, &chunk) < 0)
				return CTL_EXIT_USAGE;
			break;
		case 'm':
			manifest = optarg;
			break;
		case 'h':
			ctl_help(stdout);
			return CTL_EXIT_OK;
		default:
			return ctl_bad_option("add", c, argc, argv);
		}
	}
	if (argc - optind != 3) {
		ctl_error("add: %s (usage: " CTL_PROG " add <image-dir|mountpoint> <name> <url>"
			  " [--chunk-size SIZE] [--manifest URL] [-o OPTS])",
			  argc - optind < 3 ? "missing arguments" : "too many arguments");
		return CTL_EXIT_USAGE;
	}
	const char *dir = argv[optind], *name = argv[optind + 1], *url = argv[optind + 2];
	if (!disk_name_valid(name)) {
		char shown[96];

		disk_name_quote(shown, sizeof(shown), name);
		ctl_error("add: bad disk name %s: use 1 to %d characters from A-Z a-z 0-9 . _ -, "
			  "not starting with '.'",
			  shown, DISK_NAME_MAX);
		return CTL_EXIT_USAGE;
	}
	char why[1024];
	int r = ctl_mount_point_check(dir, why, sizeof(why));
	if (r < 0) {
		ctl_error("add: %s", why);
		return CTL_EXIT_FAIL;
	}
	if (r > 0) {
		if (have_net) {
			ctl_error("add: -o applies to an image directory; a mount uses its own options");
			return CTL_EXIT_USAGE;
		}
		return add_online(dir, name, url, chunk, manifest);
	}
	return add_offline(dir, name, url, chunk, manifest, &net);
}

static int cmd_manifest(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"chunk-size", required_argument, NULL, 'c'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	uint64_t chunk = 0;
	int c;

	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
		switch (c) {
		case 'c':
			if (parse_chunk_size("manifest", optarg, &chunk) < 0)
				return CTL_EXIT_USAGE;
			break;
		case 'h':
			ctl_help(stdout);
			return CTL_EXIT_OK;
		default:
			return ctl_bad_option("manifest", c, argc, argv);
		}
	}
	if (argc - optind != 1) {
		ctl_error("manifest: %s (usage: " CTL_PROG " manifest <file> [--chunk-size SIZE])",
			  optind >= argc ? "missing file" : "too many arguments");
		return CTL_EXIT_USAGE;
	}
	const char *file = argv[optind];
	_cleanup_close_ int fd = open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		ctl_error("manifest: cannot open %s: %s", file, strerror(errno));
		return CTL_EXIT_FAIL;
	}
	struct stat st;
	if (fstat(fd, &st) < 0) {
		ctl_error("manifest: cannot stat %s: %s", file, strerror(errno));
		return CTL_EXIT_FAIL;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
		ctl_error("manifest: %s is not a regular file or block device", file);
		return CTL_EXIT_FAIL;
	}
	/* SEEK_END sizes block devices too, where st_size is 0. */
	off_t size = lseek(fd, 0, SEEK_END);
	if (size < 0) {
		ctl_error("manifest: cannot size %s: %s", file, strerror(errno));
		return CTL_EXIT_FAIL;
	}
	if (size == 0) {
		ctl_error("manifest: %s is empty", file);
		return CTL_EXIT_FAIL;
	}
	int r = manifest_generate(fd, (uint64_t)size, (uint32_t)(chunk ? chunk : CACHE_CHUNK_DEFAULT),
				  STDOUT_FILENO);
	if (r < 0) {
		ctl_error("manifest: cannot write the manifest of %s: %s", file, strerror(-r));
		return CTL_EXIT_FAIL;
	}
	return CTL_EXIT_OK;
}

static bool utf8_terminal(int fd)
{
	const char *cs = nl_langinfo(CODESET);

	return isatty(fd) && cs && (!strcasecmp(cs, "UTF-8") || !strcasecmp(cs, "utf8"));
}

static const struct {
	const char *name;
	int (*fn)(int argc, char **argv);
} commands[] = {
	{"add", cmd_add},
	{"status", ctl_cmd_status},
	{"start", ctl_cmd_start},
	{"stop", ctl_cmd_stop},
	{"speed", ctl_cmd_speed},
	{"chunk", ctl_cmd_chunk},
	{"wait", ctl_cmd_wait},
	{"verify", ctl_cmd_verify},
	{"manifest", cmd_manifest},
};

int main(int argc, char **argv)
{
	log_init(CTL_PROG, true);
	log_max_level = LOG_ERR;
	/* Only the character set: numbers stay in the C locale, as JSON needs. */
	setlocale(LC_CTYPE, "");
	ctl_term.utf8_out = utf8_terminal(STDOUT_FILENO);
	ctl_term.utf8_err = utf8_terminal(STDERR_FILENO);

	if (argc < 2) {
		ctl_error("missing command (usage: " CTL_PROG " <command> [<args>]; see " CTL_PROG
			  " --help)");
		return CTL_EXIT_USAGE;
	}
	const char *cmd = argv[1];
	if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
		ctl_help(stdout);
		return CTL_EXIT_OK;
	}
	if (!strcmp(cmd, "--version")) {
		printf(CTL_PROG " " STREAMFS_VERSION "\n");
		return CTL_EXIT_OK;
	}
	for (size_t i = 0; i < ARRAY_SIZE(commands); i++)
		if (!strcmp(cmd, commands[i].name))
			return commands[i].fn(argc - 1, argv + 1);
	if (cmd[0] == '-')
		ctl_error("unknown option '%s' (see " CTL_PROG " --help)", cmd);
	else
		ctl_error("unknown command '%s' (see " CTL_PROG " --help)", cmd);
	return CTL_EXIT_USAGE;
}
