/* SPDX-License-Identifier: MIT */
/*
 * Private declarations of fs/: the per-mount context passed to every FUSE
 * operation through fuse_get_context()->private_data, the disk table, and
 * the control file and xattr handlers.
 */
#ifndef STREAMFS_FS_I_H
#define STREAMFS_FS_I_H

#define FUSE_USE_VERSION 312

#include <fuse.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cache.h"
#include "fetch.h"
#include "fs.h"

#define CONTROL_NAME ".control"

/*
 * Saving progress (cache_disk_sync) forces the kernel to write back every
 * fetched byte at once; while a disk is being filled fast that writeback
 * competes with the fill itself.  So a busy disk saves at most every
 * commit= seconds, and a disk saves as soon as it has gone one flusher
 * tick without a write.
 */
#define FS_COMMIT_DEFAULT_S 5
#define FS_COMMIT_MAX_S 3600

/* Mount options beyond FUSE's own; filled once by main(), then read-only. */
struct mount_opts {
	char *image_dir;
	char *mountpoint;
	bool foreground;
	bool debug;
	char *stream;        /* "auto" (default) or "manual" */
	char *speed;         /* RATE for every disk, NULL = keep each disk's own */
	unsigned connections;
	unsigned timeout;
	char *commit;        /* SECONDS, NULL = FS_COMMIT_DEFAULT_S */
	char *cafile, *capath, *cert, *key, *proxy, *header_file;
	char *aws_sigv4, *aws_credentials;
	int insecure;
	int readonly;
	char *chunk_size;    /* default for new disks */
	char *readahead;     /* SIZE, NULL = default for the stream mode */
	char *debug_subsys;  /* -o debug=fetch,cache,... */
	int nopassthrough;   /* never serve complete disks by FUSE passthrough */
	int nodirectio;      /* open incomplete disks page-cached, not direct-io */
	int show_help;
	int show_version;
};

/* One served disk: the cache and the template it reads through. */
struct mount_disk {
	char *name;
	struct cache_disk *disk;
	struct fetch_template *tpl;

	pthread_mutex_t pt_lock;  /* protects the five below; taken before the disk's */
	unsigned cached_opens;    /* descriptors open through the page cache */
	unsigned direct_opens;    /* descriptors open in direct-io mode */
	unsigned pt_opens;        /* descriptors open in passthrough */
	int32_t backing_id;       /* the image's kernel backing id, 0 = none */
	bool cache_bypassed;      /* passthrough or direct-io since the last cached open */

	uint64_t flush_writes;    /* the flusher's last cache_disk_writes() reading */
	uint64_t unsaved_since;   /* when the flusher first saw it dirty, 0 = clean;
				   * both only touched by the flusher thread */
};

struct mount_ctx {
	struct mount_opts opts;     /* read-only after start-up */
	int dirfd;                  /* the image directory */
	int lock_fd;                /* flock held while mounted */
	uid_t owner;                /* who mounted: may write the control file */
	struct timespec started;    /* mount time: times of / and .control */
	gid_t group;
	bool auto_stream;
	uint64_t default_chunk;     /* bytes, for add without chunk_size= */
	uint64_t speed;             /* bytes/s from -o speed, valid if opts.speed */
	unsigned depth;             /* streamer chunks in flight per disk */
	uint64_t commit_ns;         /* longest a busy disk's progress goes unsaved */
	uint64_t readahead;         /* bytes ahead of sequential readers, 0 = off */
	struct fetch_pool *pool;

	pthread_mutex_t add_lock;   /* serialises add; order: before disks_lock */
	pthread_rwlock_t disks_lock; /* protects: disks, ndisks, cap */
	struct mount_disk **disks;  /* never removed while mounted */
	size_t ndisks, cap;

	pthread_mutex_t flush_lock; /* protects: flush_quit; leaf */
	pthread_cond_t flush_cond;
	bool flush_quit;
	pthread_t flusher;
	bool flusher_started;
	bool started_threads;       /* past fuse_daemonize(): threads may start */
};

/* mount.c */
struct mount_ctx *mount_ctx_get(void);
/* Loads every disk of the image directory; logs and skips broken ones. */
int mount_load_all(struct mount_ctx *m) __attribute__((warn_unused_result));
/* Opens one disk and appends it; why receives the reason on failure. */
int mount_load_disk(struct mount_ctx *m, const char *name, char *why, size_t why_size)
	__attribute__((warn_unused_result));
/* The disk called name, or NULL.  The pointer stays valid until unmount. */
struct mount_disk *mount_find(struct mount_ctx *m, const char *name);
/* The disk for a path "/NAME", or NULL. */
struct mount_disk *mount_find_path(struct mount_ctx *m, const char *path);
/* Snapshot of the table: caller frees the array (not the disks). */
struct mount_disk **mount_list(struct mount_ctx *m, size_t *ret_n);
/* Adds a disk through the control file: probe, create, load, maybe start. */
int mount_add(struct mount_ctx *m, const struct fs_add_params *p, char *why, size_t why_size)
	__attribute__((warn_unused_result));
/* Starts streaming every disk (stream=auto); call after fuse_daemonize(). */
void mount_start_streaming(struct mount_ctx *m);
int mount_flusher_start(struct mount_ctx *m) __attribute__((warn_unused_result));
void mount_flusher_stop(struct mount_ctx *m);
void mount_free_disks(struct mount_ctx *m);

/* xattr.c */
int fs_getxattr(const char *path, const char *name, char *value, size_t size);
int fs_setxattr(const char *path, const char *name, const char *value, size_t size, int flags);
int fs_listxattr(const char *path, char *list, size_t size);

/* control.c; a control file's fi->fh is its session | FS_FH_CONTROL. */
#define FS_FH_CONTROL ((uint64_t)1)
int fs_control_open(struct fuse_file_info *fi);
int fs_control_read_buf(struct fuse_bufvec **bufp, size_t size, off_t off,
			struct fuse_file_info *fi);
int fs_control_write(const char *buf, size_t size, struct fuse_file_info *fi);
void fs_control_release(struct fuse_file_info *fi);
/* Percent present with two decimals, never 100.00 before complete. */
void fs_format_progress(char *buf, size_t n, const struct cache_disk_stats *st);
/* One status line for a disk, "name=... state=... ...\n"; caller frees; NULL on ENOMEM. */
char *fs_status_line(struct mount_disk *md);

/* The largest read one FUSE request carries (mount option max_read), and
 * the st_blksize of every disk.  libfuse splices a reply from the image
 * only if it fits its pipe with a few pages to spare, and a pipe grows
 * past /proc/sys/fs/pipe-max-size (1 MiB) only with CAP_SYS_RESOURCE:
 * a 1 MiB read would be copied through a fresh buffer instead. */
#define FS_IO_SIZE 524288

/* devio.c; a disk's fi->fh is its mount_disk | these bits. */
#define FS_FH_PASSTHROUGH ((uint64_t)2) /* opened in passthrough mode */
#define FS_FH_WRITABLE ((uint64_t)4)    /* opened for writing (set by fs_open) */
#define FS_FH_DIRECT ((uint64_t)8)      /* opened in direct-io mode */
#define FS_FH_FLAGS ((uint64_t)15)
_Static_assert(_Alignof(max_align_t) > FS_FH_FLAGS, "calloc()'d disks leave FS_FH_* free");
/* Hooks the mounted session's device I/O (passthrough, early answers). */
int fs_devio_install(struct fuse_session *se) __attribute__((warn_unused_result));
/* Passthrough and direct-io are used only once enabled (not with
 * -o nopassthrough, -o nodirectio). */
void fs_open_modes_enable(bool passthrough, bool direct_io);
/* Replies to the READ this thread serves with len zero bytes; false if it
 * cannot (then libfuse replies as usual). */
bool fs_answer_zeros(size_t len);
/* True once the hook is in, so that fs_answer_now() may be used. */
bool fs_answer_ready(void);
/* A cache_answer_fn: replies to the READ this thread serves with data. */
bool fs_answer_now(void *opaque, const void *data, size_t len);
/* Chooses passthrough, direct-io or the page cache for this open of md;
 * sets fi. */
void fs_open_mode(struct mount_disk *md, struct fuse_file_info *fi);
/* The release of a descriptor opened with fs_open_mode(). */
void fs_open_mode_release(struct mount_disk *md, uint64_t fh);

/* ops.c */
extern const struct fuse_operations fs_ops;

#endif
