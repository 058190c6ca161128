// SPDX-License-Identifier: MIT
/*
 * The control file MOUNTPOINT/.control: each write is one command; a read
 * on the same open file returns that command's reply.  Sessions are per
 * open file, so concurrent users do not see each other's replies.  Called
 * from FUSE worker threads; commands that fetch (add, chunk) block only
 * the calling thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cleanup.h"
#include "control_parse.h"
#include "fs_i.h"
#include "log.h"
#include "util.h"

struct control_session {
	pthread_mutex_t lock; /* protects: reply, len; leaf */
	char *reply;          /* the last command's reply, owned */
	size_t len;
	size_t rpos;          /* next byte of reply to read */
};

static struct control_session *session_of(struct fuse_file_info *fi)
{
	return (struct control_session *)(uintptr_t)(fi->fh & ~FS_FH_CONTROL);
}

int fs_control_open(struct fuse_file_info *fi)
{
	struct mount_ctx *m = mount_ctx_get();
	const struct fuse_context *ctx = fuse_get_context();

	/* Commands change state: only the mount's owner (or root) may
	 * write them, whatever allow_other lets others see. */
	if ((fi->flags & O_ACCMODE) != O_RDONLY && ctx->uid != m->owner && ctx->uid != 0)
		return -EACCES;
	struct control_session *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	pthread_mutex_init(&s->lock, NULL);
	fi->fh = (uintptr_t)s | FS_FH_CONTROL;
	fi->direct_io = 1;
	fi->nonseekable = 0;
	return 0;
}

void fs_control_release(struct fuse_file_info *fi)
{
	struct control_session *s = session_of(fi);

	pthread_mutex_destroy(&s->lock);
	free(s->reply);
	free(s);
}

int fs_control_read_buf(struct fuse_bufvec **bufp, size_t size, off_t off,
			struct fuse_file_info *fi)
{
	struct control_session *s = session_of(fi);
	struct fuse_bufvec *bv = malloc(sizeof(*bv));
	char *mem = NULL;
	size_t n = 0;

	if (!bv)
		return -ENOMEM;
	/* The reply is read from its start after each write, whatever the
	 * file offset (the write moved it): write then read just works. */
	(void)off;
	pthread_mutex_lock(&s->lock);
	if (s->rpos < s->len) {
		n = MIN(size, s->len - s->rpos);
		mem = malloc(n);
		if (mem) {
			memcpy(mem, s->reply + s->rpos, n);
			s->rpos += n;
		}
	}
	pthread_mutex_unlock(&s->lock);
	if (n && !mem) {
		free(bv);
		return -ENOMEM;
	}
	/* libfuse frees both the bufvec and its memory buffer after replying. */
	*bv = FUSE_BUFVEC_INIT(n);
	bv->buf[0].mem = mem;
	*bufp = bv;
	return 0;
}

/* Sets the session's reply; returns ret (the write's result). */
static int reply(struct control_session *s, int ret, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int reply(struct control_session *s, int ret, const char *fmt, ...)
{
	char *text = NULL;
	va_list ap;

	va_start(ap, fmt);
	int n = vasprintf(&text, fmt, ap);
	va_end(ap);
	if (n < 0)
		return -ENOMEM;
	LOCK_GUARD(&s->lock);
	free(s->reply);
	s->reply = text;
	s->len = (size_t)n;
	s->rpos = 0;
	return ret;
}

void fs_format_progress(char *buf, size_t n, const struct cache_disk_stats *st)
{
	/* Never round an incomplete disk up to 100.00. */
	uint64_t bp = st->size ? (uint64_t)((long double)st->cached * 10000.0L / st->size) : 0;
	if (bp >= 10000 && st->cached < st->size)
		bp = 9999;
	snprintf(buf, n, "%" PRIu64 ".%02" PRIu64, bp / 100, bp % 100);
}

char *fs_status_line(struct mount_disk *md)
{
	struct cache_disk_stats st;
	char progress[16];
	char *line = NULL;

	cache_disk_get_stats(md->disk, &st);
	fs_format_progress(progress, sizeof(progress), &st);
	_cleanup_free_ char *shown = url_redact(cache_disk_url(md->disk));
	/* error= comes last and runs to the end of the line: it is free text. */
	if (asprintf(&line,
		     "name=%s state=%s size=%" PRIu64 " cached=%" PRIu64 " progress=%s"
		     " position=%" PRIu64 " rate=%" PRIu64 " speed=%" PRIu64 " chunk_size=%" PRIu32
		     " fetched=%" PRIu64 " errors=%" PRIu64 " waiting=%" PRIu64
		     " template=%s error=%s\n",
		     md->name, cache_state_name(st.state), st.size, st.cached, progress, st.position,
		     st.rate, st.speed, st.chunk_size, st.fetched, st.errors, st.waiting,
		     shown ? shown : "?", st.error) < 0)
		return NULL;
	return line;
}

static int do_status(struct mount_ctx *m, struct control_session *s, const char *name)
{
	size_t n = 0, used = 0;
	_cleanup_free_ char *out = strdup("");

	if (!out)
		return -ENOMEM;
	_cleanup_free_ struct mount_disk **list = mount_list(m, &n);
	if (!list)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		if (*name && strcmp(list[i]->name, name))
			continue;
		_cleanup_free_ char *line = fs_status_line(list[i]);
		if (!line)
			return -ENOMEM;
		size_t len = strlen(line);
		char *grown = realloc(out, used + len + 1);
		if (!grown)
			return -ENOMEM;
		out = grown;
		memcpy(out + used, line, len + 1);
		used += len;
	}
	return reply(s, 0, "%s", out);
}

int fs_control_write(const char *buf, size_t size, struct fuse_file_info *fi)
{
	struct mount_ctx *m = mount_ctx_get();
	struct control_session *s = session_of(fi);
	char why[512];
	int r;

	_cleanup_free_ struct control_cmd *c = malloc(sizeof(*c));
	if (!c)
		return -ENOMEM;
	r = control_parse(buf, size, c, why, sizeof(why));
	if (r < 0)
		return reply(s, r, "error: %s\n", why);

	struct mount_disk *md = NULL;
	if (c->verb != CONTROL_ADD && c->name[0]) {
		md = mount_find(m, c->name);
		if (!md)
			return reply(s, -EINVAL, "error: %s: no disk named '%s'\n",
				     control_verb_name(c->verb), c->name);
	}

	switch (c->verb) {
	case CONTROL_ADD: {
		struct fs_add_params p = {.name = c->name, .url = c->url,
					  .chunk_size = c->chunk_size,
					  .manifest = c->manifest[0] ? c->manifest : NULL};
		r = mount_add(m, &p, why, sizeof(why));
		if (r < 0)
			return reply(s, r == -EEXIST ? -EEXIST : -EINVAL, "error: add: %s\n", why);
		return reply(s, (int)size, "ok\n");
	}
	case CONTROL_START:
		r = cache_disk_recheck(md->disk, why, sizeof(why));
		if (r == -ESTALE)
			return reply(s, -EIO,
				     "error: start: the template of %s still differs from the one "
				     "it was added from: %s\n",
				     md->name, why);
		if (r < 0)
			return reply(s, r == -ENOSPC ? r : -EIO,
				     "error: start: cannot check the template of %s: %s\n", md->name,
				     why);
		r = cache_disk_stream_start(md->disk);
		if (r == -EALREADY)
			return reply(s, (int)size, "ok complete\n");
		if (r < 0)
			return reply(s, r, "error: start: disk %s is in state error and cannot stream\n",
				     md->name);
		return reply(s, (int)size, "ok\n");
	case CONTROL_STOP:
		r = cache_disk_stream_stop(md->disk);
		return reply(s, (int)size, r == -EALREADY ? "ok complete\n" : "ok\n");
	case CONTROL_SPEED:
		r = cache_disk_stream_set_speed(md->disk, c->number);
		if (r < 0)
			return reply(s, r, "error: speed: cannot save the limit of %s: %s\n", md->name,
				     strerror(-r));
		return reply(s, (int)size, "ok\n");
	case CONTROL_CHUNK: {
		uint64_t next;
		if (c->number >= cache_disk_size(md->disk))
			return reply(s, -EINVAL,
				     "error: chunk: offset %" PRIu64 " is beyond the end of %s (%" PRIu64
				     " bytes)\n",
				     c->number, md->name, cache_disk_size(md->disk));
		r = cache_disk_stream_chunk(md->disk, c->number, &next);
		if (r < 0) {
			struct cache_disk_stats st;
			cache_disk_get_stats(md->disk, &st);
			return reply(s, -EIO, "error: chunk: %s\n",
				     st.error[0] ? st.error : strerror(-r));
		}
		if (next == UINT64_MAX)
			return reply(s, (int)size, "end\n");
		return reply(s, (int)size, "%" PRIu64 "\n", next);
	}
	case CONTROL_STATUS:
		r = do_status(m, s, c->name);
		return r < 0 ? r : (int)size;
	case CONTROL_MAP: {
		_cleanup_free_ char *map = malloc(c->number + 1);
		if (!map)
			return -ENOMEM;
		cache_disk_map(md->disk, map, (unsigned)c->number);
		return reply(s, (int)size, "%s\n", map);
	}
	case CONTROL_VERIFY: {
		uint64_t bad_off[8], checked = 0, written = 0;
		int64_t bad = cache_disk_verify(md->disk, bad_off, ARRAY_SIZE(bad_off), &checked,
						&written);
		if (bad == -ENOENT)
			return reply(s, -EINVAL, "error: verify: disk %s has no manifest\n", md->name);
		if (bad < 0)
			return reply(s, (int)bad, "error: verify: cannot read %s: %s\n", md->name,
				     strerror((int)-bad));
		if (bad == 0 && written == 0)
			return reply(s, (int)size, "ok %" PRIu64 " chunks verified\n", checked);
		if (bad == 0)
			return reply(s, (int)size,
				     "ok %" PRIu64 " chunks verified, %" PRIu64
				     " not compared (written through the mount)\n",
				     checked, written);
		char list[8 * 24] = "";
		size_t used = 0;
		for (size_t i = 0; i < MIN((size_t)bad, ARRAY_SIZE(bad_off)); i++)
			used += (size_t)snprintf(list + used, sizeof(list) - used, " %" PRIu64,
						 bad_off[i]);
		log_warn("disk %s: %" PRId64 " present chunks differ from the manifest", md->name, bad);
		return reply(s, -EIO,
			     "error: verify: %" PRId64 " of %" PRIu64 " present chunks of %s differ "
			     "from the manifest, at offsets%s%s\n",
			     bad, checked, md->name, list, bad > (int64_t)ARRAY_SIZE(bad_off) ? " ..." : "");
	}
	}
	return reply(s, -EINVAL, "error: unhandled command\n");
}
